"""Tests for llmopt.gpt: OPT equivalence with transformers, the KV-cache path, tiny-opt."""
import os

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from llmopt import data
from llmopt.gpt import ASSETS, GPT, GPTConfig, load_model

TINY = os.path.join(ASSETS, "tiny-opt")
PROMPT = ("The KV cache stores the keys and values of every previous token, so that each "
          "new token only computes its own query. Ключи и значения.")


class StandInCache:
    """The duck-typed interface GPT uses: ``seq_len`` and ``update(layer, k, v)``."""

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, dtype=torch.float32):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.n_layer, self.seq_len = n_layer, 0

    def update(self, layer_idx, k, v):  # k, v: (B, H, T_new, d)
        start, end = self.seq_len, self.seq_len + k.size(2)
        self.k[layer_idx][:, :, start:end] = k
        self.v[layer_idx][:, :, start:end] = v
        if layer_idx == self.n_layer - 1:  # the last layer advances the cache
            self.seq_len = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]


@pytest.fixture(scope="module")
def hf_tiny():
    return OPTForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.tensor([data.get_tokenizer().encode(PROMPT)])


def test_tiny_opt_size():
    model, tok = load_model("tiny-opt")
    assert model.n_params() <= 10_000_000, model.n_params()
    assert os.path.getsize(os.path.join(TINY, "model.safetensors")) <= 20 * 2**20
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert model.config.max_position_embeddings >= 1024
    assert model.lm_head.weight is model.embed_tokens.weight, "embeddings must be tied"


def test_from_hf_matches_transformers_on_tiny_opt(hf_tiny, prompt_ids):
    model = GPT.from_hf(hf_tiny).eval()
    with torch.no_grad():
        expected = hf_tiny(prompt_ids).logits
        actual = model(prompt_ids)
    assert actual.shape == expected.shape == (1, prompt_ids.size(1), 8192)
    err = (actual - expected).abs().max().item()
    assert err <= 1e-4, f"max abs logit difference {err:.2e} > 1e-4"


def test_to_hf_round_trip(hf_tiny, prompt_ids):
    model = GPT.from_hf(hf_tiny).eval()
    hf2 = model.to_hf().eval()
    assert isinstance(hf2, OPTForCausalLM)
    with torch.no_grad():
        err = (hf2(prompt_ids).logits - model(prompt_ids)).abs().max().item()
    assert err <= 1e-4, err
    back = GPT.from_hf(hf2)
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("pre_ln, proj", [(True, None), (False, 24)])
def test_random_opt_variants_match_transformers(pre_ln, proj):
    # (False, 24): post-LN with word_embed_proj_dim != hidden_size, like OPT-350m
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3, ffn_dim=96,
                    num_attention_heads=4, max_position_embeddings=64, dropout=0.0,
                    do_layer_norm_before=pre_ln, word_embed_proj_dim=proj or 48)
    hf = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up would show
        for name, p in hf.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model = GPT.from_hf(hf).eval()
    assert (model.project_in is not None) == (proj is not None)
    assert (model.final_layer_norm is None) == (not pre_ln)
    x = torch.randint(3, 120, (2, 17))
    with torch.no_grad():
        err = (model(x) - hf(x).logits).abs().max().item()
        err_back = (model.to_hf()(x).logits - hf(x).logits).abs().max().item()
    assert err <= 1e-4 and err_back <= 1e-4, (err, err_back)


def _cached_forward(model, ids, chunks):
    """Logits of ``ids`` fed through a KV cache in pieces of the given lengths."""
    c = model.config
    cache = StandInCache(c.n_layer, ids.size(0), c.n_head, ids.size(1), c.head_dim)
    out, t = [], 0
    for n in chunks:
        out.append(model(ids[:, t:t + n], kv_cache=cache))
        t += n
        assert cache.seq_len == t, "the cache must advance after the last layer"
    return torch.cat(out, dim=1)


def test_kv_cache_token_by_token_equals_full(prompt_ids):
    model, _ = load_model("tiny-opt")
    T = prompt_ids.size(1)
    with torch.no_grad():
        full = model(prompt_ids)
        one_by_one = _cached_forward(model, prompt_ids, [1] * T)
        prefill_then_steps = _cached_forward(model, prompt_ids, [9, 5] + [1] * (T - 14))
    assert (one_by_one - full).abs().max().item() <= 1e-4
    assert (prefill_then_steps - full).abs().max().item() <= 1e-4


def test_kv_cache_post_ln_batched():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=100, max_position_embeddings=40, n_layer=2, n_head=2,
                          d_model=32, d_ff=64, do_layer_norm_before=False,
                          word_embed_proj_dim=16)).eval()
    ids = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        err = (_cached_forward(model, ids, [4, 1, 1, 7, 1, 6]) - model(ids)).abs().max().item()
    assert err <= 1e-4, err


def test_tiny_opt_far_below_unigram():
    model, _ = load_model("tiny-opt")
    ppl = data.perplexity(model, "test", seq_len=256, max_tokens=20_000)
    unigram = data.unigram_perplexity("test", max_tokens=20_000)
    # measured on the shipped checkpoint: see assets/tiny-opt/TRAINING.md
    assert ppl < unigram / 10, f"tiny-opt test perplexity {ppl:.1f} vs unigram {unigram:.1f}"


def test_perplexity_same_for_hf_and_gpt(hf_tiny):
    model = GPT.from_hf(hf_tiny).train()
    a = data.perplexity(model, "val", seq_len=128, max_tokens=3000)
    b = data.perplexity(hf_tiny, "val", seq_len=128, max_tokens=3000)
    assert abs(a - b) / b < 1e-4, (a, b)
    assert model.training, "perplexity must restore the mode it found"
    c = data.perplexity(model.eval(), "val", seq_len=128, max_tokens=3000)
    assert a == c, "perplexity must evaluate in eval mode (no dropout)"


def test_load_model_dtype():
    model, _ = load_model("tiny-opt", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_load_model_missing_checkpoint_says_how_to_get_it():
    with pytest.raises(OSError) as info:
        load_model("facebook/nonexistent-opt")
    msg = str(info.value)
    assert "not available offline" in msg and "facebook/nonexistent-opt" in msg
    assert "hf download" in msg or "from_pretrained" in msg


def test_too_long_sequence_raises():
    model = GPT(GPTConfig(vocab_size=50, max_position_embeddings=8, n_layer=1, n_head=1,
                          d_model=8, d_ff=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 9, dtype=torch.long))
