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
