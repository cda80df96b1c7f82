"""The hidden checks of lab08_int8_nf4, both ways: the reference passes, a stub and each broken
variant of course/mistakes.md (lab08 rows) fail with a message that points at the mistake, and the
METHOD rules refuse a library quantizer (bitsandbytes, torch.ao, the course library)."""
import math
import pathlib

import pytest
import torch

import labkit
from autograder import grade_functions
from llmopt import int8 as ref8
from llmopt import nf4 as ref4

LAB = "lab08_int8_nf4"
SOLUTION = pathlib.Path(__file__).parents[2] / "solutions" / LAB / f"{LAB}.ipynb"


def _grade(name, fn, seed=0):
    return labkit.grade(LAB, name, fn, seed)


_stub = labkit.stub


def _fails(name, fn, hint, all_cases=False):
    return labkit.fails(LAB, name, fn, hint, all_cases)


# --------------------------------------------------------------------------- the reference
REFERENCE = {"absmax_quantize": ref8.absmax_quantize, "int8_matmul": ref8.int8_matmul,
             "llm_int8_matmul": ref8.llm_int8_matmul, "nf4_code": ref4.nf4_code,
             "quantize_4bit": ref4.quantize_4bit, "dequantize_4bit": ref4.dequantize_4bit,
             "bytes_4bit": ref4.bytes_4bit}


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_passes(seed):
    res = grade_functions(LAB, REFERENCE, seed)
    for name, r in res.items():
        assert r.ok, (name, r.summary())


def test_stubs_fail():
    res = grade_functions(LAB, {name: _stub for name in REFERENCE})
    for name, r in res.items():
        assert r.passed == 0 and "not implemented" in r.messages[0], (name, r.messages)


# --------------------------------------------------------------------------- a student's way
def _nearest_argmin(x, code):
    return (x[:, None] - code[None, :]).abs().argmin(dim=1)


def _student_blockwise(x, code, blocksize):
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.zeros(nb * blocksize)
    padded[:n] = flat
    blocks = padded.view(nb, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1).reshape(-1)[:n]   # x / c, argmin
    return _nearest_argmin(scaled, code), absmax


def _student_q4(W, blocksize=64, quant_type="nf4", double_quant=False, bug=None):
    """quantize_4bit as a student writes it (division, argmin), with one optional bug."""
    code = ref4.NF4_CODE if quant_type == "nf4" else ref4.FP4_CODE
    if bug == "fp4_sorted" and quant_type == "fp4":
        code = ref4.FP4_CODE.sort().values
    if bug == "per_row":
        rows = W.reshape(W.shape[0], -1).float()
        absmax = rows.abs().amax(1)
        idx = _nearest_argmin((rows / absmax[:, None]).reshape(-1), code)
    elif bug == "drop_ragged":
        n = W.numel() // blocksize * blocksize
        idx, absmax = _student_blockwise(W.reshape(-1)[:n], code, blocksize)
    else:
        idx, absmax = _student_blockwise(W, code, blocksize)
    if idx.numel() % 2:
        idx = torch.cat([idx, _nearest_argmin(torch.zeros(1), code)])
    q = idx.to(torch.uint8)
    packed = (q[1::2] << 4) | q[0::2] if bug == "nibbles" else (q[0::2] << 4) | q[1::2]
    state = ref4.QuantState(absmax, W.shape, W.dtype, blocksize, quant_type)
    if double_quant:
        offset = absmax.mean()
        centred = absmax if bug in ("no_mean", "no_mean_zero") else absmax - offset
        q2, absmax2 = _student_blockwise(centred, ref4.DYNAMIC_CODE, 256)
        state.absmax = q2.to(torch.uint8)
        state.offset = None if bug == "no_mean" else (torch.tensor(0.0) if bug == "no_mean_zero" else offset)
        state.state2 = ref4.QuantState(absmax2, absmax.shape, torch.float32, 256, "dynamic")
    return packed, state


def test_a_students_division_and_argmin_pass_bit_exact_checks():
    for seed in (0, 1, 2):
        r = _grade("quantize_4bit", _student_q4, seed)
        assert r.ok, r.summary()


# --------------------------------------------------------------------------- absmax_quantize
def test_absmax_quantize_mutants():
    def per_tensor(x, dim=-1):
        s = x.float().abs().max()
        return torch.round(x.float() * 127 / s).to(torch.int8), s.reshape(1, 1)
    _fails("absmax_quantize", per_tensor, "one scale per tensor")

    def per_tensor_broadcast(x, dim=-1):
        q, s = per_tensor(x, dim)
        shape = list(x.shape)
        shape[dim] = 1
        return q, s.expand(shape).clone()
    _fails("absmax_quantize", per_tensor_broadcast, "scales per tensor instead of per row/column")

    def no_keepdim(x, dim=-1):
        q, s = ref8.absmax_quantize(x, dim)
        return q, s.squeeze(dim)
    _fails("absmax_quantize", no_keepdim, "keepdim=True")

    def truncate(x, dim=-1):
        q, s = ref8.absmax_quantize(x, dim)
        s1 = torch.where(s == 0, torch.ones_like(s), s)
        return (x.float() * 127 / s1).to(torch.int8), s
    _fails("absmax_quantize", truncate, "round to nearest")

    def float_out(x, dim=-1):
        q, s = ref8.absmax_quantize(x, dim)
        return q.float(), s
    _fails("absmax_quantize", float_out, "expected torch.int8", all_cases=True)


# --------------------------------------------------------------------------- int8_matmul
def test_int8_matmul_mutants():
    def per_tensor(X, W):
        sx, sw = X.abs().max(), W.abs().max()
        return (torch.round(X * 127 / sx) @ torch.round(W * 127 / sw).T) * sx * sw / 127 ** 2
    _fails("int8_matmul", per_tensor, "scales per tensor instead of per row/column", all_cases=True)

    def w_per_column(X, W):
        xq, cx = ref8.absmax_quantize(X, 1)
        wq, cw = ref8.absmax_quantize(W, 0)
        return (xq.float() * cx / 127) @ (wq.float() * cw / 127).T
    _fails("int8_matmul", w_per_column, "per OUTPUT row")

    def one_127(X, W):
        return ref8.int8_matmul(X, W) * 127
    _fails("int8_matmul", one_127, "127²", all_cases=True)

    def fp32(X, W):
        return X @ W.T
    _fails("int8_matmul", fp32, "unquantized product", all_cases=True)


# --------------------------------------------------------------------------- llm_int8_matmul
def test_llm_int8_matmul_mutants():
    def outliers_from_w(X, W, threshold=6.0):
        O = (W.abs() > threshold).any(0)
        out = ref8.int8_matmul(X[:, ~O], W[:, ~O])
        return out + X[:, O] @ W[:, O].T
    _fails("llm_int8_matmul", outliers_from_w, "outliers are activation features")

    def x_only(X, W, threshold=6.0):                       # outliers removed from X, not from W
        O = (X.abs() > threshold).any(0)
        Xz = X.clone()
        Xz[:, O] = 0
        return ref8.int8_matmul(Xz, W) + X[:, O] @ W[:, O].T
    r = _fails("llm_int8_matmul", x_only, "decompose both factors")
    assert r.passed >= 2                                    # only the cases with large W[:, O] tell

    def twice(X, W, threshold=6.0):
        O = (X.abs() > threshold).any(0)
        return ref8.int8_matmul(X, W) + X[:, O] @ W[:, O].T
    _fails("llm_int8_matmul", twice, "counted twice")

    def rows_not_cols(X, W, threshold=6.0):                 # outlier tokens instead of features
        R = (X.abs() > threshold).any(1)
        out = X.new_zeros(X.shape[0], W.shape[0])
        if (~R).any():
            out[~R] = ref8.int8_matmul(X[~R], W)
        out[R] = X[R] @ W.T
        return out
    assert not _grade("llm_int8_matmul", rows_not_cols).ok


# --------------------------------------------------------------------------- nf4_code
def test_nf4_code_mutants():
    def hardcoded(offset=0.9677083):
        return ref4.NF4_CODE.clone()
    r = _grade("nf4_code", hardcoded)
    assert not r.ok and r.passed >= 1

    def symmetric(offset=0.9677083):                       # 8 + 8 quantiles, no exact 0
        pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
        v = torch.cat([-pos, pos]).float().sort().values
        return v / v.max()
    _fails("nf4_code", symmetric, "exactly one 0", all_cases=True)

    def seven_and_eight_swapped(offset=0.9677083):         # 7 positive, 8 negative
        return -ref4.nf4_code(offset).flip(0)
    _fails("nf4_code", seven_and_eight_swapped, "8 positive", all_cases=True)

    def unnormalised(offset=0.9677083):
        return ref4.nf4_code(offset) * 1.8
    _fails("nf4_code", unnormalised, "normalise", all_cases=True)

    def unsorted(offset=0.9677083):
        return ref4.nf4_code(offset).flip(0)
    _fails("nf4_code", unsorted, "sort", all_cases=True)


# --------------------------------------------------------------------------- quantize_4bit
@pytest.mark.parametrize("bug,hint", [
    ("nibbles", "the first value goes in the HIGH nibble"),
    ("per_row", "absmax per row instead of per block"),
    ("drop_ragged", "the ragged last block was dropped"),
    ("no_mean", "subtracts the mean of the absmax"),
    ("no_mean_zero", "without subtracting the mean"),
    ("fp4_sorted", "bit pattern"),
])
def test_quantize_4bit_mutants(bug, hint):
    _fails("quantize_4bit", lambda *a, **k: _student_q4(*a, bug=bug, **k), hint)


def test_quantize_4bit_float_absmax_under_double_quant_fails():
    def not_nested(W, blocksize=64, quant_type="nf4", double_quant=False):
        packed, state = ref4.quantize_4bit(W, blocksize, quant_type)
        if double_quant:
            state.offset = state.absmax.mean()
        return packed, state
    _fails("quantize_4bit", not_nested, "expected uint8 with double quantization")


# --------------------------------------------------------------------------- dequantize_4bit
def test_dequantize_4bit_mutants():
    def nibbles(packed, state):
        p = packed.long()
        return ref4.dequantize_4bit((((p & 0xF) << 4) | (p >> 4)).to(torch.uint8), state)
    _fails("dequantize_4bit", nibbles, "HIGH nibble", all_cases=True)

    def no_mean(packed, state):
        if state.state2 is not None:
            state.offset = torch.tensor(0.0)
        return ref4.dequantize_4bit(packed, state)
    _fails("dequantize_4bit", no_mean, "add the mean back")

    def ragged_dropped(packed, state):
        n = math.prod(state.shape)
        W = ref4.dequantize_4bit(packed, state).reshape(-1)
        full = n // state.blocksize * state.blocksize
        W[full:] = 0
        return W.reshape(state.shape)
    _fails("dequantize_4bit", ragged_dropped, "ragged last block")

    def wrong_dtype(packed, state):
        return ref4.dequantize_4bit(packed, state).float()
    _fails("dequantize_4bit", wrong_dtype, "state.dtype")


# --------------------------------------------------------------------------- bytes_4bit
def test_bytes_4bit_mutants():
    def no_offset(numel, blocksize=64, double_quant=False):
        return ref4.bytes_4bit(numel, blocksize, double_quant) - (4 if double_quant else 0)
    _fails("bytes_4bit", no_offset, "the offset")

    def floor(numel, blocksize=64, double_quant=False):
        nb = numel // blocksize
        return numel // 2 + (4 * nb if not double_quant else nb + 4 * (nb // 256) + 4)
    assert not _grade("bytes_4bit", floor).ok

    def bits(numel, blocksize=64, double_quant=False):
        return 8 * ref4.bytes_4bit(numel, blocksize, double_quant)
    _fails("bytes_4bit", bits, "bytes, not bits")

    def fp32_absmax_always(numel, blocksize=64, double_quant=False):
        return ref4.bytes_4bit(numel, blocksize, False)
    _fails("bytes_4bit", fp32_absmax_always, "one byte, plus one fp32 per 256 blocks")


# --------------------------------------------------------------------------- NaN, output specs
def test_nan_outputs_fail_with_a_message_saying_so():
    def nan_matmul(X, W):
        out = ref8.int8_matmul(X, W)
        out[0, 0] = float("nan")
        return out
    r = _grade("int8_matmul", nan_matmul)
    assert r.passed == 0 and all("NaN" in m for m in r.messages), r.messages


def test_output_specs_match_the_reference_records():
    from autograder.checks import lab08_int8_nf4 as checks
    assert set(checks.METHOD) == set(REFERENCE)
    labkit.assert_outputs_match_reference(LAB, REFERENCE)


# --------------------------------------------------------------------------- the method
def _solution_nb():
    return labkit.solution_nb(LAB)


def _with_body(fn, body, extra_cell=None):
    """The solution notebook with ``fn``'s solution block replaced by ``body``."""
    return labkit.with_body(_solution_nb(), fn, body, extra_cell)


def _verdicts(nb):
    return labkit.verdicts(LAB, nb)


def test_solution_follows_the_method():
    assert _verdicts(_solution_nb()) == {}


@pytest.mark.parametrize("fn,extra,body,shown", [
    ("quantize_4bit", "import bitsandbytes.functional as bnbF",
     "    return bnbF.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type)", "bitsandbytes"),
    ("quantize_4bit", None,
     "    import bitsandbytes as bnb\n    return bnb.functional.quantize_4bit(W, blocksize)", "bitsandbytes"),
    ("dequantize_4bit", "from bitsandbytes.functional import dequantize_4bit as dq",
     "    return dq(packed, state)", "bitsandbytes"),
    ("absmax_quantize", None,
     "    s = x.abs().amax(dim, keepdim=True)\n"
     "    q = torch.quantize_per_channel(x, s.flatten() / 127, torch.zeros(s.numel(), dtype=torch.long), 0, torch.qint8)\n"
     "    return q.int_repr(), s", "quantize_per_channel"),
    ("int8_matmul", None,
     "    import torch.ao.quantization as taq\n    return taq.fuse_modules(X, W)", "torch.ao"),
    ("llm_int8_matmul", "from llmopt.int8 import llm_int8_matmul as lm",
     "    return lm(X, W, threshold)", "llmopt.int8"),
    ("nf4_code", "from llmopt import nf4 as ref", "    return ref.nf4_code(offset)", "llmopt.nf4"),
])
def test_library_quantizers_are_refused(fn, extra, body, shown):
    msg = _verdicts(_with_body(fn, body, extra)).get(fn)
    assert msg and shown in msg, msg


def test_hidden_library_access_is_refused():
    nb = _with_body("quantize_4bit", "    return getattr(__import__('bitsandbytes').functional, 'quantize_' + '4bit')(W)")
    assert "quantize_4bit" in _verdicts(nb)


def test_helpers_are_followed():
    """A graded function that reaches a library quantizer through a helper of the notebook."""
    nb = _with_body("dequantize_4bit", "    return my_helper(packed, state)",
                    extra_cell="import bitsandbytes.functional as F\n\ndef my_helper(p, s):\n    return F.dequantize_4bit(p, s)")
    assert "bitsandbytes" in _verdicts(nb)["dequantize_4bit"]
