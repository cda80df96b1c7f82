"""How each hidden check is judged, per lab: ``verify_<check>(case, outputs) -> str | None``.

These modules run only in the trusted grading process, never in a student's kernel.
"""
from __future__ import annotations

import torch

from ..cases import linear_names, tiny_opt


def not_finite(out: dict, hint: str = "") -> str | None:
    """A message if an output holds NaN or ±inf (``x > tol`` is False for NaN: check first):
    which output, how many entries, the first one's index, and ``hint``."""
    for name, t in out.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            bad = ~torch.isfinite(t)
            kind = "NaN" if torch.isnan(t).any() else "inf"
            idx = tuple(int(i) for i in bad.nonzero()[0])
            return (f"{name} contains {kind} ({int(bad.sum())} of {t.numel()} entries, first at "
                    f"index {idx}){hint}")
    return None


def model_output_spec(case: dict) -> dict:
    """OUTPUTS of a whole-model check (``cases.model_outputs``): logits and every decoder
    linear's weight of the case's ``tiny_opt``, with their shapes."""
    model = tiny_opt(case["model_seed"], case["layers"])
    mods = dict(model.named_modules())
    out = {"logits": ("float", (*case["ids"].shape, model.config.vocab_size))}
    out.update({"w." + n: ("float", tuple(mods[n].weight.shape)) for n in linear_names(model)})
    return out
