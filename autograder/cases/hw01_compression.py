"""Hidden-check cases of hw01_compression (run in the student's kernel; no answers here).

The inputs are chosen where the methods differ: weight rows of very different scales (so a
comparison per tensor and one per row pick different weights), inputs with a few large
feature columns (so Wanda's ‖X_:,j‖ reorders the weights), correlated inputs (so SparseGPT's
OBS update matters), square inputs (so a norm over the wrong axis still runs) and weights
with as many rows as columns (so a 2:4 mask over the outputs still runs). Weights are
float64 so that the masks are decided far from ties.
"""
from __future__ import annotations

import torch

from . import gen as _gen
from . import linear_names, model_outputs, tiny_opt  # the whole-model checks' model, shared with the other lab


def _rows_scaled(rows: int, cols: int, g: torch.Generator, spread: float = 1.5) -> torch.Tensor:
    """Gaussian rows whose scales span ``10**±spread/2``."""
    scale = 10 ** (spread * (torch.rand(rows, 1, generator=g, dtype=torch.float64) - 0.5))
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale


def _large_channels(n: int, d: int, g: torch.Generator, k: int = 4, size: float = 20.0) -> torch.Tensor:
    """``(n, d)`` inputs with ``k`` feature columns ``size`` times larger than the others."""
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    cols = torch.randperm(d, generator=g)[:k]
    X[:, cols] *= size
    return X


def _correlated(n: int, d: int, g: torch.Generator, rho: float = 0.9) -> torch.Tensor:
    """``(n, d)`` correlated inputs with four 5x larger features (a transformer's hidden states)."""
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = torch.eye(d, dtype=torch.float64) + rho * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    X = Z @ A
    X[:, :4] *= 5
    return X


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]                          # (cols, cols)


# --- magnitude_prune(W, sparsity, n=0, m=0) -> W_hat --------------------------------------

def inputs_magnitude_prune(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 1)
    return [dict(W=_rows_scaled(12, 32, g), sparsity=0.5, n=0, m=0),
            dict(W=_rows_scaled(10, 40, g), sparsity=0.7, n=0, m=0),
            dict(W=_rows_scaled(16, 16, g), sparsity=0.25, n=0, m=0),
            dict(W=_rows_scaled(16, 32, g), sparsity=0.5, n=2, m=4)]


def run_magnitude_prune(fn, case: dict) -> dict:
    if case["n"]:
        out = fn(case["W"].clone(), case["sparsity"], case["n"], case["m"])
    else:
        out = fn(case["W"].clone(), case["sparsity"])
    return {"W_hat": torch.as_tensor(out)}


# --- nm_mask(W, n=2, m=4) -> mask ----------------------------------------------------------

def inputs_nm_mask(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 2)
    return [dict(W=_rows_scaled(8, 32, g), n=2, m=4),
            dict(W=_rows_scaled(16, 16, g), n=2, m=4),           # square: a mask over rows runs
            dict(W=_rows_scaled(8, 32, g).abs(), n=4, m=8),      # scores (all ≥ 0)
            dict(W=_rows_scaled(12, 24, g), n=1, m=4)]


def run_nm_mask(fn, case: dict) -> dict:
    return {"mask": torch.as_tensor(fn(case["W"].clone(), case["n"], case["m"]))}


# --- wanda_prune(W, X, sparsity, n=0, m=0) -> W_hat ---------------------------------------

def inputs_wanda_prune(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 3)
    return [dict(W=_rows_scaled(16, 64, g), X=_large_channels(256, 64, g), sparsity=0.5, n=0, m=0),
            dict(W=_rows_scaled(12, 32, g), X=_large_channels(32, 32, g), sparsity=0.5, n=0, m=0),
            dict(W=_rows_scaled(10, 48, g), X=_large_channels(128, 48, g, k=6), sparsity=0.75, n=0, m=0),
            dict(W=_rows_scaled(16, 32, g), X=_large_channels(64, 32, g), sparsity=0.5, n=2, m=4)]


def run_wanda_prune(fn, case: dict) -> dict:
    if case["n"]:
        out = fn(case["W"].clone(), case["X"].clone(), case["sparsity"], case["n"], case["m"])
    else:
        out = fn(case["W"].clone(), case["X"].clone(), case["sparsity"])
    return {"W_hat": torch.as_tensor(out)}


# --- sparsegpt_prune(W, H, sparsity, n=0, m=0, block_size=128, percdamp=0.01, bits=0) ------

def inputs_sparsegpt_prune(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 4)
    base = dict(n=0, m=0, percdamp=0.01, bits=0)
    X4 = _correlated(24, 32, g)
    X4[:, 7] = 0                                             # a dead input, fewer tokens than inputs
    return [dict(base, W=_rows_scaled(16, 64, g, 0.5), X=_correlated(512, 64, g), sparsity=0.5, block_size=32),
            dict(base, W=_rows_scaled(12, 48, g, 0.5), X=_correlated(256, 48, g), sparsity=0.75, block_size=16),
            dict(base, W=_rows_scaled(8, 40, g, 0.5), X=_correlated(256, 40, g), sparsity=0.5, block_size=128),
            dict(base, W=_rows_scaled(8, 32, g, 0.5), X=X4, sparsity=0.5, block_size=16),
            dict(base, W=_rows_scaled(12, 32, g, 0.5), X=_correlated(256, 32, g), sparsity=0.5, block_size=16,
                 bits=4)]


def run_sparsegpt_prune(fn, case: dict) -> dict:
    kw = dict(block_size=case["block_size"], percdamp=case["percdamp"])
    if case["bits"]:
        kw["bits"] = case["bits"]
    out = fn(case["W"].clone(), hessian(case["X"]), case["sparsity"], case["n"], case["m"], **kw)
    return {"W_hat": torch.as_tensor(out)}


def inputs_sparsegpt_prune_nm(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 5)
    base = dict(sparsity=0.0, percdamp=0.01, bits=0)
    return [dict(base, W=_rows_scaled(16, 64, g, 0.5), X=_correlated(512, 64, g), n=2, m=4, block_size=32),
            dict(base, W=_rows_scaled(32, 32, g, 0.5), X=_correlated(256, 32, g), n=2, m=4, block_size=16),
            dict(base, W=_rows_scaled(8, 48, g, 0.5), X=_correlated(256, 48, g), n=4, m=8, block_size=16)]


run_sparsegpt_prune_nm = run_sparsegpt_prune


# --- compress_model(model, recipe, calib) -> model -----------------------------------------

def _recipe(prune=None, sparsity=0.5, n=0, m=0, quant=None, bits=4, group_size=-1):
    return dict(prune=prune, sparsity=sparsity, n=n, m=m, quant=quant, bits=bits, group_size=group_size)


def inputs_compress_model(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 6)
    calib = torch.randint(0, 128, (6, 24), generator=g)
    ids = torch.randint(0, 128, (2, 10), generator=g)
    return [dict(model_seed=seed * 10 + 1, layers=2, recipe=_recipe("wanda", 0.5), calib=calib, ids=ids),
            dict(model_seed=seed * 10 + 2, layers=3, recipe=_recipe("sparsegpt", n=2, m=4), calib=calib, ids=ids),
            dict(model_seed=seed * 10 + 3, layers=2, recipe=_recipe("sparsegpt", 0.5, quant="gptq", bits=4),
                 calib=calib, ids=ids),
            dict(model_seed=seed * 10 + 4, layers=2, recipe=_recipe("magnitude", 0.5, quant="rtn", bits=4),
                 calib=calib, ids=ids)]


def run_compress_model(fn, case: dict) -> dict:
    model = tiny_opt(case["model_seed"], case["layers"])
    out = fn(model, dict(case["recipe"]), case["calib"].clone())
    return model_outputs(model if out is None else out, case["ids"])
