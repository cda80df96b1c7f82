"""Hidden-check cases of lab04_flash_attention (run in the student's kernel; no answers here).

Fresh random inputs per seed: ragged lengths (not multiples of any block size), several
head dims (one not a power of two), fp32/fp16/bf16, causal and not. Small enough for
Triton's CPU interpreter.
"""
from __future__ import annotations

import contextlib

import torch

from . import DTYPES as _DTYPES, gen as _gen, randint as _randint


def _qkv(g, B, H, N, d, dtype="float32", n_k=None):
    shapes = [(B, H, N, d), (B, H, n_k or N, d), (B, H, n_k or N, d)]
    return {name: torch.randn(s, generator=g).to(_DTYPES[dtype])
            for name, s in zip("qkv", shapes)}


# --- block_sizes(sram_bytes, d, bytes_per_el) -> (B_r, B_c) ------------------------------

_SRAM = (228 * 1024, 164 * 1024, 100 * 1024, 48 * 1024)   # H100/H200, A100, RTX 4090, older GPUs


def inputs_block_sizes(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = [dict(sram_bytes=228 * 1024, d=(64, 128)[_randint(g, 0, 1)], bytes_per_el=4),
             dict(sram_bytes=228 * 1024, d=128, bytes_per_el=2),
             dict(sram_bytes=1000 + 4 * _randint(g, 0, 50), d=48, bytes_per_el=4)]  # tiny: ⌈·⌉ shows
    for _ in range(3):
        cases.append(dict(sram_bytes=_SRAM[_randint(g, 0, len(_SRAM) - 1)],
                          d=(16, 32, 48, 64, 80, 96, 128, 256)[_randint(g, 0, 7)],
                          bytes_per_el=(2, 4)[_randint(g, 0, 1)]))
    return cases


def run_block_sizes(fn, case: dict) -> dict:
    B_r, B_c = fn(case["sram_bytes"], case["d"], case["bytes_per_el"])
    return {"blocks": torch.tensor([float(B_r), float(B_c)], dtype=torch.float64)}


# --- merge_softmax_stats(m1, l1, m2, l2) -> (m, l) --------------------------------------

def inputs_merge_softmax_stats(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for rows, width, spread in ((6, 8, 1.0), (5, 16, 10.0), (4, 3, 30.0)):
        x1 = torch.randn(rows, width, generator=g, dtype=torch.float64) * spread
        x2 = torch.randn(rows, width, generator=g, dtype=torch.float64) * spread + spread
        m1, m2 = x1.max(-1).values, x2.max(-1).values
        l1 = torch.exp(x1 - m1[:, None]).sum(-1)
        l2 = torch.exp(x2 - m2[:, None]).sum(-1)
        cases.append(dict(m1=m1, l1=l1, m2=m2, l2=l2))
    # the running state starts at m = -inf, ℓ = 0: merging a block into it gives that block
    c = cases[0]
    cases.append(dict(m1=torch.full_like(c["m1"], float("-inf")), l1=torch.zeros_like(c["l1"]),
                      m2=c["m2"], l2=c["l2"]))
    return cases


def run_merge_softmax_stats(fn, case: dict) -> dict:
    m, l = fn(case["m1"], case["l1"], case["m2"], case["l2"])
    return {"m": m, "l": l}


# --- online_softmax(x, block_size) -> softmax(x, dim=-1) -------------------------------

def inputs_online_softmax(seed: int) -> list[dict]:
    g = _gen(seed)
    return [dict(x=torch.randn(3, _randint(g, 20, 60), generator=g), block_size=8),
            dict(x=torch.randn(2, 4, _randint(g, 33, 70), generator=g) * 40, block_size=16),
            dict(x=torch.randn(5, _randint(g, 5, 12), generator=g), block_size=32)]


def run_online_softmax(fn, case: dict) -> dict:
    return {"p": fn(case["x"].clone(), case["block_size"])}


# --- softmax_triton(x, block_size) -> softmax(x, dim=-1), the warm-up Triton kernel ------

def inputs_softmax_triton(seed: int) -> list[dict]:
    g = _gen(seed)
    return [dict(x=torch.randn(4, _randint(g, 100, 200), generator=g), block_size=32,
                 dtype="float32"),
            dict(x=torch.randn(3, _randint(g, 40, 70), generator=g) * 30, block_size=16,
                 dtype="float32"),                                       # the max moves often
            dict(x=(torch.randn(2, 3, _randint(g, 20, 40), generator=g) * 4).half(), block_size=16,
                 dtype="float16"),
            dict(x=(torch.randn(3, _randint(g, 65, 127), generator=g) * 4).bfloat16(),
                 block_size=64, dtype="bfloat16"),
            dict(x=torch.randn(5, _randint(g, 5, 12), generator=g) - 8, block_size=64,
                 dtype="float32")]                                       # one ragged tile, all < 0


def run_softmax_triton(fn, case: dict) -> dict:
    with _spy() as seen:
        p = fn(case["x"].clone(), case["block_size"])
    return {"p": p, **seen}


# --- flash_attention_v1_torch(q, k, v, block_q, block_k) -> O ---------------------------

def inputs_flash_attention_v1_torch(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for N, d, bq, bk in ((_randint(g, 40, 90), 16, 16, 16), (_randint(g, 20, 40), 32, 8, 16),
                         (_randint(g, 5, 15), 24, 16, 16)):
        cases.append(dict(**_qkv(g, 2, 2, N, d), block_q=bq, block_k=bk))
    cases[0]["q"] = cases[0]["q"] * 3  # large scores: the running max changes often
    return cases


def run_flash_attention_v1_torch(fn, case: dict) -> dict:
    return {"o": fn(case["q"], case["k"], case["v"], block_q=case["block_q"],
                    block_k=case["block_k"])}


# --- flash_attention_torch(q, k, v, causal, block_q, block_k) -> (O, L) -----------------

def inputs_flash_attention_torch(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for N, d, causal, bq, bk in ((_randint(g, 40, 90), 16, False, 16, 16),
                                 (_randint(g, 40, 90), 32, True, 16, 8),
                                 (_randint(g, 20, 40), 24, True, 32, 32),
                                 (_randint(g, 5, 15), 16, False, 16, 16)):
        cases.append(dict(**_qkv(g, 2, 2, N, d), causal=causal, block_q=bq, block_k=bk))
    cases[0]["q"] = cases[0]["q"] * 3
    return cases


def run_flash_attention_torch(fn, case: dict) -> dict:
    o, lse = fn(case["q"], case["k"], case["v"], causal=case["causal"],
                block_q=case["block_q"], block_k=case["block_k"])
    return {"o": o, "lse": lse}


# --- flash_attention_fwd(q, k, v, causal=False, scale=None) -> (O, L), Triton -----------

def _fwd_cases(g, causal):
    cases = []
    for dtype, N, d, scale in (("float32", _randint(g, 65, 100), 64, None),
                               ("float16", _randint(g, 30, 64), 16, None),
                               ("bfloat16", _randint(g, 65, 100), 32, None),
                               ("float32", _randint(g, 10, 30), 48, 0.3),
                               ("float32", 64, 128, None)):
        cases.append(dict(**_qkv(g, 1, 2, N, d, dtype), causal=causal, scale=scale,
                          dtype=dtype))
    return cases


def inputs_flash_attention_fwd(seed: int) -> list[dict]:
    return _fwd_cases(_gen(seed), causal=False)


def inputs_flash_attention_fwd_causal(seed: int) -> list[dict]:
    return _fwd_cases(_gen(seed + 1), causal=True)


# torch functions that compute attention (or its pieces) outside a Triton kernel
_TORCH_ATTENTION_OPS = {"scaled_dot_product_attention", "softmax", "log_softmax", "logsumexp",
                        "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "einsum",
                        "exp", "exp_", "exp2"}


@contextlib.contextmanager
def _spy():
    """Count Triton launches (kernel[grid](...)) and torch's attention functions while the
    student's code runs. Only a way to fail lazy shortcuts early, with a clear message: the
    kernel can patch anything, so a pass rests on the trusted reading of the notebook's code
    (autograder/static.py) and on the values."""
    from torch.overrides import TorchFunctionMode
    from triton.runtime.jit import KernelInterface

    seen = {"launches": 0, "torch_ops": 0}
    getitem = KernelInterface.__getitem__

    def counting_getitem(self, grid):
        launch = getitem(self, grid)

        def counted(*args, **kwargs):
            seen["launches"] += 1
            return launch(*args, **kwargs)
        return counted

    class CountTorch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in _TORCH_ATTENTION_OPS:
                seen["torch_ops"] += 1
            return func(*args, **(kwargs or {}))

    KernelInterface.__getitem__ = counting_getitem
    try:
        with CountTorch():
            yield seen
    finally:
        KernelInterface.__getitem__ = getitem


def run_flash_attention_fwd(fn, case: dict) -> dict:
    with _spy() as seen:
        o, lse = fn(case["q"], case["k"], case["v"], causal=case["causal"], scale=case["scale"])
    return {"o": o, "lse": lse, **seen}


run_flash_attention_fwd_causal = run_flash_attention_fwd


# --- flash_attention(q, k, v, causal=False, scale=None) -> O, with backward --------------

def inputs_flash_attention(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for dtype, N, d, causal, scale in (("float32", _randint(g, 30, 70), 16, False, None),
                                       ("float32", _randint(g, 65, 100), 64, True, None),
                                       ("float16", _randint(g, 30, 64), 32, True, None),
                                       ("bfloat16", _randint(g, 30, 64), 32, False, None),
                                       ("float32", _randint(g, 10, 30), 48, True, 0.3)):
        qkv = _qkv(g, 1, 2, N, d, dtype)
        cases.append(dict(**qkv, do=torch.randn(1, 2, N, d, generator=g).to(_DTYPES[dtype]),
                          causal=causal, scale=scale, dtype=dtype))
    return cases


def run_flash_attention(fn, case: dict) -> dict:
    q, k, v = (case[n].clone().requires_grad_() for n in "qkv")
    with _spy() as seen:
        o = fn(q, k, v, causal=case["causal"], scale=case["scale"])
        o.backward(case["do"])
    return {"o": o, "dq": q.grad, "dk": k.grad, "dv": v.grad, **seen}


# --- what flash_attention keeps for its backward ----------------------------------------

def inputs_flash_attention_saved(seed: int) -> list[dict]:
    g = _gen(seed)
    return [dict(**_qkv(g, 2, 3, _randint(g, 20, 40), 16), causal=causal) for causal in (False, True)]


def _saved_tensors(grad_fn) -> list:
    """ctx.save_for_backward's tensors and tensors stored as attributes of ctx."""
    found = list(getattr(grad_fn, "saved_tensors", ()) or ())
    for value in getattr(grad_fn, "__dict__", {}).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        found += [t for t in items if isinstance(t, torch.Tensor)]
    return found


def run_flash_attention_saved(fn, case: dict) -> dict:
    q, k, v = (case[n].clone().requires_grad_() for n in "qkv")
    o = fn(q, k, v, causal=case["causal"])
    if o.grad_fn is None:
        raise RuntimeError("the output has no grad_fn: is flash_attention an autograd.Function?")
    saved = _saved_tensors(o.grad_fn)
    shapes = torch.full((max(len(saved), 1), 5), -1, dtype=torch.int64)
    for i, t in enumerate(saved):
        shapes[i, :t.dim()] = torch.tensor(t.shape[:5])
    holds_o = any(t.shape == o.shape and torch.equal(t.detach(), o.detach()) for t in saved)
    return {"shapes": shapes, "n_saved": len(saved), "holds_o": holds_o}
