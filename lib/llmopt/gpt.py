"""The course model: OPT in one file, nanoGPT style.

OPT: Open Pre-trained Transformer Language Models, Zhang et al., 2022
(https://arxiv.org/abs/2205.01068). The lecture's methods (KV cache, PagedAttention,
FlashAttention, GPTQ, LLM.int8(), NF4, QLoRA, SparseGPT) were all demonstrated on OPT, so
the course model is an OPT too: the shipped ``tiny-opt`` (``assets/tiny-opt``, trained by
``python -m llmopt.train``) and, when a user has them, the real OPT-125m/350m/...

Design:
- Decoder-only transformer; learned positional embeddings with OPT's offset 2 (position
  ``p`` reads row ``p + 2`` of ``embed_positions``: fairseq reserved rows 0 and 1);
  ReLU MLP; biases on every linear layer (``enable_bias``) except the projections; the
  output head is the transposed token embedding (tied weights).
- Pre-LN (``do_layer_norm_before=True``: 125m, 1.3b, ... 175b, and tiny-opt) with a final
  layer norm; post-LN (``False``: OPT-350m), which also embeds into
  ``word_embed_proj_dim`` = 512 and projects in/out of ``d_model`` = 1024.
- Attention is ``F.scaled_dot_product_attention``. ``forward(input_ids, kv_cache)`` takes
  any object with ``seq_len`` (tokens cached before this call) and
  ``update(layer_idx, k, v) -> (k_all, v_all)``, shapes ``(B, H, T, d)``; the cache
  advances its ``seq_len`` itself after the last layer's update (lab01 writes one).
- ``GPT.from_hf`` / ``GPT.to_hf`` convert to and from ``transformers.OPTForCausalLM``
  with identical logits. Module names (``layers[i].attn.q_proj``, ``.mlp.fc1``, ...) follow
  OPT's so that quantization and LoRA code reads the same on both.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
POSITION_OFFSET = 2  # OPT: position p uses row p + 2 of the positional embedding


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    max_position_embeddings: int = 2048
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    dropout: float = 0.0            # on the residual branches (OPT's ``dropout``)
    attention_dropout: float = 0.0  # on the attention probabilities
    do_layer_norm_before: bool = True  # pre-LN; False = post-LN (OPT-350m)
    word_embed_proj_dim: int | None = None  # None: = d_model (no project_in/out)
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False  # OPT's ``_remove_final_layer_norm``
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.d_model
        assert self.d_model % self.n_head == 0, "d_model must be a multiple of n_head"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class Attention(nn.Module):
    """Multi-head causal self-attention; reads and extends an optional KV cache."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim = layer_idx, config.n_head, config.head_dim
        self.dropout = config.attention_dropout
        D, bias = config.d_model, config.enable_bias
        self.q_proj = nn.Linear(D, D, bias=bias)
        self.k_proj = nn.Linear(D, D, bias=bias)
        self.v_proj = nn.Linear(D, D, bias=bias)
        self.out_proj = nn.Linear(D, D, bias=bias)

    def forward(self, x, kv_cache=None, past: int = 0, attention=None):
        B, T, D = x.shape  # (B, T, D)
        H, d = self.n_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        v = self.v_proj(x).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H, past + T, d)
        p = self.dropout if self.training else 0.0
        if attention is not None:  # a caller's attention(q, k, v) for T new queries over S keys
            y = attention(q, k, v)  # (B, H, T, d)
        elif T == 1:  # one new query sees every cached key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # query i sits at absolute position past + i and sees keys 0 .. past + i
            S = k.size(2)
            allowed = (torch.arange(S, device=x.device)[None, :]
                       <= past + torch.arange(T, device=x.device)[:, None])  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(y)


class MLP(nn.Module):
    """OPT's feed-forward network: fc1, ReLU, fc2."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.enable_bias)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))  # (B, T, D) -> (B, T, d_ff) -> (B, T, D)


class Block(nn.Module):
    """One decoder layer: attention and MLP, each a residual branch, pre- or post-LN."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        affine = config.layer_norm_elementwise_affine
        self.pre_ln = config.do_layer_norm_before
        self.attn_norm = nn.LayerNorm(config.d_model, elementwise_affine=affine)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.d_model, elementwise_affine=affine)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, past: int = 0, attention=None):
        if self.pre_ln:  # x + f(LN(x))
            x = x + self.dropout(self.attn(self.attn_norm(x), kv_cache, past, attention))
            x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        else:  # LN(x + f(x))
            x = self.attn_norm(x + self.dropout(self.attn(x, kv_cache, past, attention)))
            x = self.mlp_norm(x + self.dropout(self.mlp(x)))
        return x  # (B, T, D)


class GPT(nn.Module):
    """OPT decoder with a tied LM head. ``forward(input_ids, kv_cache=None) -> logits``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        E, D = c.word_embed_proj_dim, c.d_model
        self.embed_tokens = nn.Embedding(c.vocab_size, E, padding_idx=c.pad_token_id)
        self.embed_positions = nn.Embedding(c.max_position_embeddings + POSITION_OFFSET, D)
        self.project_in = nn.Linear(E, D, bias=False) if E != D else None
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.final_layer_norm = (nn.LayerNorm(D, elementwise_affine=c.layer_norm_elementwise_affine)
                                 if c.do_layer_norm_before and not c.remove_final_layer_norm
                                 else None)
        self.project_out = nn.Linear(D, E, bias=False) if E != D else None
        self.lm_head = nn.Linear(E, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.lm_head.weight = self.embed_tokens.weight  # tied input/output embeddings

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def n_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (the tied head counted once); optionally without embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel() + self.embed_positions.weight.numel()
        return n

    def forward(self, input_ids: torch.Tensor, kv_cache=None, attention=None) -> torch.Tensor:
        """Logits (B, T, V). ``kv_cache``: read and extended (``update(layer, k, v)``,
        ``seq_len``); ``attention(q, k, v)``: replaces the built-in causal attention of T new
        queries over the S keys (the cached ones and the new), e.g. a lab's own."""
        B, T = input_ids.shape  # (B, T)
        past = 0 if kv_cache is None else int(kv_cache.seq_len)  # read once, before updates
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + T} tokens is longer than "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        pos = torch.arange(past, past + T, device=input_ids.device) + POSITION_OFFSET  # (T,)
        x = self.embed_tokens(input_ids)  # (B, T, E)
        if self.project_in is not None:
            x = self.project_in(x)  # (B, T, D)
        x = x + self.embed_positions(pos)  # (B, T, D)
        for block in self.layers:
            x = block(x, kv_cache, past, attention)  # (B, T, D)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # (B, T, E)
        return self.lm_head(x)  # (B, T, V)

    # ------------------------------------------------------------------ HF conversion
    @staticmethod
    def _hf_names(config: GPTConfig) -> dict[str, str]:
        """Our parameter name -> OPTForCausalLM's parameter name."""
        m = {"embed_tokens.weight": "model.decoder.embed_tokens.weight",
             "embed_positions.weight": "model.decoder.embed_positions.weight"}
        if config.word_embed_proj_dim != config.d_model:
            m["project_in.weight"] = "model.decoder.project_in.weight"
            m["project_out.weight"] = "model.decoder.project_out.weight"
        ln = ("weight", "bias") if config.layer_norm_elementwise_affine else ()
        if config.do_layer_norm_before and not config.remove_final_layer_norm:
            m.update({f"final_layer_norm.{s}": f"model.decoder.final_layer_norm.{s}" for s in ln})
        lin = ("weight", "bias") if config.enable_bias else ("weight",)
        for i in range(config.n_layer):
            ours, theirs = f"layers.{i}.", f"model.decoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                m.update({f"{ours}attn.{proj}.{s}": f"{theirs}self_attn.{proj}.{s}" for s in lin})
            for fc in ("fc1", "fc2"):
                m.update({f"{ours}mlp.{fc}.{s}": f"{theirs}{fc}.{s}" for s in lin})
            m.update({f"{ours}attn_norm.{s}": f"{theirs}self_attn_layer_norm.{s}" for s in ln})
            m.update({f"{ours}mlp_norm.{s}": f"{theirs}final_layer_norm.{s}" for s in ln})
        return m

    @classmethod
    def config_from_hf(cls, hf_config) -> GPTConfig:
        act = getattr(hf_config, "activation_function", "relu")
        if act != "relu":
            raise ValueError(f"only OPT's ReLU MLP is supported, got activation {act!r}")
        return GPTConfig(
            vocab_size=hf_config.vocab_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
            d_model=hf_config.hidden_size, d_ff=hf_config.ffn_dim,
            dropout=hf_config.dropout, attention_dropout=hf_config.attention_dropout,
            do_layer_norm_before=hf_config.do_layer_norm_before,
            word_embed_proj_dim=hf_config.word_embed_proj_dim,
            enable_bias=getattr(hf_config, "enable_bias", True),
            layer_norm_elementwise_affine=getattr(hf_config, "layer_norm_elementwise_affine", True),
            remove_final_layer_norm=getattr(hf_config, "_remove_final_layer_norm", False),
            init_std=getattr(hf_config, "init_std", 0.02),
            pad_token_id=hf_config.pad_token_id, bos_token_id=hf_config.bos_token_id,
            eos_token_id=hf_config.eos_token_id)

    @classmethod
    def from_hf(cls, opt_model) -> "GPT":
        """A GPT with the weights (copied) of a ``transformers.OPTForCausalLM``."""
        config = cls.config_from_hf(opt_model.config)
        p = next(opt_model.parameters())
        with torch.device("meta"):
            model = cls(config)
        sd = opt_model.state_dict()
        ours = {k: sd[v].detach().clone() for k, v in cls._hf_names(config).items()}
        model.load_state_dict(ours, strict=False, assign=True)
        model.lm_head.weight = model.embed_tokens.weight  # re-tie after assign
        missing = [n for n, t in model.named_parameters() if t.is_meta]
        if missing:
            raise ValueError(f"OPT checkpoint lacks {missing}")
        return model.to(p.device).train(opt_model.training)

    def hf_config(self):
        """The ``transformers.OPTConfig`` of this model."""
        from transformers import OPTConfig
        c = self.config
        hf = OPTConfig(
            vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
            num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, hidden_size=c.d_model,
            ffn_dim=c.d_ff, dropout=c.dropout, attention_dropout=c.attention_dropout,
            activation_function="relu", do_layer_norm_before=c.do_layer_norm_before,
            word_embed_proj_dim=c.word_embed_proj_dim, enable_bias=c.enable_bias,
            layer_norm_elementwise_affine=c.layer_norm_elementwise_affine,
            _remove_final_layer_norm=c.remove_final_layer_norm, init_std=c.init_std,
            pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id, tie_word_embeddings=True)
        hf.architectures = ["OPTForCausalLM"]
        return hf

    def to_hf(self):
        """A ``transformers.OPTForCausalLM`` with the same weights (copied), dtype and device."""
        from transformers import OPTForCausalLM
        p = next(self.parameters())
        hf = OPTForCausalLM(self.hf_config()).to(device=p.device, dtype=p.dtype)
        sd = self.state_dict()
        theirs = {v: sd[k].detach().clone() for k, v in self._hf_names(self.config).items()}
        missing, unexpected = hf.load_state_dict(theirs, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
        assert not missing and not unexpected, (missing, unexpected)
        hf.tie_weights()
        return hf.eval() if not self.training else hf


# ---------------------------------------------------------------------- loading
def _offline_error(name: str, err: Exception) -> OSError:
    return OSError(
        f"OPT checkpoint {name!r} is not available offline (llmopt never downloads weights "
        f"at run time). To make it available: on a machine with network access run "
        f"`hf download {name}` (or `python -c \"from transformers import AutoModelForCausalLM, "
        f"AutoTokenizer; AutoModelForCausalLM.from_pretrained('{name}'); "
        f"AutoTokenizer.from_pretrained('{name}')\"`), which fills the Hugging Face cache "
        f"(~/.cache/huggingface/hub, or $HF_HOME/hub; copy that folder to this machine), or "
        f"pass the path of a local folder holding config.json and the model weights. "
        f"Or use the shipped model: load_model('tiny-opt'). ({type(err).__name__}: {err})")


def load_hf_folder(path: str) -> GPT:
    """A GPT from a folder in HF format (config.json + model.safetensors), without transformers.

    Importing transformers' OPT costs seconds; the shipped tiny-opt loads in milliseconds.
    """
    import json
    from types import SimpleNamespace

    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    defaults = {"dropout": 0.1, "attention_dropout": 0.0, "do_layer_norm_before": True,
                "word_embed_proj_dim": hf.get("hidden_size"), "pad_token_id": 1,
                "bos_token_id": 2, "eos_token_id": 2}
    config = GPT.config_from_hf(SimpleNamespace(**{**defaults, **hf}))
    sd = load_file(os.path.join(path, "model.safetensors"))
    ours = {k: sd[v].float() for k, v in GPT._hf_names(config).items()}
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(ours, strict=False, assign=True)
    model.lm_head.weight = model.embed_tokens.weight  # re-tie after assign
    missing = [n for n, t in model.named_parameters() if t.is_meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    return model


def load_model(name: str = "tiny-opt", device=None, dtype=None):
    """Load an OPT as an llmopt ``GPT`` in eval mode; returns ``(model, tokenizer)``.

    ``name`` is ``"tiny-opt"`` (the checkpoint shipped in ``llmopt/assets``), a local folder,
    or a hub id already in the local Hugging Face cache (``"facebook/opt-125m"``). Weights
    are loaded in fp32 and then cast to ``dtype`` (default fp32) on ``device`` (default CPU).
    """
    if name == "tiny-opt":
        from llmopt.data import get_tokenizer
        model = load_hf_folder(os.path.join(ASSETS, "tiny-opt"))
        tokenizer = get_tokenizer()
    else:
        from transformers import AutoTokenizer, OPTForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # stderr in a graded cell costs its points
        try:
            hf = OPTForCausalLM.from_pretrained(name, dtype=torch.float32, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as err:
            raise _offline_error(name, err) from err
        model = GPT.from_hf(hf)
        del hf
    model = model.to(device=device or "cpu", dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def config_dict(config: GPTConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config)}
