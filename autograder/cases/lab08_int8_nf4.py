"""Hidden-check cases of lab08_int8_nf4 (run in the student's kernel; no answers here).

Activations get injected outlier features (whole columns 20-60x larger, as in the LLM.int8()
paper's hidden states); weights are small Gaussians with a different scale per row, so that a
scale per tensor loses the small rows. 4-bit cases have ragged last blocks, odd sizes and
(with double quantization) more than 256 blocks.
"""
from __future__ import annotations

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows_scaled(rows: int, cols: int, g: torch.Generator, spread: float = 3.0) -> torch.Tensor:
    """Gaussian rows whose scales span ``10**±spread/2``."""
    scale = 10 ** (spread * (torch.rand(rows, 1, generator=g) - 0.5))
    return torch.randn(rows, cols, generator=g) * scale


def activations_with_outliers(n: int, k: int, cols, g: torch.Generator, size: float = 30.0) -> torch.Tensor:
    """``(n, k)`` activations, |x| ≲ 4, with the feature columns ``cols`` ``size`` times larger."""
    X = torch.randn(n, k, generator=g).clamp(-4, 4)
    for c in cols:
        X[:, c] *= size
    return X


# --- absmax_quantize(x, dim) -> (x_int8, scale) -------------------------------------------

def inputs_absmax_quantize(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 1)
    X2 = _rows_scaled(9, 20, g)
    X2[4] = 0                                                # a row of zeros: scale 0, zeros
    return [dict(x=_rows_scaled(12, 40, g), dim=1),
            dict(x=_rows_scaled(30, 8, g).T.contiguous(), dim=0),   # per column
            dict(x=(_rows_scaled(16, 24, g)).half(), dim=-1),
            dict(x=X2, dim=1)]


def run_absmax_quantize(fn, case: dict) -> dict:
    x_int8, scale = fn(case["x"].clone(), dim=case["dim"])
    return {"x_int8": torch.as_tensor(x_int8), "scale": torch.as_tensor(scale)}


# --- int8_matmul(X, W) -> out ---------------------------------------------------------------

def inputs_int8_matmul(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 2)
    return [dict(X=_rows_scaled(24, 64, g), W=_rows_scaled(16, 64, g) * 0.05),
            dict(X=_rows_scaled(7, 33, g), W=_rows_scaled(40, 33, g)),
            dict(X=activations_with_outliers(32, 48, [3], g), W=_rows_scaled(12, 48, g) * 0.1)]


def run_int8_matmul(fn, case: dict) -> dict:
    return {"out": torch.as_tensor(fn(case["X"].clone(), case["W"].clone()))}


# --- llm_int8_matmul(X, W, threshold) -> out -------------------------------------------------

def inputs_llm_int8_matmul(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 3)
    cases = []
    for n, k, m, n_out, big_w, threshold in ((48, 96, 32, 3, False, 6.0), (40, 64, 24, 2, True, 6.0),
                                             (33, 80, 20, 4, True, 4.0)):
        cols = torch.randperm(k, generator=g)[:n_out].tolist()
        X = activations_with_outliers(n, k, cols, g, size=float(20 + 40 * torch.rand(1, generator=g)))
        W = torch.randn(m, k, generator=g) * 0.05
        if big_w:                                            # the weights that read an outlier
            W[:, cols] *= 10                                 # feature are larger too
        cases.append(dict(X=X, W=W, threshold=threshold))
    X = activations_with_outliers(30, 50, [], g)             # no outliers: plain int8
    cases.append(dict(X=X, W=torch.randn(10, 50, generator=g) * 0.05, threshold=6.0))
    X = activations_with_outliers(30, 50, [], g)             # one outlier in one row only
    X[7, 11] = 25.0
    cases.append(dict(X=X, W=torch.randn(10, 50, generator=g) * 0.05, threshold=6.0))
    return cases


def run_llm_int8_matmul(fn, case: dict) -> dict:
    return {"out": torch.as_tensor(fn(case["X"].clone(), case["W"].clone(), threshold=case["threshold"]))}


# --- nf4_code(offset) -> (16,) ---------------------------------------------------------------

def inputs_nf4_code(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 4)
    return [dict(offset=0.9677083), dict(offset=0.99),
            dict(offset=round(0.93 + 0.06 * float(torch.rand(1, generator=g)), 5))]


def run_nf4_code(fn, case: dict) -> dict:
    return {"code": torch.as_tensor(fn(case["offset"]))}


# --- quantize_4bit(W, blocksize, quant_type, double_quant) -> (packed, state) -----------------

def _weight(shape, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Small weights whose blocks differ in scale (columns scaled in groups of 32)."""
    W = torch.randn(shape, generator=g) * 0.02
    if W.dim() == 2:
        W = W * (1 + 4 * torch.rand(1, (W.shape[1] + 31) // 32, generator=g)).repeat_interleave(32, 1)[:, :W.shape[1]]
    return W.to(dtype)


def inputs_quantize_4bit(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 5)
    return [
        dict(W=_weight((16, 128), g), blocksize=64, quant_type="nf4", double_quant=False),
        dict(W=_weight((7, 45), g), blocksize=64, quant_type="nf4", double_quant=False),     # ragged, odd
        dict(W=_weight((12, 200), g), blocksize=64, quant_type="fp4", double_quant=False),   # ragged
        dict(W=_weight((9, 96), g, torch.float16), blocksize=128, quant_type="fp4", double_quant=False),
        dict(W=_weight((160, 136), g), blocksize=64, quant_type="nf4", double_quant=True),   # 340 blocks
        dict(W=_weight((96, 400), g), blocksize=64, quant_type="fp4", double_quant=True),    # 600 blocks
    ]


def run_quantize_4bit(fn, case: dict) -> dict:
    packed, state = fn(case["W"].clone(), blocksize=case["blocksize"], quant_type=case["quant_type"],
                       double_quant=case["double_quant"])
    out = {"packed": torch.as_tensor(packed).reshape(-1), "absmax": torch.as_tensor(state.absmax).reshape(-1)}
    if case["double_quant"]:
        offset = getattr(state, "offset", None)
        state2 = getattr(state, "state2", None)
        out["offset"] = torch.tensor(float("nan")) if offset is None else torch.as_tensor(offset).float().reshape(())
        out["absmax2"] = torch.zeros(0) if state2 is None else torch.as_tensor(state2.absmax).reshape(-1)
    return out


# --- dequantize_4bit(packed, state) -> W ------------------------------------------------------

class CaseState:
    """A quantization state with the attributes of the notebook's ``QuantState``."""

    def __init__(self, absmax, shape, dtype, blocksize, quant_type, offset=None, state2=None):
        self.absmax, self.shape, self.dtype = absmax, torch.Size(shape), dtype
        self.blocksize, self.quant_type = blocksize, quant_type
        self.offset, self.state2 = offset, state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None


_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def make_state(case: dict) -> CaseState:
    state2 = None
    if case.get("absmax2") is not None:
        state2 = CaseState(case["absmax2"].clone(), case["absmax"].shape, torch.float32, 256, "dynamic")
    return CaseState(case["absmax"].clone(), case["shape"], _DTYPES[case["dtype"]], case["blocksize"],
                     case["quant_type"], None if case.get("offset") is None else case["offset"].clone(), state2)


def inputs_dequantize_4bit(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 6)
    cases = []
    for shape, bs, qt, dtype, nested in (((8, 64), 64, "nf4", "float32", False),
                                         ((5, 27), 64, "fp4", "float32", False),     # ragged, odd
                                         ((6, 100), 32, "nf4", "float16", False),
                                         ((200, 96), 64, "nf4", "float32", True),    # 300 blocks
                                         ((3, 70), 64, "fp4", "float32", True)):
        n = shape[0] * shape[1]
        blocks = -(-n // bs)
        packed = torch.randint(0, 256, (-(-n // 2),), generator=g, dtype=torch.int64).to(torch.uint8)
        case = dict(packed=packed, shape=shape, dtype=dtype, blocksize=bs, quant_type=qt)
        if nested:
            case["absmax"] = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.int64).to(torch.uint8)
            case["absmax2"] = 0.01 + 0.05 * torch.rand(-(-blocks // 256), generator=g)
            case["offset"] = torch.tensor(0.1 + 0.1 * float(torch.rand(1, generator=g)))
        else:
            case["absmax"] = 0.01 + torch.rand(blocks, generator=g)
        cases.append(case)
    return cases


def run_dequantize_4bit(fn, case: dict) -> dict:
    return {"W": torch.as_tensor(fn(case["packed"].clone(), make_state(case)))}


# --- bytes_4bit(numel, blocksize, double_quant) -> int ----------------------------------------

def inputs_bytes_4bit(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 7)
    cases = [dict(numel=768 * 3072, blocksize=64, double_quant=False),      # OPT-125m fc1
             dict(numel=768 * 3072, blocksize=64, double_quant=True)]
    for dq in (False, True, True):
        cases.append(dict(numel=int(torch.randint(1, 5_000_000, (1,), generator=g)),
                          blocksize=int(2 ** torch.randint(5, 9, (1,), generator=g)), double_quant=dq))
    cases.append(dict(numel=65, blocksize=64, double_quant=True))
    return cases


def run_bytes_4bit(fn, case: dict) -> dict:
    return {"bytes": torch.tensor(int(fn(case["numel"], blocksize=case["blocksize"],
                                         double_quant=case["double_quant"])))}
