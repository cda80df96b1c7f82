"""What each hidden check calls, per lab: ``inputs_<check>(seed)`` and ``run_<check>(fn, case)``.

These modules run inside the student's kernel. They hold no expected values and never
import the module under study.
"""
from __future__ import annotations

import torch

# dtypes by name: cases hold plain values, so a dtype travels as its name
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


def gen(seed: int) -> torch.Generator:
    """The random generator of a check's cases: the same cases for the same seed."""
    return torch.Generator().manual_seed(seed)


def randint(g: torch.Generator, lo: int, hi: int) -> int:
    """One integer in [lo, hi) from ``g``."""
    return int(torch.randint(lo, hi, (1,), generator=g))


def tiny_opt(seed: int, layers: int = 2):
    """A small HF OPTForCausalLM with weights drawn from ``seed`` (the same everywhere): the
    model the quantization and compression labs' whole-model checks run on."""
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=layers, ffn_dim=64,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    model = OPTForCausalLM(cfg).eval()
    g = gen(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def linear_names(model) -> list[str]:
    """The decoder layers' linear modules of ``model``, by name."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n]


def model_outputs(model, ids) -> dict:
    """What a whole-model check records: the logits of ``ids`` and every decoder linear's weight."""
    with torch.no_grad():
        res = {"logits": model(ids).logits.float()}
    mods = dict(model.named_modules())
    for n in linear_names(model):
        res["w." + n] = mods[n].weight.detach().float()
    return res
