"""How the hidden checks of lab04_flash_attention are judged (trusted side; never in the kernel).

References are computed in float64 from the inputs that ``inputs_X(seed)`` draws again,
then cast to the case's dtype; tolerances are ``llmopt.testing``'s per dtype, with the
absolute part scaled by the largest reference value (gradients get twice that). When an
output is wrong, the message tries the mistakes of course/mistakes.md and names the one that fits.
"""
from __future__ import annotations

import math

import torch

from llmopt.testing import compare, tolerance

from .. import static

# The sandbox shows these llmopt modules (and what they import); flash_attention stays hidden.
LLMOPT_VISIBLE = ["bench", "testing", "viz.tiling"]


def _scores(q, k, scale):
    return q.double() @ k.double().transpose(-2, -1) * scale


def _attention(q, k, v, causal, scale, strict=False):
    """(O, L) in float64; ``strict`` drops the diagonal too (the off-by-one mistake)."""
    s = _scores(q, k, scale)
    if causal:
        n_q, n_k = s.shape[-2:]
        keep = torch.ones(n_q, n_k, dtype=torch.bool).tril(-1 if strict else 0)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def _compare(got, expected, dtype, name, factor=1.0):
    rtol, atol = tolerance(dtype)
    atol *= factor * max(1.0, expected.abs().max().item())
    if isinstance(got, torch.Tensor) and got.is_floating_point():
        if got.dtype != dtype:
            return f"{name}: dtype {got.dtype}, expected {dtype} (the dtype of the inputs)"
        got = got.double()
    return compare(got, expected, rtol=rtol * factor, atol=atol, name=name, check_dtype=False)


def _close(a, b, rtol=2e-2):
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=rtol, atol=rtol)


def _where(case):
    q = case["q"]
    B, H, N, d = q.shape
    extra = f", causal={case['causal']}" if "causal" in case else ""
    return f"(B={B}, H={H}, N={N}, d={d}, {str(q.dtype).replace('torch.', '')}{extra})"


def _attention_hints(case, o, scale):
    """Name the mistake when ``o`` equals a known wrong variant of attention."""
    q, k, v = case["q"], case["k"], case["v"]
    causal = case.get("causal", False)
    if not isinstance(o, torch.Tensor) or o.shape != q.shape:
        return ""
    d = q.shape[-1]
    for wrong, hint in ((1.0, "the scores are not scaled: S = QKᵀ/√d"),
                        (scale * scale, "the scale 1/√d is applied twice"),
                        (scale * math.sqrt(d), "the scale should be 1/√d, not √d")):
        if _close(o, _attention(q, k, v, causal, wrong)[0]):
            return " — " + hint
    if causal:
        if _close(o[..., 1:, :], _attention(q, k, v, True, scale, strict=True)[0][..., 1:, :]):
            return " — the causal mask is off by one: row i sees keys j ≤ i, the diagonal included"
        if _close(o, _attention(q, k, v, False, scale)[0]):
            return " — the causal mask is missing"
    elif _close(o, _attention(q, k, v, True, scale)[0]):
        return " — the output is causal, but causal=False was asked for"
    # O parallel to the right rows but shorter: padded keys took part in ℓ (scores 0, not -inf)
    g, e = o.double(), _attention(q, k, v, causal, scale)[0]
    ratio = (g * e).sum(-1) / (e * e).sum(-1).clamp_min(1e-30)
    resid = (g - ratio[..., None] * e).norm() / e.norm().clamp_min(1e-30)
    if resid < 0.02 and ratio.min() < 0.98 and ratio.max() < 1.01:
        return (" — every row is too small by a factor: the padded keys of the last, partial "
                "block count in ℓ. Fill their scores with -inf (e^-inf = 0), not 0 (e^0 = 1)")
    if q.dtype == torch.bfloat16:
        return (" — bf16 arithmetic is wrong in Triton's CPU interpreter: convert every tile "
                "to fp32 right after tl.load (.to(tl.float32))")
    if q.shape[2] > 16:
        return (" — right for one block but not for several? When the running max m changes, "
                "the old O (and ℓ) must be rescaled by e^{m_old - m_new}")
    return ""


# --- part 1: the lecture's block sizes ---------------------------------------------------

def _blocks(sram_bytes, d, bytes_per_el, ceil=True, in_bytes=False, use_min=True, paren=True):
    """(B_r, B_c) by the lecture's rule, or by one of its usual misreadings."""
    M = sram_bytes if in_bytes else sram_bytes // bytes_per_el
    x = M / (4 * d) if paren else M / 4 * d
    B_c = math.ceil(x) if ceil else math.floor(x)
    return (min(B_c, d) if use_min else B_c), B_c


def verify_block_sizes(case: dict, out: dict) -> str | None:
    sram, d, b = case["sram_bytes"], case["d"], case["bytes_per_el"]
    got = out["blocks"].double()
    where = f"block_sizes(sram_bytes={sram}, d={d}, bytes_per_el={b})"
    if got.shape != (2,):
        return f"{where}: return two numbers (B_r, B_c), got {tuple(got.shape)}"
    if not torch.isfinite(got).all():
        return f"{where}: NaN or infinite (B_c = ⌈M / 4d⌉ is a finite whole number)"
    if (got != got.round()).any():
        return f"{where} returned a fraction: block sizes are whole numbers of rows, B_c = ⌈M / 4d⌉"
    B_r, B_c = (int(x) for x in got.tolist())
    want = _blocks(sram, d, b)
    if (B_r, B_c) == want:
        return None
    msg = f"{where}: (B_r, B_c) is wrong"
    if (B_c, B_r) == want:
        return msg + " — the order is (B_r, B_c): query rows first, then key columns"
    for kw, hint in ((dict(ceil=False), "⌈M / 4d⌉ rounds up, not down"),
                     (dict(in_bytes=True), "M counts numbers, not bytes: M = sram_bytes // bytes_per_el"),
                     (dict(use_min=False), "B_r = min(⌈M / 4d⌉, d): a Q block is at most d rows"),
                     (dict(paren=False), "the rule divides by 4d: ⌈M / (4·d)⌉, not M / 4 · d")):
        if (B_r, B_c) == _blocks(sram, d, b, **kw) and _blocks(sram, d, b, **kw) != want:
            return msg + " — " + hint
    return msg + " — the lecture's step 1: B_c = ⌈M / 4d⌉, B_r = min(⌈M / 4d⌉, d), M in numbers"


# --- part 2: online softmax --------------------------------------------------------------

def verify_merge_softmax_stats(case: dict, out: dict) -> str | None:
    m1, l1, m2, l2 = case["m1"], case["l1"], case["m2"], case["l2"]
    m = torch.maximum(m1, m2)
    l = torch.exp(m1 - m) * l1 + torch.exp(m2 - m) * l2
    msg = compare(out["m"].double(), m, rtol=1e-6, atol=1e-9, name="m", check_dtype=False)
    if msg:
        return msg + " — m([x¹ x²]) = max(m(x¹), m(x²))"
    msg = compare(out["l"].double(), l, rtol=1e-6, atol=1e-9, name="ℓ", check_dtype=False)
    if msg:
        if _close(out["l"], l1 + l2, 1e-6):
            return msg + " — each ℓ must be rescaled by e^{m_half - m} before adding"
        if torch.isnan(out["l"]).any():
            return msg + (" — NaN: merging into the empty state (m = -inf, ℓ = 0) must give "
                          "the other half; -inf - (-inf) is NaN")
        return msg + " — ℓ = e^{m¹-m}·ℓ¹ + e^{m²-m}·ℓ²"
    return None


def verify_online_softmax(case: dict, out: dict) -> str | None:
    x = case["x"]
    expected = torch.softmax(x.double(), -1)
    msg = compare(out["p"].double(), expected, rtol=1e-4, atol=1e-6, name="softmax",
                  check_dtype=False)
    if msg and out["p"].shape == x.shape:
        sums = out["p"].double().sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            msg += " — rows do not sum to 1: divide by the merged ℓ of ALL blocks"
        elif x.shape[-1] > case["block_size"]:
            msg += " — the blocks' statistics must be merged (rescaled to the common max m)"
    return msg


# --- part 4: the warm-up Triton kernel ---------------------------------------------------

def _softmax_tail_zero(x, block):
    """softmax with the ragged tile's padding loaded as 0 (counted in m and ℓ)."""
    pad = -x.shape[-1] % block
    xp = torch.cat([x.double(), x.new_zeros(*x.shape[:-1], pad, dtype=torch.float64)], -1)
    return torch.softmax(xp, -1)[..., :x.shape[-1]]


def _softmax_no_rescale(x, block):
    """The online softmax with ℓ summed over tiles without the factor e^{m_old - m_new}."""
    x = x.double()
    m = torch.full(x.shape[:-1], float("-inf"), dtype=torch.float64)
    l = torch.zeros(x.shape[:-1], dtype=torch.float64)
    for j in range(0, x.shape[-1], block):
        m = torch.maximum(m, x[..., j:j + block].max(-1).values)
        l = l + torch.exp(x[..., j:j + block] - m[..., None]).sum(-1)
    return torch.exp(x - m[..., None]) / l[..., None]


def verify_softmax_triton(case: dict, out: dict) -> str | None:
    x, block = case["x"], case["block_size"]
    where = f"softmax {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}, block_size={block}"
    expected = torch.softmax(x.double(), -1).to(x.dtype).double()
    msg = _compare(out["p"], expected, x.dtype, where)
    if msg:
        p = out["p"]
        if isinstance(p, torch.Tensor) and p.shape == x.shape and p.is_floating_point():
            if _close(p, _softmax_tail_zero(x, block), 1e-2):
                msg += (" — the padded columns of the last, ragged tile count in m and ℓ: load them as"
                        " -inf (other=float('-inf'): e^-inf = 0), not 0 (e^0 = 1)")
            elif x.shape[-1] > block and _close(p, _softmax_no_rescale(x, block), 1e-2):
                msg += (" — ℓ must be rescaled when the running max grows:"
                        " ℓ ← e^{m_old - m_new}·ℓ + Σ e^{x - m_new}")
            elif x.dtype == torch.bfloat16:
                msg += (" — bf16 arithmetic is wrong in Triton's CPU interpreter: convert the tile"
                        " to fp32 right after tl.load (.to(tl.float32))")
            elif x.shape[-1] > block:
                msg += " — each tile's (m, ℓ) must be merged into the row's, then e^{x - m}/ℓ written"
        return msg
    return _spied(out, "softmax_triton")


# --- part 3: tiled forward in PyTorch ----------------------------------------------------

def verify_flash_attention_v1_torch(case: dict, out: dict) -> str | None:
    q = case["q"]
    scale = q.shape[-1] ** -0.5
    o_ref, _ = _attention(q, case["k"], case["v"], False, scale)
    msg = _compare(out["o"], o_ref.to(q.dtype).double(), q.dtype, f"O {_where(case)}")
    return msg and msg + _attention_hints(case, out["o"], scale)


def _lse_hint(case, lse, scale):
    q, k = case["q"], case["k"]
    n_k = k.shape[2]
    for bk in (case.get("block_k"), 16, 32, 64, 128):
        if bk and bk < n_k:
            last = (n_k - 1) // bk * bk
            s = _scores(q, k[:, :, :last], scale)
            if case.get("causal"):
                s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
            early = torch.logsumexp(s, -1)
            rows = torch.isfinite(early)
            if rows.any() and _close(lse[rows], early[rows], 1e-3):
                return " — L is taken before the last K/V block: compute m + log ℓ after the loop"
    return " — L = m + log ℓ (natural log) of each row, shape (B, H, N), fp32"


def verify_flash_attention_torch(case: dict, out: dict) -> str | None:
    q = case["q"]
    scale = q.shape[-1] ** -0.5
    o_ref, lse_ref = _attention(q, case["k"], case["v"], case["causal"], scale)
    msg = _compare(out["o"], o_ref.to(q.dtype).double(), q.dtype, f"O {_where(case)}")
    if msg:
        return msg + _attention_hints(case, out["o"], scale)
    msg = compare(out["lse"].double(), lse_ref, rtol=1e-4, atol=1e-4, name=f"L {_where(case)}",
                  check_dtype=False)
    return msg and msg + _lse_hint(case, out["lse"], scale)


# --- part 4: Triton ----------------------------------------------------------------------

def _spied(out: dict, fn: str) -> str | None:
    """What the in-kernel counters saw (an extra, early failure; never a reason to pass)."""
    if int(out["launches"]) <= 0:
        return (f"no Triton kernel was launched while {fn} ran: the Triton parts must run your "
                "@triton.jit kernels (kernel[grid](...))")
    if int(out["torch_ops"]) > 0:
        return (f"{fn} called torch's softmax/matmul/exp/scaled_dot_product_attention "
                f"{int(out['torch_ops'])} time(s): compute attention inside your Triton kernels")
    return None


def verify_flash_attention_fwd(case: dict, out: dict) -> str | None:
    q = case["q"]
    scale = q.shape[-1] ** -0.5 if case["scale"] is None else case["scale"]
    o_ref, lse_ref = _attention(q, case["k"], case["v"], case["causal"], scale)
    msg = _compare(out["o"], o_ref.to(q.dtype).double(), q.dtype, f"O {_where(case)}")
    if msg:
        return msg + _attention_hints(case, out["o"], scale)
    low = q.dtype != torch.float32
    msg = compare(out["lse"].double(), lse_ref, rtol=1e-2 if low else 1e-4,
                  atol=1e-2 if low else 1e-4, name=f"L {_where(case)}", check_dtype=False)
    if msg is None and out["lse"].dtype != torch.float32:
        msg = f"L: dtype {out['lse'].dtype}, expected torch.float32"
    return msg + _lse_hint(case, out["lse"], scale) if msg else _spied(out, "flash_attention_fwd")


verify_flash_attention_fwd_causal = verify_flash_attention_fwd


def verify_flash_attention(case: dict, out: dict) -> str | None:
    q, k, v = (case[n].double().requires_grad_() for n in "qkv")
    dtype = case["q"].dtype
    scale = q.shape[-1] ** -0.5 if case["scale"] is None else case["scale"]
    o_ref, _ = _attention(q, k, v, case["causal"], scale)
    grads = torch.autograd.grad(o_ref, (q, k, v), case["do"].double())
    msg = _compare(out["o"], o_ref.detach().to(dtype).double(), dtype, f"O {_where(case)}")
    if msg:
        return msg + _attention_hints(case, out["o"], scale)
    for name, g in zip(("dQ", "dK", "dV"), grads):
        msg = _compare(out[name.lower()], g.to(dtype).double(), dtype, f"{name} {_where(case)}",
                       factor=2.0)
        if msg:
            hint = {"dV": " — dV = Pᵀ dO with P = exp(S·scale - L) recomputed from the saved L",
                    "dK": " — dK = scale · dSᵀ Q with dS = P ∘ (dP - rowsum(dO ∘ O))",
                    "dQ": " — dQ = scale · dS K with dS = P ∘ (dP - rowsum(dO ∘ O))"}[name]
            if dtype == torch.bfloat16:
                hint += "; in the interpreter, convert bf16 tiles to fp32 after tl.load"
            return msg + hint
    return _spied(out, "flash_attention")


def verify_flash_attention_saved(case: dict, out: dict) -> str | None:
    B, H, N, d = case["q"].shape
    if any(out[k].is_floating_point() for k in ("shapes", "n_saved", "holds_o")):
        return "shapes, n_saved and holds_o must be recorded as integers (see run_flash_attention_saved)"
    shapes = [tuple(int(x) for x in row if x >= 0) for row in out["shapes"].tolist()]
    shapes = shapes[:int(out["n_saved"])]
    big = [s for s in shapes if len(s) >= 2 and s[-1] == N and s[-2] == N]
    if big:
        return (f"the backward keeps an N×N tensor {big[0]}: save only O and L = m + log ℓ, "
                "and recompute P = exp(S - L) block by block in the backward")
    lse = [s for s in shapes if s == (B, H, N)]
    if len(lse) != 1:
        return (f"saved tensors have shapes {shapes}: save exactly one log-sum-exp tensor of "
                f"shape (B, H, N) = {(B, H, N)} (not m and ℓ separately)")
    if not bool(out["holds_o"]):
        return "O is not among the saved tensors: the backward needs it for rowsum(dO ∘ O)"
    other = [s for s in shapes if s not in ((B, H, N), (B, H, N, d))]
    if other or len(shapes) > 5:
        return (f"saved tensors have shapes {shapes}: keep only Q, K, V, O and one L of shape "
                f"{(B, H, N)}")
    return None


# --- how the Triton parts must be computed (read from the notebook's source, see static.py) --

# Host code of the Triton parts allocates outputs and launches kernels; the attention itself
# (scores, exponentials, products with V) happens inside @triton.jit code.
_TORCH_ATTENTION = (
    "*attention*", "scaled_dot_product_attention", "*softmax*", "softmax", "log_softmax",
    "softmin", "*logsumexp*", "logsumexp", "logaddexp*", "logaddexp", "logaddexp2",
    "*matmul*", "matmul", "mm", "bmm", "*addmm", "addmm", "*addbmm", "addbmm", "baddbmm", "*mv",
    "mv", "addmv", "einsum", "tensordot",
    "inner", "outer", "dot", "vdot", "kron", "addr", "ger", "conv*", "linear", "bilinear",
    "exp", "exp_", "exp2", "exp2_", "expm1", "expm1_", "ldexp", "pow", "pow_", "float_power",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "sinh", "cosh", "elu", "celu", "selu", "softplus",
    "torch.nn", "torch.special", "torch.linalg", "torch.distributions", "torch.func",
    "torch.fft", "torch.ops", "torch.library", "torch.compile", "torch.jit", "torch.utils",
    "torch.hub", "torch.load", "torch.sparse", "torch.nested", "torch.masked", "torch._C",
    "@", "**")
_WHY_TRITON = (": in the Triton parts, scores, softmax and the products with V are computed "
               "inside your @triton.jit kernels; the host code only allocates outputs and "
               "launches them")
_HOST_MODULES = ("torch", "math", "functools", "typing", "os.environ", "triton.jit",
                 "triton.cdiv", "triton.next_power_of_2", "triton.autotune", "triton.heuristics",
                 "triton.Config", "triton.language", "llmopt.testing")


def _triton_part(fn, ops=("load", "store", "dot")):
    return (fn, [static.no_dynamic_access(), static.no_llmopt_imports(allowed=("llmopt.testing",)),
                 static.imports_only(*_HOST_MODULES), static.launches_triton_kernel(ops),
                 static.forbids(*_TORCH_ATTENTION, why=_WHY_TRITON)])


def _torch_part(fn, *extra):
    return (fn, [static.no_dynamic_access(), static.no_llmopt_imports(allowed=("llmopt.testing",)),
                 static.forbids(*extra, why=": this part asks for your own blockwise computation")])


_SHORTCUTS = ("*softmax*", "softmax", "log_softmax", "softmin", "*logsumexp*", "logsumexp",
              "*attention*", "scaled_dot_product_attention")
METHOD = {
    "block_sizes": _torch_part("block_sizes"),
    "softmax_triton": _triton_part("softmax_triton", ops=("load", "store")),
    "merge_softmax_stats": _torch_part("merge_softmax_stats", *_SHORTCUTS),
    "online_softmax": _torch_part("online_softmax", *_SHORTCUTS),
    "flash_attention_v1_torch": _torch_part("flash_attention_v1_torch", *_SHORTCUTS),
    "flash_attention_torch": _torch_part("flash_attention_torch", *_SHORTCUTS),
    "flash_attention_fwd": _triton_part("flash_attention_fwd"),
    "flash_attention_fwd_causal": _triton_part("flash_attention_fwd"),
    "flash_attention": _triton_part("flash_attention"),
    "flash_attention_saved": _triton_part("flash_attention"),
}


# --- what each run_X records: {key: (kind, shape)}, checked before anything is computed ----

_COUNTERS = {"launches": ("int", ()), "torch_ops": ("int", ())}   # see cases' _spy


def _qkv_like(inp, *keys):
    return {k: ("float", tuple(inp[n].shape)) for k, n in keys}


OUTPUTS = {
    "block_sizes": lambda inp: {"blocks": ("float", (None,))},
    "softmax_triton": lambda inp: {"p": ("float", tuple(inp["x"].shape)), **_COUNTERS},
    "merge_softmax_stats": lambda inp: {"m": ("float", tuple(inp["m1"].shape)),
                                        "l": ("float", tuple(inp["m1"].shape))},
    "online_softmax": lambda inp: {"p": ("float", tuple(inp["x"].shape))},
    "flash_attention_v1_torch": lambda inp: _qkv_like(inp, ("o", "q")),
    "flash_attention_torch": lambda inp: {**_qkv_like(inp, ("o", "q")),
                                          "lse": ("float", tuple(inp["q"].shape[:3]))},
    "flash_attention_fwd": lambda inp: {**_qkv_like(inp, ("o", "q")), **_COUNTERS,
                                        "lse": ("float", tuple(inp["q"].shape[:3]))},
    "flash_attention_fwd_causal": lambda inp: {**_qkv_like(inp, ("o", "q")), **_COUNTERS,
                                               "lse": ("float", tuple(inp["q"].shape[:3]))},
    "flash_attention": lambda inp: {**_qkv_like(inp, ("o", "q"), ("dq", "q"), ("dk", "k"), ("dv", "v")),
                                    **_COUNTERS},
    "flash_attention_saved": lambda inp: {"shapes": ("int", (None, 5)), "n_saved": ("int", ()),
                                          "holds_o": ("bool", ())},
}
