"""How the hidden checks of lab08_int8_nf4 are judged (trusted side; never in the kernel).

The reference is ``llmopt.int8`` / ``llmopt.nf4``, which match bitsandbytes bit for bit
(``lib/tests/test_int8.py``, ``lib/tests/test_nf4.py``). Quantized values must agree exactly,
except where the reference value lies on a rounding boundary within float rounding (x/c and
x·(1/c) may round differently there): a code index or an int8 value may then differ by that
tie only.
"""
from __future__ import annotations


import torch

from autograder import static
from llmopt import int8 as ref8
from llmopt import nf4 as ref4
from llmopt.testing import compare

from . import not_finite as _not_finite
from ..cases.lab08_int8_nf4 import make_state

# The sandbox shows these llmopt modules (and what they import); int8 and nf4 stay hidden.
LLMOPT_VISIBLE = ["gpt", "data", "bench", "testing", "viz.quant4"]
NEEDS_CORPUS = True           # part 6 measures perplexity on the course corpus

TIE = 1e-5                    # "equally near" within float rounding, in units of the scaled value


def _rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.double() - exact.double()).norm() / exact.double().norm().clamp(min=1e-30))


# --------------------------------------------------------------------------- absmax / int8
def verify_absmax_quantize(case: dict, out: dict) -> str | None:
    x, dim = case["x"], case["dim"]
    q_exp, s_exp = ref8.absmax_quantize(x, dim)
    q, s = out["x_int8"], out["scale"]
    msg = _not_finite({"scale": s})
    if msg:
        return msg
    where = f"x of shape {tuple(x.shape)}, dim={dim}"
    if q.dtype != torch.int8:
        return f"x_int8: dtype {q.dtype}, expected torch.int8 (round, then .to(torch.int8))"
    if tuple(q.shape) != tuple(x.shape):
        return f"x_int8: shape {tuple(q.shape)}, expected x's shape {tuple(x.shape)}"
    if tuple(s.shape) != tuple(s_exp.shape):
        hint = ""
        if s.numel() == 1:
            hint = " — one scale per tensor: vector-wise absmax keeps one scale per row/column (max over dim only)"
        elif s.numel() == s_exp.numel():
            hint = " — keep the reduced dimension as size 1 (keepdim=True) so that the scale broadcasts"
        elif s.numel() == x.numel() // s_exp.numel():
            hint = " — the max is taken over the wrong dimension"
        return f"scale: shape {tuple(s.shape)}, expected {tuple(s_exp.shape)} for {where}{hint}"
    if not s.is_floating_point():
        return f"scale: dtype {s.dtype}, expected a floating-point tensor"
    msg = compare(s.float(), s_exp, rtol=1e-6, atol=0, name="scale")
    if msg:
        if torch.allclose(s.float(), torch.full_like(s_exp, float(x.abs().max())), rtol=1e-6):
            return msg + " — every scale is the max of the whole tensor: scales per tensor instead of per row/column (vector-wise absmax)"
        return msg + f" — scale = max|x| over dim={dim}, the absolute maximum (c_x(i) = max|X[i, :]|)"
    diff = q.long() - q_exp.long()
    if (diff != 0).any():
        v = x.float() * (127 / torch.where(s_exp == 0, torch.ones_like(s_exp), s_exp))
        tie = ((v - v.floor()) - 0.5).abs() < TIE * 127
        bad = (diff != 0) & ~((diff.abs() == 1) & tie)
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            hint = " — x_int8 = round(127 / scale · x)"
            if (diff[bad].abs() == 1).all():
                hint += " (round to nearest, not truncate)"
            if (s_exp == 0).any() and bad[(s_exp == 0).expand_as(bad)].any():
                hint = " — a row of zeros has scale 0: its values must be 0, not NaN/garbage"
            return (f"x_int8: {int(bad.sum())} of {q.numel()} values differ from the expected "
                    f"int8 values (first at index {idx}){hint}")
    return None


def verify_int8_matmul(case: dict, out: dict) -> str | None:
    X, W = case["X"], case["W"]
    got = out["out"]
    msg = _not_finite(out)
    if msg:
        return msg
    exp = ref8.int8_matmul(X, W)
    if tuple(got.shape) != tuple(exp.shape):
        hint = " — W is (out_features, in_features): compute X @ Wᵀ" if tuple(got.shape) == (X.shape[0], W.shape[1]) else ""
        return f"out: shape {tuple(got.shape)}, expected {tuple(exp.shape)} (N, M){hint}"
    scale = float(exp.abs().max())
    msg = compare(got.float(), exp.float(), rtol=1e-4, atol=1e-5 * scale, name="out")
    if msg is None:
        return None
    exact = X.double() @ W.double().T
    e_got, e_ref = _rel_err(got, exact), _rel_err(exp, exact)
    msg += f"; your relative error to the fp32 product is {e_got:.2e}, the int8 reference's {e_ref:.2e}"
    sx, sw = X.abs().max(), W.abs().max()
    per_tensor = (torch.round(X * 127 / sx).double() @ torch.round(W * 127 / sw).double().T) * sx * sw / 127 ** 2
    per_col = ref8.absmax_quantize(W, 0)
    w_col = per_col[0].double() * per_col[1].double() / 127
    xq = ref8.absmax_quantize(X, 1)
    col_variant = (xq[0].double() * xq[1].double() / 127) @ w_col.T
    if compare(got.double(), per_tensor, rtol=1e-4, atol=1e-5 * scale) is None:
        return msg + " — scales per tensor instead of per row/column: c_x(i) per row of X, c_w(j) per output row of W"
    if compare(got.double(), col_variant, rtol=1e-4, atol=1e-5 * scale) is None:
        return msg + " — W's scale must be per OUTPUT row (dim=1 of W in (out, in) layout), not per input column"
    if e_got < e_ref / 10:
        return msg + " — that is the unquantized product: quantize both factors to int8 and multiply the integers"
    ratio = float((got.double() * exp.double()).sum() / (exp.double() ** 2).sum())
    if abs(ratio * 127 - 1) < 0.01 or abs(ratio / 127 - 1) < 0.01:
        return msg + " — dequantize with c_x(i)·c_w(j)/127² (127 for each factor)"
    return msg + " — Out = c_x(i)·c_w(j)/127² · Σ_k X_int8[i,k]·W_int8[j,k] (int32 accumulation)"


def _variants(X, W, threshold):
    """What typical LLM.int8() mistakes compute (for the hints only)."""
    O = (X.abs() > threshold).any(0)
    Xz = X.clone()
    Xz[:, O] = 0
    out = {
        "plain": ref8.int8_matmul(X, W),
        "x_only": ref8.int8_matmul(Xz, W) + X[:, O] @ W[:, O].T,
        "twice": ref8.int8_matmul(X, W) + X[:, O] @ W[:, O].T,
    }
    Ow = (W.abs() > threshold).any(0)                         # outlier columns chosen from W
    out["from_w"] = (ref8.int8_matmul(X[:, ~Ow], W[:, ~Ow]) if (~Ow).any() else 0) + X[:, Ow] @ W[:, Ow].T
    return out, O


def verify_llm_int8_matmul(case: dict, out: dict) -> str | None:
    X, W, t = case["X"], case["W"], case["threshold"]
    got = out["out"]
    msg = _not_finite(out)
    if msg:
        return msg
    exp = ref8.llm_int8_matmul(X, W, t)
    if tuple(got.shape) != tuple(exp.shape):
        return f"out: shape {tuple(got.shape)}, expected {tuple(exp.shape)} (N, M): X @ Wᵀ with W (out, in)"
    scale = float(exp.abs().max())
    msg = compare(got.float(), exp.float(), rtol=1e-4, atol=1e-5 * scale, name="out")
    if msg is None:
        return None
    exact = X.double() @ W.double().T
    e_got, e_ref = _rel_err(got, exact), _rel_err(exp, exact)
    msg += (f"; relative error to the fp32 product: yours {e_got:.2e}, expected {e_ref:.2e} "
            f"(threshold {t}, {int((X.abs() > t).any(0).sum())} outlier columns)")
    variants, O = _variants(X, W, t)
    near = {k: compare(got.double(), v.double(), rtol=1e-4, atol=1e-5 * scale) is None
            for k, v in variants.items()}
    if near["twice"]:
        return msg + " — the outlier columns are counted twice: remove them from the int8 part"
    if near["x_only"] and not near["plain"]:
        return msg + (" — outliers removed from X but not the matching columns of W: decompose both "
                      "factors; W[:, O] leaves the int8 part too (otherwise it sets c_w)")
    if near["plain"] or near["from_w"]:
        if O.any():
            return msg + (" — no outlier column was kept in 16-bit: outliers are activation features, "
                          "the columns k of X with max_i |X_ik| > threshold (not columns of W)")
    if e_got < e_ref / 10:
        return msg + " — that is the unquantized product: the columns without outliers go through int8"
    return msg + (" — Out = X[:, O] @ W[:, O]ᵀ (16-bit) + int8_matmul(X[:, ¬O], W[:, ¬O]) with "
                  "O = {k : max_i |X_ik| > threshold}")


# --------------------------------------------------------------------------- NF4 code
def verify_nf4_code(case: dict, out: dict) -> str | None:
    got = out["code"]
    exp = ref4.nf4_code(case["offset"])
    msg = _not_finite(out)
    if msg:
        return msg
    if got.numel() != 16:
        return f"code: {got.numel()} values, expected 16 (8 positive, 7 negative, one exact 0)"
    got = got.reshape(-1).double()
    msg = compare(got, exp.double(), rtol=0, atol=2e-6, name=f"code (offset={case['offset']})")
    if msg is None:
        return None
    if not (got[1:] >= got[:-1]).all():
        return msg + " — sort the 16 values in increasing order"
    if abs(float(got.abs().max()) - 1) > 1e-6:
        return msg + " — normalise: divide by the largest value so that the code spans [-1, 1]"
    if int((got == 0).sum()) != 1:
        return msg + " — exactly one 0: the two halves are built without 0.5's quantile (linspace(...)[:-1])"
    if int((got > 0).sum()) != 8:
        return msg + " — NF4 is asymmetric: 8 positive quantiles (linspace(offset, 0.5, 9)), 7 negative (linspace(offset, 0.5, 8))"
    return msg + " — the quantiles are Φ⁻¹ of linspace(offset, 0.5, ·) (torch.special.ndtri), negated for the negative half"


# --------------------------------------------------------------------------- 4-bit quantization
def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    p = packed.reshape(-1).long()
    return torch.stack([p >> 4, p & 0xF], 1).reshape(-1)


def _nibbles_ok(got_idx, exp_idx, scaled, code) -> torch.Tensor:
    """True where the indices agree, or both code values are equally near (a tie)."""
    same = got_idx == exp_idx
    d_got = (code[got_idx.clamp(0, code.numel() - 1)] - scaled).abs()
    d_exp = (code[exp_idx] - scaled).abs()
    return same | ((d_got - d_exp).abs() <= TIE)


def _scaled(W_flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    a = absmax.repeat_interleave(blocksize)[:W_flat.numel()]
    return (W_flat / a.clamp(min=1e-38)).clamp(-1, 1)


def verify_quantize_4bit(case: dict, out: dict) -> str | None:
    W, bs, qt, dq = case["W"], case["blocksize"], case["quant_type"], case["double_quant"]
    n = W.numel()
    n_blocks = -(-n // bs)
    where = f"W {tuple(W.shape)} ({n} values), blocksize {bs}, {qt}" + (", double quant" if dq else "")
    packed_exp, st = ref4.quantize_4bit(W, bs, qt, dq)
    plain_absmax = ref4.quantize_4bit(W, bs, qt)[1].absmax
    packed, absmax = out["packed"], out["absmax"]
    if packed.dtype != torch.uint8:
        return f"packed: dtype {packed.dtype}, expected torch.uint8 (two 4-bit indices per byte)"
    # --- the absmax (block count first: it names the mistakes of the block layout)
    if absmax.numel() != n_blocks:
        if absmax.numel() == n // bs:
            return (f"absmax: {absmax.numel()} values, expected {n_blocks} for {where} — the ragged "
                    f"last block was dropped: pad the last block, never drop it")
        if W.dim() == 2 and absmax.numel() == W.shape[0]:
            return (f"absmax: {absmax.numel()} values, expected {n_blocks} for {where} — absmax per "
                    f"row instead of per block of {bs}: flatten W and cut it into blocks")
        return f"absmax: {absmax.numel()} values, expected ⌈n / blocksize⌉ = {n_blocks} for {where}"
    if not dq:
        if not absmax.is_floating_point():
            return f"absmax: dtype {absmax.dtype}, expected fp32 (without double quantization)"
        msg = compare(absmax.double(), plain_absmax.double(), rtol=1e-6, atol=0, name="absmax")
        if msg:
            return msg + f" — c_b = max|w_b| over each block of {bs} consecutive values of the flattened W"
    # --- the packed bytes
    if packed.numel() != -(-n // 2):
        if packed.numel() == n:
            return f"packed: {n} bytes, expected {-(-n // 2)} — pack two 4-bit indices into each byte"
        if packed.numel() == (n_blocks - 1) * bs // 2 or packed.numel() == n // 2 and n % 2:
            return (f"packed: {packed.numel()} bytes, expected {-(-n // 2)} for {where} — pad the ragged "
                    "last block (and an odd count) instead of dropping values")
        return f"packed: {packed.numel()} bytes, expected ⌈n/2⌉ = {-(-n // 2)} for {where}"
    code = ref4.code_of(qt)
    scaled = _scaled(W.reshape(-1).float(), plain_absmax, bs)
    scaled = torch.cat([scaled, scaled.new_zeros(n % 2)])     # the padding value is 0.0
    got_idx, exp_idx = _nibbles(packed), _nibbles(packed_exp)
    ok = _nibbles_ok(got_idx, exp_idx, scaled, code)
    if not ok.all():
        bad = int((~ok).sum())
        first = int((~ok).nonzero()[0])
        msg = (f"packed: {bad} of {got_idx.numel()} 4-bit indices differ from the expected ones "
               f"(first at value {first}) for {where}")
        p = packed.long()
        swapped = ((p & 0xF) << 4) | (p >> 4)
        if _nibbles_ok(_nibbles(swapped), exp_idx, scaled, code).all():
            return msg + " — the nibbles are in the wrong order: the first value goes in the HIGH nibble"
        if n % 2 and ok[:-1].all():
            return msg + " — only the padding nibble differs: pad an odd count with the code index of 0.0"
        other = ref4.FP4_CODE if qt == "nf4" else ref4.NF4_CODE
        if _nibbles_ok(got_idx, ref4._nearest(scaled, other), scaled, other).all():
            return msg + f" — these are the indices of the other code: quant_type='{qt}' uses the {qt.upper()} table"
        if qt == "fp4":
            srt = torch.argsort(ref4.FP4_CODE, stable=True)
            if _nibbles_ok(srt[got_idx.clamp(0, 15)], exp_idx, scaled, code).all():
                return msg + (" — the FP4 indices are positions in the sorted table: FP4's index is its "
                              "bit pattern s e1 e0 m (FP4_CODE in bit order)")
        return msg + " — each value becomes the index of the NEAREST code value to w / c_b"
    if not dq:
        return None
    # --- double quantization
    offset, absmax2 = out["offset"], out["absmax2"]
    if torch.isnan(offset).any():
        return "state.offset is missing — double quantization subtracts the mean of the absmax and keeps it as state.offset"
    if absmax.is_floating_point():
        return (f"absmax: dtype {absmax.dtype}, expected uint8 with double quantization — the absmax is "
                "itself quantized to 8-bit indices into the dynamic code")
    n2 = -(-n_blocks // 256)
    if absmax2.numel() != n2:
        return (f"state2.absmax: {absmax2.numel()} values, expected ⌈{n_blocks} / 256⌉ = {n2} — the absmax "
                "are quantized in blocks of 256, each with its own fp32 absmax (ragged last block padded)")
    mean = plain_absmax.mean()
    if abs(float(offset)) < 1e-12 or compare(offset.double().reshape(()), mean.double(), rtol=1e-6, atol=0) is not None:
        no_mean = ref4.quantize_blockwise(plain_absmax, ref4.DYNAMIC_CODE, 256)[1]
        if abs(float(offset)) < 1e-12 or compare(absmax2.double(), no_mean.double(), rtol=1e-6, atol=0) is None:
            return ("double quantization without subtracting the mean: offset = mean(absmax), then "
                    "quantize absmax − offset (the dynamic code is symmetric around 0)")
        return f"state.offset: expected the mean of the {n_blocks} fp32 absmax values"
    msg = compare(absmax2.double(), st.state2.absmax.double(), rtol=1e-6, atol=0, name="state2.absmax")
    if msg:
        return msg + " — the max |absmax − offset| over each block of 256"
    s2 = _scaled(plain_absmax - mean, st.state2.absmax, 256)
    ok = _nibbles_ok(absmax.long(), st.absmax.long(), s2, ref4.DYNAMIC_CODE)
    if not ok.all():
        return (f"absmax: {int((~ok).sum())} of {n_blocks} 8-bit indices differ — each (absmax − offset) / "
                "c2 goes to the index of the nearest value of the 256-value dynamic code")
    return None


def verify_dequantize_4bit(case: dict, out: dict) -> str | None:
    state = make_state(case)
    exp = ref4.dequantize_4bit(case["packed"], state)
    got = out["W"]
    msg = _not_finite(out)
    if msg:
        return msg
    where = (f"shape {tuple(case['shape'])}, blocksize {case['blocksize']}, {case['quant_type']}"
             + (", double quant" if state.nested else ""))
    if tuple(got.shape) != tuple(exp.shape):
        return f"W: shape {tuple(got.shape)}, expected state.shape {tuple(exp.shape)} ({where})"
    if got.dtype != exp.dtype:
        return f"W: dtype {got.dtype}, expected state.dtype {exp.dtype}"
    msg = compare(got, exp, rtol=1e-5 if exp.dtype == torch.float32 else 1e-3, atol=1e-7, name="W")
    if msg is None:
        return None
    msg += f" ({where})"
    p = case["packed"].long()
    swapped = (((p & 0xF) << 4) | (p >> 4)).to(torch.uint8)
    if compare(got, ref4.dequantize_4bit(swapped, state), rtol=1e-3, atol=1e-6) is None:
        return msg + " — the nibbles are read in the wrong order: the first value is in the HIGH nibble"
    if state.nested:
        no_mean = make_state(case)
        no_mean.offset = torch.tensor(0.0)
        if compare(got, ref4.dequantize_4bit(case["packed"], no_mean), rtol=1e-3, atol=1e-6) is None:
            return msg + " — add the mean back: c_b = DYNAMIC_CODE[q_b] · c2 + offset"
        return msg + " — undo the double quantization first: c_b = DYNAMIC_CODE[q_b] · state2.absmax[b // 256] + offset"
    flat_exp, flat_got = exp.reshape(-1).double(), got.reshape(-1).double()
    n, bs = flat_exp.numel(), case["blocksize"]
    full = (n // bs) * bs
    if full < n and torch.allclose(flat_got[:full], flat_exp[:full], rtol=1e-3, atol=1e-6):
        return msg + " — only the ragged last block is wrong: it has its own absmax (the last one)"
    return msg + " — W = code[index] · absmax[block] with the code of state.quant_type"


def verify_bytes_4bit(case: dict, out: dict) -> str | None:
    numel, bs, dq = case["numel"], case["blocksize"], case["double_quant"]
    exp = ref4.bytes_4bit(numel, bs, dq)
    got = int(out["bytes"])
    if got == exp:
        return None
    where = f"numel={numel}, blocksize={bs}, double_quant={dq}"
    nb = -(-numel // bs)
    packed = -(-numel // 2)
    hint = ""
    if dq and got == exp - 4:
        hint = " — the offset (the mean subtracted from the absmax) is stored too: one fp32"
    elif dq and got == packed + 4 * nb:
        hint = " — with double quantization each block's absmax is one byte, plus one fp32 per 256 blocks"
    elif not dq and got == packed + nb + 4 * -(-nb // 256) + 4:
        hint = " — without double quantization each block's absmax is an fp32 (4 bytes)"
    elif got in (numel // 2 + 4 * (numel // bs), numel // 2 + 4 * nb, packed + 4 * (numel // bs)):
        hint = " — round up: ⌈n/2⌉ bytes and ⌈n / blocksize⌉ blocks (the ragged last block counts)"
    elif abs(got - 8 * exp) <= 8 or abs(8 * got - exp) <= 8 * 8:
        hint = " — bytes, not bits"
    return f"wrong byte count for {where}{hint}"


# --- how the parts must be computed (read from the notebook's source, see static.py) --------
_LIBRARY_OK = ("llmopt.testing",)
_PLAIN = ("torch", "math", "numpy", "functools", "itertools", "typing", "dataclasses", "statistics",
          "collections", "warnings", "sys.stderr", "sys.stdout", "time")
_QUANTIZERS = ("torch.ao", "torch.quantization", "torch.quantize_per_tensor", "torch.quantize_per_channel",
               "quantize_per_tensor", "quantize_per_channel", "*fake_quantize*", "*int4pack*",
               "*weight_int8*", "*_int8pack*", "int_repr", "dequantize",
               "bitsandbytes", "bnb", "torchao", "optimum", "quanto", "hqq", "auto_gptq", "awq")
_OWN_CODE = [static.no_dynamic_access(), static.no_llmopt_imports(allowed=_LIBRARY_OK),
             static.forbids(*_QUANTIZERS, why=": this part asks for your own quantization code, "
                            "not a library quantizer (bitsandbytes, torch.ao, torch's quantized tensors)"),
             static.imports_only(*_PLAIN, *_LIBRARY_OK)]
METHOD = {name: _OWN_CODE for name in ("absmax_quantize", "int8_matmul", "llm_int8_matmul", "nf4_code",
                                        "quantize_4bit", "dequantize_4bit", "bytes_4bit")}


# --- what each run_X records: {key: (kind, shape)}, checked before anything is computed ----
def _q4_outputs(case):
    spec = {"packed": ("any", (None,)), "absmax": ("any", (None,))}
    if case["double_quant"]:
        spec.update(offset=("float", ()), absmax2=("float", (None,)))
    return spec


OUTPUTS = {
    "absmax_quantize": lambda case: {"x_int8": ("any", None), "scale": ("any", None)},
    "int8_matmul": lambda case: {"out": ("float", (None, None))},
    "llm_int8_matmul": lambda case: {"out": ("float", (None, None))},
    "nf4_code": lambda case: {"code": ("float", None)},
    "quantize_4bit": _q4_outputs,
    "dequantize_4bit": lambda case: {"W": ("float", None)},
    "bytes_4bit": lambda case: {"bytes": ("int", ())},
}
