"""How the hidden checks of lab07_gptq are judged (trusted side; never in the kernel).

GPTQ rounds, so a correct implementation that does its arithmetic in another order can,
rarely, round one weight to the neighbouring grid point and then compensate a little
differently. The checks therefore ask for: every output on its own grid, the grid (scale,
zero) as the reference fits it, at most ``MAX_MISMATCH`` of the weights on another grid
point than the reference's, and a layer error within ``ERR_RTOL`` of the reference's.
``pack_codes`` is exact (bytes); its messages name the layout mistake (bit order inside a code
or a byte, column-major order, rows padded separately, a byte per code, the last byte dropped).
The messages name the symptom and, where one fits, the usual mistake (course/mistakes.md).
"""
from __future__ import annotations

import torch

from llmopt import gptq as ref
from llmopt.testing import compare

from .. import static
from . import model_output_spec as _model_outputs
from . import not_finite as _not_finite
from ..cases.lab07_gptq import linear_names, tiny_opt

# The sandbox shows these llmopt modules (and what they import); gptq stays hidden.
LLMOPT_VISIBLE = ["gpt", "data", "bench", "testing", "viz.quant"]
NEEDS_CORPUS = True  # perplexity and calibration data: the grader builds the corpus once

MAX_MISMATCH = 0.01   # fraction of weights allowed on another grid point than the reference's
ERR_RTOL = 0.02       # relative tolerance on the layer's output error ½ tr(D H Dᵀ)


_DAMPING = (" — a dead input (H_qq = 0) or an undamped H? Dead inputs get H_qq = 1 and zero "
            "weights; add λ = percdamp·mean(diag H) to the diagonal")


def _shape_msg(out: dict, exp: tuple, names=("W_hat", "scale", "zero")) -> str | None:
    for name, e in zip(names, exp):
        got = out[name]
        if tuple(got.shape) != tuple(e.shape):
            hint = ""
            if name != "W_hat" and got.dim() == 1:
                hint = " — return scale and zero as (rows, n_groups), n_groups = 1 per row"
            return f"{name}: shape {tuple(got.shape)}, expected {tuple(e.shape)}{hint}"
        if not got.is_floating_point():
            return f"{name}: dtype {got.dtype}, expected a floating-point tensor"
    return None


def _off_grid(W_hat, scale, zero, bits, group_size, perm=None) -> str | None:
    """None if every W_hat[r, c] = scale[r, g]·(k − zero[r, g]), k ∈ {0..maxq}, g its group."""
    rows, cols = W_hat.shape
    order = torch.arange(cols) if perm is None else perm
    gs = cols if group_size <= 0 else group_size
    grp = torch.arange(cols) // gs
    s, z = scale.double()[:, grp], zero.double()[:, grp]
    if (s <= 0).any():
        return "scale must be positive"
    k = W_hat.double()[:, order] / s + z
    bad = (k - k.round()).abs() > 1e-3
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        return (f"{int(bad.sum())} of {k.numel()} entries of W_hat are not on their grid "
                f"scale·(k − zero) (first at row {r}, column {int(order[c])})")
    if k.round().min() < 0 or k.round().max() > 2 ** bits - 1:
        return f"W_hat uses integers outside 0..{2 ** bits - 1} (clamp to the {bits}-bit range)"
    return None


def _layer_error(W, W_hat, H) -> float:
    D = W.double() - W_hat.double()
    return float(0.5 * ((D @ H.double()) * D).sum())


def _compare_quantized(case, out, exp, *, perm=None, what="W_hat") -> str | None:
    """Shapes, grid, scale/zero and W_hat against the reference ``exp``; None if fine."""
    msg = _shape_msg(out, exp)
    if msg:
        return msg
    W_hat, scale, zero = out["W_hat"], out["scale"], out["zero"]
    msg = _off_grid(W_hat, scale, zero, case["bits"], case["group_size"], perm)
    if msg:
        return msg + (" — quantize each column once and never update a column after it is "
                      "quantized (updates go to the columns to its right)")
    msg = compare(scale.double(), exp[1].double(), rtol=1e-6, atol=1e-9, name="scale") or \
        compare(zero.double(), exp[2].double(), rtol=0, atol=1e-6, name="zero")
    if msg:
        if case["group_size"] > 0:
            W = case["W"].double() if perm is None else case["W"].double()[:, perm]
            static = ref.quantize_rtn(W, case["bits"], case["group_size"], case.get("sym", False))
            if compare(scale.double(), static[1], rtol=1e-6, atol=1e-9) is None:
                return msg + (" — the groups' grids were fitted to the original weights: fit "
                              "each group's grid when its first column comes up, to the "
                              "group's weights as updated by the columns before it")
            return msg + (" — the first group's grid comes from the original weights, the "
                          "later ones from the updated weights: a wrong error update shows "
                          "here first")
        return msg + " — fit the grid to each row's min/max with 0 in the range (see quant_params)"
    order = torch.arange(W_hat.shape[1]) if perm is None else perm
    diff = (W_hat.double() - exp[0].double()).abs()[:, order] > 1e-3 * exp[1].double().min()
    frac = float(diff.float().mean())
    e_got = _layer_error(case["W"], W_hat, case["H"])
    e_ref = _layer_error(case["W"], exp[0], case["H"])
    if frac <= MAX_MISMATCH and abs(e_got - e_ref) <= ERR_RTOL * e_ref:
        return None
    e_rtn = _layer_error(case["W"], ref.quantize_rtn(case["W"], case["bits"], case["group_size"],
                                                     case.get("sym", False))[0], case["H"])
    msg = (f"{what}: {frac:.1%} of the weights are on another grid point than expected "
           f"(at most {MAX_MISMATCH:.0%} allowed); your layer error ½tr(DHDᵀ) is "
           f"{e_got / e_ref:.2f}× the expected one")
    B = case.get("block_size", 0)
    if 0 < B < W_hat.shape[1] and diff[:, :B].float().mean() <= MAX_MISMATCH:
        return msg + (" — the first block is right, the later ones are not: after each "
                      "block, apply the block's errors to all later columns: "
                      "W[:, i2:] -= E · U[i1:i2, i2:]")
    if e_got > e_rtn:
        return msg + (", worse than plain round-to-nearest — is H used where H⁻¹ belongs, or "
                      "the error not divided by [H⁻¹]_qq?")
    return msg + (" — check the error feedback: E_j = (W_j − Q_j) / [U]_jj, then "
                  "W[:, j:] -= E_j · U[j, j:] with U the upper Cholesky factor of the damped H⁻¹")


def verify_quantize_rtn(case: dict, out: dict) -> str | None:
    msg = _not_finite(out, " — a row of zeros must get the range [-1, 1], not scale 0")
    if msg:
        return msg
    exp = ref.quantize_rtn(case["W"], case["bits"], case["group_size"], case["sym"])
    msg = _shape_msg(out, exp)
    if msg:
        return msg
    for name, e, kw in (("scale", exp[1], {}), ("zero", exp[2], dict(rtol=0, atol=1e-6)),
                        ("W_hat", exp[0], {})):
        m = compare(out[name].double(), e.double(), name=name, **kw)
        if m:
            hints = {"scale": " — scale = (max − min)/maxq per row or group, with 0 inside [min, max]"
                     + (" and a symmetric range ±max|w|" if case["sym"] else ""),
                     "zero": " — zero = round(−min/scale)" if not case["sym"]
                     else " — the symmetric zero point is (maxq + 1)/2",
                     "W_hat": " — W_hat = scale·(clamp(round(W/scale) + zero, 0, maxq) − zero)"}
            return m + hints[name]
    return None


def _stream_bytes(codes: torch.Tensor, bits: int, code_lsb_first=True, byte_lsb_first=True):
    """``codes`` packed as one bit stream, in the given bit orders (the reference: both True)."""
    flat = codes.reshape(-1).long()
    shifts = torch.arange(bits) if code_lsb_first else torch.arange(bits - 1, -1, -1)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    weights = 2 ** (torch.arange(8) if byte_lsb_first else torch.arange(7, -1, -1))
    return (stream * weights).sum(1)


def verify_pack_codes(case: dict, out: dict) -> str | None:
    codes, bits = case["codes"], case["bits"]
    got = out["packed"]
    n = codes.numel()
    want = -(-n * bits // 8)
    if got.dim() != 1 or got.numel() != want:
        rows, cols = codes.shape
        hint = ""
        if got.numel() == n:
            hint = " — one byte per code: put the bits of consecutive codes into the same bytes"
        elif got.numel() == rows * -(-cols * bits // 8) and rows > 1:
            hint = (" — each row was padded to whole bytes: the whole tensor is one stream "
                    "(codes.reshape(-1)), padded once at its end")
        elif got.numel() == n * bits // 8:
            hint = " — the last, partial byte is missing: pad the stream with zero bits to whole bytes"
        elif got.numel() == n * bits:
            hint = " — one entry per bit: group every 8 bits of the stream into one byte"
        return (f"packed: shape {tuple(got.shape)}, expected ({want},) — ceil(numel·bits/8) = "
                f"ceil({n}·{bits}/8) bytes{hint}")
    if got.dtype != torch.uint8:
        return f"packed: dtype {got.dtype}, expected torch.uint8 (one byte per entry)"
    got = got.long()
    exp = _stream_bytes(codes, bits)
    if torch.equal(got, exp):
        return None
    bad = (got != exp)
    msg = (f"packed: {int(bad.sum())} of {want} bytes differ from the expected layout "
           f"(first at byte {int(bad.nonzero()[0])}, {bits} bits per code)")
    variants = [
        (_stream_bytes(codes, bits, code_lsb_first=False),
         " — each code's bits are in the wrong order: its least significant bit comes first "
         "in the stream"),
        (_stream_bytes(codes, bits, byte_lsb_first=False),
         " — the bits inside each byte are in the wrong order: stream bit t is worth "
         "2**(t mod 8) in byte t // 8 (numpy.packbits: bitorder='little')"),
        (_stream_bytes(codes, bits, code_lsb_first=False, byte_lsb_first=False),
         " — the stream is written most significant bit first: the layout is little-endian "
         "throughout (a code's lowest bit first, the first stream bit worth 1)"),
        (_stream_bytes(codes.T.contiguous(), bits),
         " — the codes were taken column by column: use row-major order, codes.reshape(-1)"),
    ]
    for v, hint in variants:
        if torch.equal(got, v):
            return msg + hint
    if (got >= 2 ** 8).any() or (got < 0).any():
        return msg + " — bytes must be 0..255"
    return msg + (" — code i holds stream bits i·bits … i·bits + bits − 1, least significant "
                  "first; stream bit t is bit t mod 8 of byte t // 8; the last byte is padded "
                  "with zero bits")


def verify_obs_update(case: dict, out: dict) -> str | None:
    msg = _not_finite(out)
    if msg:
        return msg
    w_exp, L_exp = ref.obs_update(case["w"], case["Hinv"], case["q"], case["target"])
    w_new, L = out["w_new"].double(), out["L"].double()
    q = case["q"]
    if tuple(w_new.shape) != tuple(w_exp.shape):
        return f"w_new: shape {tuple(w_new.shape)}, expected {tuple(w_exp.shape)}"
    if abs(float(w_new[q]) - float(case["target"])) > 1e-8:
        return (f"w_new[q] must equal the target exactly (the constraint e_qᵀδw = Δ) — "
                f"divide Δ by [H⁻¹]_qq and use the column H⁻¹[:, q]")
    msg = compare(w_new, w_exp, rtol=1e-7, atol=1e-9, name="w_new")
    if msg:
        return msg + " — δw = Δ / [H⁻¹]_qq · H⁻¹[:, q] with Δ = target − w[q]"
    msg = compare(L.reshape(()), torch.as_tensor(L_exp, dtype=torch.float64).reshape(()),
                  rtol=1e-7, atol=1e-12, name="L")
    if msg:
        return msg + " — L = ½ Δ² / [H⁻¹]_qq"
    return None


def verify_obs_quantize_columns(case: dict, out: dict) -> str | None:
    msg = _not_finite(out, _DAMPING)
    if msg:
        return msg
    exp = ref.obs_quantize_columns(case["W"], case["H"], case["bits"], case["group_size"])
    msg = _compare_quantized(dict(case, sym=False), out, exp)
    if msg and "grid point" in msg:
        msg += (" (after quantizing column q, remove it from H⁻¹: "
                "H⁻¹ ← H⁻¹ − H⁻¹[:, q] H⁻¹[q, :] / [H⁻¹]_qq)")
    return msg


def verify_gptq_quantize(case: dict, out: dict) -> str | None:
    msg = _not_finite(out, _DAMPING)
    if msg:
        return msg
    exp = ref.gptq_quantize(case["W"], case["H"], case["bits"], case["group_size"],
                            case["block_size"], case["percdamp"], case["act_order"], case["sym"])
    perm = ref.act_order_perm(case["H"]) if case["act_order"] else None
    msg = _compare_quantized(case, out, exp, perm=perm)
    if msg is None:
        return None
    if case["act_order"] and tuple(out["W_hat"].shape) == tuple(exp[0].shape) and \
            (out["W_hat"].double() - exp[0].double()[:, perm]).abs().max() < 1e-6:
        return msg + " — with act-order, undo the permutation of the columns before returning"
    return msg


def verify_GPTQ(case: dict, out: dict) -> str | None:
    msg = _not_finite(out)
    if msg:
        return msg
    X = torch.cat([b.reshape(-1, case["cols"]) for b in case["batches"]]).double()
    H = 2 * X.T @ X / X.shape[0]
    got = out["H"].double()
    if tuple(got.shape) != tuple(H.shape):
        return f"H: shape {tuple(got.shape)}, expected {tuple(H.shape)} (in_features × in_features)"
    msg = compare(got, H, rtol=1e-4, atol=1e-5, name="H")
    if msg:
        ratio = float((got * H).sum() / (H * H).sum())
        if abs(ratio - 1) > 1e-3 and compare(got / ratio, H, rtol=1e-4, atol=1e-5) is None:
            return msg + (f" — H is off by a factor of {ratio:.3g}: keep H = 2/N Σ x xᵀ as a "
                          "running mean over the N tokens seen so far (every row of every batch)")
        return msg + " — H = 2/N Σ x xᵀ over the tokens (rows of inp.reshape(-1, in_features))"
    return None


def verify_quantize_model(case: dict, out: dict) -> str | None:
    msg = _not_finite(out, _DAMPING)
    if msg:
        return msg
    model = tiny_opt(case["model_seed"], case["layers"])
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in linear_names(model)}
    ref.quantize_model(model, case["method"], case["calib"], case["bits"], case["group_size"])
    mods = dict(model.named_modules())
    with torch.no_grad():
        logits = model(case["ids"]).logits
    if tuple(out["logits"].shape) != tuple(logits.shape):
        return (f"logits: shape {tuple(out['logits'].shape)}, expected {tuple(logits.shape)} — "
                "the model must keep its forward")
    names = linear_names(model)
    missing = [n for n in names if "w." + n not in out]
    if missing:
        return f"the model lost its linear layers {missing[:3]} — quantize the weights in place"
    worst, total = None, 0.0
    for n in names:
        got, exp = out["w." + n].double(), mods[n].weight.double()
        if tuple(got.shape) != tuple(exp.shape):
            return f"{n}.weight: shape {tuple(got.shape)}, expected {tuple(exp.shape)}"
        if case["group_size"] <= 0:                          # the per-row grid of the original
            scale, zero = ref.quant_params(original[n].double(), case["bits"])
            k = got / scale + zero
            if ((k - k.round()).abs() > 1e-3).any():
                if torch.equal(got.float(), original[n].float()):
                    return f"{n}.weight was not quantized"
                return (f"{n}.weight is not on its rows' {case['bits']}-bit grid — write the "
                        "dequantized W_hat into layer.weight")
        step = ref.quant_params(original[n].double(), case["bits"])[0].min()
        frac = float(((got - exp).abs() > 1e-3 * step).float().mean())
        total += frac / len(names)
        if frac > MAX_MISMATCH and worst is None:
            worst = (n, frac)
    if worst is not None:
        n, frac = worst
        layer = int(n.split(".layers.")[1].split(".")[0])
        hint = ""
        if layer > 0:
            first_ok = all(float(((out["w." + m].double() - mods[m].weight.double()).abs()
                                  > 1e-3).float().mean()) <= MAX_MISMATCH
                           for m in names if ".layers.0." in m)
            if first_ok:
                hint = (" — layer 0 is right, later ones are not: feed each layer the outputs of "
                        "the layers before it AFTER they were quantized")
        return (f"{n}.weight: {frac:.1%} of the weights differ from the expected quantization "
                f"(at most {MAX_MISMATCH:.0%} allowed){hint}")
    if total == 0.0:
        msg = compare(out["logits"], logits.float(), rtol=1e-3, atol=1e-4, name="logits")
        if msg:
            return msg + " — only the decoder layers' linear weights may change"
    return None


# --- how the parts must be computed (read from the notebook's source, see static.py) --------

_LIBRARY_OK = ("llmopt.testing", "llmopt.viz.quant.correlated_inputs", "llmopt.data", "llmopt.gpt",
               "llmopt.bench")
_OWN_CODE = [static.no_dynamic_access(), static.no_llmopt_imports(allowed=_LIBRARY_OK)]
_CHOLESKY = ("torch.linalg.cholesky", "torch.linalg.cholesky_ex", "torch.cholesky",
             "torch.cholesky_inverse")
METHOD = {
    "quantize_rtn": _OWN_CODE,
    "pack_codes": _OWN_CODE,
    "obs_update": _OWN_CODE,
    "obs_quantize_columns": _OWN_CODE,
    "gptq_quantize": _OWN_CODE + [
        static.imports_only("torch", "math", "functools", "typing", *_LIBRARY_OK),
        static.does_not_reach("obs_update", "obs_quantize_columns",
                              why=": GPTQ reaches the same result without the column-by-column "
                                  "OBS of the earlier parts — take the upper Cholesky factor U of "
                                  "the damped H⁻¹ and update the later columns block by block "
                                  "(Algorithm 1)"),
        static.calls(*_CHOLESKY, what="a Cholesky factorization (torch.linalg.cholesky): GPTQ "
                                      "takes its updates from the upper Cholesky factor of the "
                                      "damped H⁻¹")],
    "GPTQ": _OWN_CODE,
    "quantize_model": _OWN_CODE,
}


# --- what each run_X records: {key: (kind, shape)}, checked before anything is computed ----

def _quantized(inp, W="W"):
    rows, cols = inp[W].shape
    groups = 1 if inp["group_size"] <= 0 else -(-cols // inp["group_size"])
    return {"W_hat": ("float", (rows, cols)), "scale": ("float", (rows, groups)),
            "zero": ("float", (rows, groups))}


OUTPUTS = {
    "quantize_rtn": _quantized,
    "pack_codes": lambda inp: {"packed": ("int", (None,))},
    "obs_update": lambda inp: {"w_new": ("float", tuple(inp["w"].shape)), "L": ("float", ())},
    "obs_quantize_columns": _quantized,
    "gptq_quantize": _quantized,
    "GPTQ": lambda inp: {"H": ("float", (inp["cols"], inp["cols"]))},
    "quantize_model": _model_outputs,
}
