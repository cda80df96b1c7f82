"""Hidden-check cases of lab07_gptq (run in the student's kernel; no answers here).

Weights are float64 so that a correct implementation lands on the same grid points as the
reference (GPTQ rounds, and a rounding decision can flip on a difference in the last bit).
The model check uses a small randomly initialised HF ``OPTForCausalLM``. ``pack_codes`` gets
random integer codes of 2–8 bits, including streams that end inside a byte.
"""
from __future__ import annotations

import torch

from . import gen as _gen
from . import linear_names, model_outputs, tiny_opt  # the whole-model checks' model, shared with the other lab

from llmopt.viz.quant import correlated_inputs


def _hessian(n: int, cols: int, seed: int, dead: int | None = None) -> torch.Tensor:
    X = correlated_inputs(n, cols, seed=seed, dtype=torch.float64)
    if dead is not None:
        X[:, dead] = 0                                       # an input that never fires
    return 2 * X.T @ X / n                                   # (cols, cols)


def _weight(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, cols, generator=g, dtype=torch.float64)


# --- quantize_rtn(W, bits=4, group_size=-1, sym=False) -> (W_hat, scale, zero) -----------

def inputs_quantize_rtn(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 1)
    W3 = _weight(6, 40, g)
    W3[2] = W3[2].abs() + 0.1                                # a row with no negative weight
    W3[4] = 0                                                # a row of zeros
    return [dict(W=_weight(8, 32, g), bits=4, group_size=-1, sym=False),
            dict(W=_weight(8, 48, g), bits=3, group_size=16, sym=False),
            dict(W=W3, bits=4, group_size=-1, sym=True),
            dict(W=_weight(5, 40, g), bits=2, group_size=16, sym=False)]   # ragged last group


def run_quantize_rtn(fn, case: dict) -> dict:
    W_hat, scale, zero = fn(case["W"].clone(), bits=case["bits"], group_size=case["group_size"],
                            sym=case["sym"])
    return {"W_hat": W_hat, "scale": scale, "zero": zero}


# --- pack_codes(codes, bits) -> uint8 bytes ------------------------------------------------

def inputs_pack_codes(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 7)
    cases = []
    for bits, shape in ((4, (6, 16)), (3, (7, 9)), (2, (5, 5)), (5, (3, 11)), (8, (2, 8)),
                        (7, (1, 13)), (6, (4, 4)), (3, (1, 1))):
        cases.append(dict(codes=torch.randint(0, 2 ** bits, shape, generator=g), bits=bits))
    return cases


def run_pack_codes(fn, case: dict) -> dict:
    return {"packed": torch.as_tensor(fn(case["codes"].clone(), case["bits"]))}


# --- obs_update(w, Hinv, q, target) -> (w_new, L) -----------------------------------------

def inputs_obs_update(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 2)
    cases = []
    for d, n in ((8, 64), (16, 128), (24, 256)):
        H = _hessian(n, d, seed=seed * 10 + d)
        q = int(torch.randint(0, d, (1,), generator=g))
        w = torch.randn(d, generator=g, dtype=torch.float64)
        target = torch.round(w[q] * 4) / 4 + 0.125
        cases.append(dict(w=w, Hinv=torch.linalg.inv(H), q=q, target=target))
    return cases


def run_obs_update(fn, case: dict) -> dict:
    w_new, L = fn(case["w"].clone(), case["Hinv"].clone(), case["q"], case["target"].clone())
    return {"w_new": torch.as_tensor(w_new), "L": torch.as_tensor(L, dtype=torch.float64)}


# --- obs_quantize_columns(W, H, bits=4, group_size=-1, percdamp=.01, sym=False) -----------

def inputs_obs_quantize_columns(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 3)
    return [dict(W=_weight(8, 24, g), H=_hessian(256, 24, seed * 10 + 1), bits=4, group_size=-1),
            dict(W=_weight(8, 32, g), H=_hessian(256, 32, seed * 10 + 2), bits=3, group_size=-1),
            dict(W=_weight(6, 32, g), H=_hessian(256, 32, seed * 10 + 3), bits=3, group_size=8)]


def run_obs_quantize_columns(fn, case: dict) -> dict:
    W_hat, scale, zero = fn(case["W"].clone(), case["H"].clone(), bits=case["bits"],
                            group_size=case["group_size"])
    return {"W_hat": W_hat, "scale": scale, "zero": zero}


# --- gptq_quantize(W, H, bits, group_size, block_size, percdamp, act_order, sym) -----------

def inputs_gptq_quantize(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 4)
    base = dict(percdamp=0.01, act_order=False, sym=False)
    return [
        # several blocks: the lazy update of the rest of the matrix matters
        dict(base, W=_weight(12, 64, g), H=_hessian(512, 64, seed * 10 + 1), bits=4,
             group_size=-1, block_size=16),
        # groups inside blocks, 3 bits
        dict(base, W=_weight(12, 64, g), H=_hessian(512, 64, seed * 10 + 2), bits=3,
             group_size=16, block_size=32),
        # act-order
        dict(base, W=_weight(12, 48, g), H=_hessian(512, 48, seed * 10 + 3), bits=3,
             group_size=-1, block_size=16, act_order=True),
        # fewer tokens than inputs (singular H) and a dead input: damping must save it
        dict(base, W=_weight(8, 48, g), H=_hessian(24, 48, seed * 10 + 4, dead=5), bits=4,
             group_size=-1, block_size=16),
        # symmetric, one block wider than the matrix
        dict(base, W=_weight(8, 40, g), H=_hessian(256, 40, seed * 10 + 5), bits=4,
             group_size=-1, block_size=128, sym=True),
    ]


def run_gptq_quantize(fn, case: dict) -> dict:
    W_hat, scale, zero = fn(case["W"].clone(), case["H"].clone(), bits=case["bits"],
                            group_size=case["group_size"], block_size=case["block_size"],
                            percdamp=case["percdamp"], act_order=case["act_order"],
                            sym=case["sym"])
    return {"W_hat": W_hat, "scale": scale, "zero": zero}


# --- GPTQ(layer).add_batch(inp) -> .H ------------------------------------------------------

def inputs_GPTQ(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 5)
    return [dict(rows=6, cols=16, batches=[torch.randn(2, 5, 16, generator=g) for _ in range(3)]),
            dict(rows=4, cols=8, batches=[torch.randn(7, 8, generator=g),
                                          torch.randn(1, 3, 8, generator=g)])]


def run_GPTQ(cls, case: dict) -> dict:
    layer = torch.nn.Linear(case["cols"], case["rows"], bias=False)
    g = cls(layer)
    for x in case["batches"]:
        g.add_batch(x.clone())
    return {"H": torch.as_tensor(g.H)}


# --- quantize_model(model, method, calib, bits, group_size) -> model -----------------------

def inputs_quantize_model(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 6)
    calib = torch.randint(0, 128, (6, 24), generator=g)
    ids = torch.randint(0, 128, (2, 10), generator=g)
    return [dict(model_seed=seed * 10 + 1, layers=3, method="gptq", calib=calib, ids=ids, bits=3, group_size=-1),
            dict(model_seed=seed * 10 + 2, layers=2, method="gptq", calib=calib, ids=ids, bits=4, group_size=16),
            dict(model_seed=seed * 10 + 3, layers=2, method="rtn", calib=calib, ids=ids, bits=3, group_size=-1)]


def run_quantize_model(fn, case: dict) -> dict:
    model = tiny_opt(case["model_seed"], case["layers"])
    out = fn(model, case["method"], case["calib"].clone(), case["bits"], case["group_size"])
    return model_outputs(model if out is None else out, case["ids"])
