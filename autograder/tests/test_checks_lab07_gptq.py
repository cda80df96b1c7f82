"""The hidden checks of lab07_gptq, both ways: the reference passes, a stub and each broken
variant of course/mistakes.md (lab07 row) fail with a message that points at the mistake."""
import math

import pytest
import torch

import labkit
from autograder import grade_functions
from llmopt import gptq as ref

LAB = "lab07_gptq"


def _grade(name, fn):
    return grade_functions(LAB, {name: fn})[name]


def _stub(*args, **kwargs):
    raise NotImplementedError()


class _StubGPTQ:
    def __init__(self, layer):
        pass

    def add_batch(self, inp, out=None):
        raise NotImplementedError()


# --------------------------------------------------------------------------- mutants
def _gptq(W, H, bits=4, group_size=-1, block_size=128, percdamp=0.01, act_order=False,
          sym=False, bug=None):
    """The reference algorithm with one deliberate bug (course/mistakes.md, lab07)."""
    dtype = W.dtype
    W = W.double().clone()
    W0 = W.clone()
    rows, cols = W.shape
    grouped = group_size > 0
    if not grouped:
        scale, zero = ref.quant_params(W, bits, sym)
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = ref.act_order_perm(H)
        W, H, W0 = W[:, perm], H[perm][:, perm], W0[:, perm]
    if bug != "no_damping":
        H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    if bug == "H_for_Hinv":
        Hinv = torch.linalg.cholesky(H, upper=True)
    else:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    scales, zeros = [], []
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=W.dtype)
        Q1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if grouped and j % group_size == 0:
                g2 = min(j + group_size, cols)
                if bug == "group_from_original":
                    Wg = W0[:, j:g2]
                else:
                    later = W[:, i2:g2] - Err1 @ Hinv[i1:i2, i2:g2]
                    Wg = torch.cat([W1[:, i:], later], 1)[:, :g2 - j]
                scale, zero = ref.quant_params(Wg, bits, sym)
                scales.append(scale); zeros.append(zero)
            w = W1[:, i].clone()
            q = ref.quantize(w[:, None], scale, zero, bits)[:, 0]
            err = (w - q) if bug == "no_divide" else (w - q) / Hinv1[i, i]
            if bug == "update_quantized":                    # quantize in place, then update from i
                W1[:, i] = q
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                Q1[:, i] = W1[:, i]
            else:
                Q1[:, i] = q
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        if bug != "no_lazy_update":
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order and bug != "no_unpermute":
        Q = Q[:, torch.argsort(perm)]
    if not grouped:
        scales, zeros = [scale], [zero]
    return Q.to(dtype), torch.cat(scales, 1), torch.cat(zeros, 1)


def _mutant(bug):
    return lambda *a, **k: _gptq(*a, bug=bug, **k)


# --------------------------------------------------------------------------- gptq_quantize
def test_gptq_quantize_reference_and_mutant_twin_pass():
    assert _grade("gptq_quantize", ref.gptq_quantize).ok
    r = _grade("gptq_quantize", _gptq)                       # the mutants' harness, no bug
    assert r.ok, r.summary()


def test_gptq_quantize_stub_fails():
    r = _grade("gptq_quantize", _stub)
    assert r.passed == 0 and "not implemented" in r.messages[0]


@pytest.mark.parametrize("bug,hint", [
    ("H_for_Hinv", "H used where H⁻¹ belongs"),
    ("no_damping", "LinAlgError"),
    ("no_divide", "grid point"),
    ("update_quantized", "never update a column after it is quantized"),
    ("no_lazy_update", "apply the block's errors to all later columns"),
    ("group_from_original", "fitted to the original weights"),
    ("no_unpermute", "undo the permutation"),
])
def test_gptq_quantize_mutants_fail(bug, hint):
    r = _grade("gptq_quantize", _mutant(bug))
    assert not r.ok, f"{bug} passed"
    assert any(hint in m for m in r.messages), (bug, r.messages)


# --------------------------------------------------------------------------- quantize_rtn
def test_quantize_rtn_both_ways():
    assert _grade("quantize_rtn", ref.quantize_rtn).ok
    assert _grade("quantize_rtn", _stub).passed == 0

    def per_tensor(W, bits=4, group_size=-1, sym=False):     # scale per tensor, not per row
        s, z = ref.quant_params(W.reshape(1, -1), bits, sym)
        n = 1 if group_size <= 0 else math.ceil(W.shape[1] / group_size)
        return (ref.quantize(W, s, z, bits), s.expand(W.shape[0], n).clone(),
                z.expand(W.shape[0], n).clone())
    r = _grade("quantize_rtn", per_tensor)
    assert not r.ok and any("scale" in m for m in r.messages), r.messages

    def no_clamp(W, bits=4, group_size=-1, sym=False):       # rows flattened to one vector
        W_hat, s, z = ref.quantize_rtn(W, bits, group_size, sym)
        return W_hat, s.reshape(-1), z.reshape(-1)
    r = _grade("quantize_rtn", no_clamp)
    # the record's form is checked against OUTPUTS before verify_X: the message names the shape
    assert not r.ok and any("(rows, n_groups)" in m or "expected (8, 1)" in m for m in r.messages), r.messages


# --------------------------------------------------------------------------- pack_codes
def _bits_of(codes, bits, lsb_first=True):
    flat = codes.reshape(-1).long()
    shifts = torch.arange(bits) if lsb_first else torch.arange(bits - 1, -1, -1)
    return ((flat[:, None] >> shifts) & 1).reshape(-1)


def _bytes_of(stream, lsb_first=True):
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    w = 2 ** (torch.arange(8) if lsb_first else torch.arange(7, -1, -1))
    return (stream * w).sum(1).to(torch.uint8)


def test_pack_codes_both_ways():
    assert _grade("pack_codes", ref.pack_codes).ok
    assert _grade("pack_codes", _stub).passed == 0

    def numpy_little(codes, bits):                          # numpy's packbits, little-endian: correct
        import numpy as np
        stream = ((codes.reshape(-1, 1).numpy() >> np.arange(bits)) & 1).astype(np.uint8)
        return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))
    assert _grade("pack_codes", numpy_little).ok


@pytest.mark.parametrize("bug,hint", [
    ("code_msb_first", "least significant bit comes first"),
    ("byte_msb_first", "bitorder='little'"),
    ("numpy_default", "most significant bit first"),
    ("column_major", "row-major order"),
    ("one_byte_per_code", "one byte per code"),
    ("rows_padded", "each row was padded"),
    ("last_byte_dropped", "the last, partial byte is missing"),
    ("int64", "expected torch.uint8"),
])
def test_pack_codes_mistakes_fail(bug, hint):
    def packed(codes, bits):
        if bug == "code_msb_first":
            return _bytes_of(_bits_of(codes, bits, lsb_first=False))
        if bug == "byte_msb_first":
            return _bytes_of(_bits_of(codes, bits), lsb_first=False)
        if bug == "numpy_default":                          # np.packbits without bitorder
            return _bytes_of(_bits_of(codes, bits, lsb_first=False), lsb_first=False)
        if bug == "column_major":
            return ref.pack_codes(codes.T.contiguous(), bits)
        if bug == "one_byte_per_code":
            return codes.reshape(-1).to(torch.uint8)
        if bug == "rows_padded":
            return torch.cat([ref.pack_codes(row, bits) for row in codes])
        if bug == "last_byte_dropped":
            return ref.pack_codes(codes, bits)[:codes.numel() * bits // 8]
        if bug == "int64":
            return ref.pack_codes(codes, bits).long()
        raise AssertionError(bug)
    r = _grade("pack_codes", packed)
    assert not r.ok, f"{bug} passed"
    assert any(hint in m for m in r.messages), (bug, r.messages)


# --------------------------------------------------------------------------- obs_update
def test_obs_update_both_ways():
    assert _grade("obs_update", ref.obs_update).ok
    assert _grade("obs_update", _stub).passed == 0

    def no_divide(w, Hinv, q, target):
        delta = target - w[q]
        return w + delta * Hinv[:, q], 0.5 * delta ** 2
    r = _grade("obs_update", no_divide)
    assert r.passed == 0 and all("[H⁻¹]_qq" in m for m in r.messages), r.messages

    def H_for_Hinv(w, Hinv, q, target):
        return ref.obs_update(w, torch.linalg.inv(Hinv), q, target)
    r = _grade("obs_update", H_for_Hinv)
    assert r.passed == 0, r.messages

    def L_without_half(w, Hinv, q, target):
        w_new, L = ref.obs_update(w, Hinv, q, target)
        return w_new, 2 * L
    r = _grade("obs_update", L_without_half)
    assert r.passed == 0 and all("L = ½" in m for m in r.messages), r.messages


# --------------------------------------------------------------------------- obs columns
def test_obs_quantize_columns_both_ways():
    assert _grade("obs_quantize_columns", ref.obs_quantize_columns).ok
    assert _grade("obs_quantize_columns", _stub).passed == 0

    def hinv_not_updated(W, H, bits=4, group_size=-1, percdamp=0.01, sym=False):
        W = W.clone()
        scale, zero = ref.quant_params(W, bits, sym)
        Hd = H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
        Hinv = torch.linalg.inv(Hd)
        Q = torch.zeros_like(W)
        scales, zeros = [], []
        for q in range(W.shape[1]):
            if group_size > 0 and q % group_size == 0:
                scale, zero = ref.quant_params(W[:, q:q + group_size], bits, sym)
                scales.append(scale); zeros.append(zero)
            Q[:, q] = ref.quantize(W[:, q:q + 1], scale, zero, bits)[:, 0]
            W += (Q[:, q] - W[:, q])[:, None] * Hinv[q][None, :] / Hinv[q, q]
        if not scales:
            scales, zeros = [scale], [zero]
        return Q, torch.cat(scales, 1), torch.cat(zeros, 1)
    r = _grade("obs_quantize_columns", hinv_not_updated)
    assert not r.ok and any("grid point" in m for m in r.messages), r.messages


# --------------------------------------------------------------------------- GPTQ class
def test_GPTQ_class_both_ways():
    assert _grade("GPTQ", ref.GPTQ).ok
    assert _grade("GPTQ", _StubGPTQ).passed == 0

    class SumNotMean(ref.GPTQ):
        def add_batch(self, inp, out=None):
            x = inp.reshape(-1, inp.shape[-1]).float()
            self.H += 2 * x.T @ x
    r = _grade("GPTQ", SumNotMean)
    assert r.passed == 0 and any("factor" in m for m in r.messages), r.messages

    class PerSequence(ref.GPTQ):                            # counts sequences, not tokens
        def add_batch(self, inp, out=None):
            x = inp if inp.dim() == 3 else inp[None]
            n = x.shape[0]
            x = x.reshape(-1, x.shape[-1]).float()
            self.H *= self.nsamples / (self.nsamples + n)
            self.nsamples += n
            x = math.sqrt(2 / self.nsamples) * x
            self.H += x.T @ x
    r = _grade("GPTQ", PerSequence)
    assert not r.ok, r.messages


# --------------------------------------------------------------------------- quantize_model
def test_quantize_model_both_ways():
    r = _grade("quantize_model", ref.quantize_model)
    assert r.ok, r.summary()
    assert _grade("quantize_model", _stub).passed == 0

    @torch.no_grad()
    def unquantized_inputs(model, method, calib, bits, group_size):
        if method == "rtn":
            return ref.quantize_model(model, method, calib, bits, group_size)
        gs = {}                                              # every H from the fp32 model
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: gs.setdefault(n, ref.GPTQ(mod)).add_batch(a[0]))
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        model(calib, use_cache=False)
        for h in hooks:
            h.remove()
        for g in gs.values():
            g.quantize(bits, group_size)
        return model
    r = _grade("quantize_model", unquantized_inputs)
    assert not r.ok and any("AFTER they were quantized" in m for m in r.messages), r.messages

    def head_too(model, method, calib, bits, group_size):
        ref.quantize_model(model, method, calib, bits, group_size)
        W = model.lm_head.weight.data
        W.copy_(ref.quantize_rtn(W, bits)[0])
        return model
    r = _grade("quantize_model", head_too)
    assert not r.ok and any("only the decoder layers" in m for m in r.messages), r.messages

    def nothing(model, method, calib, bits, group_size):
        return model
    r = _grade("quantize_model", nothing)
    assert r.passed == 0 and any("not quantized" in m for m in r.messages), r.messages


# --------------------------------------------------------------------------- the method
# gptq_quantize must be the blocked Cholesky algorithm written in the notebook
# (autograder/static.py reads the notebook's code on the trusted side).
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

from autograder import static  # noqa: E402
from autograder.notebook import cell_source, nbgrader_meta  # noqa: E402

SOLUTION = pathlib.Path(__file__).parents[2] / "solutions" / LAB / f"{LAB}.ipynb"


def _solution_nb():
    return json.loads(SOLUTION.read_text())


def _with_gptq_body(body, extra_cell=None):
    """The solution notebook with gptq_quantize's solution replaced by ``body``."""
    nb = _solution_nb()
    for i, cell in enumerate(nb["cells"]):
        if nbgrader_meta(cell).get("grade_id") == "gptq_quantize_impl":
            cell["source"] = re.sub(r"[ \t]*### BEGIN SOLUTION.*### END SOLUTION",
                                    lambda m: body.strip("\n"), cell_source(cell), flags=re.S)
            if extra_cell:
                nb["cells"].insert(i, {"cell_type": "code", "metadata": {}, "source": extra_cell})
            return nb
    raise KeyError("gptq_quantize_impl")


def _verdicts(nb):
    return static.method_verdicts(LAB, nb)


def test_reference_solution_follows_the_method():
    assert _verdicts(_solution_nb()) == {}


def test_release_stub_fails_the_method():
    nb = _with_gptq_body("    raise NotImplementedError()")
    assert "never calls a Cholesky factorization" in _verdicts(nb)["gptq_quantize"]


@pytest.mark.parametrize("body,name", [
    ("    return obs_quantize_columns(W, H, bits, group_size, percdamp, sym)", "obs_quantize_columns"),
    ("""
    W = W.clone()
    Hinv = torch.linalg.inv(H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype))
    torch.linalg.cholesky(Hinv)
    scale, zero = quant_params(W, bits, sym)
    for q in range(W.shape[1]):
        for r in range(W.shape[0]):
            W[r], _ = obs_update(W[r], Hinv, q, quantize(W[r, q], scale[r], zero[r], bits))
    return W, scale, zero
""", "obs_update"),
])
def test_gptq_built_on_the_per_column_obs_fails(body, name):
    msg = _verdicts(_with_gptq_body(body))["gptq_quantize"]
    assert f"uses {name}" in msg and "Cholesky" in msg, msg


def test_gptq_through_a_renamed_obs_fails():
    nb = _with_gptq_body("    return column_by_column(W, H, bits, group_size, percdamp, sym)",
                         extra_cell="column_by_column = obs_quantize_columns")
    assert "uses obs_quantize_columns" in _verdicts(nb)["gptq_quantize"]


@pytest.mark.parametrize("extra,body,shown", [
    ("from llmopt.viz.quant import _gptq_state",
     "    return _gptq_state(W, quantize_rtn(W, bits)[0], H, 0), None, None", "llmopt.viz.quant._gptq_state"),
    (None, "    import llmopt.viz.quant as vq\n    return vq._gptq_state(W, W, H, 0), None, None",
     "llmopt.viz.quant"),
    ("from llmopt import gptq as g",
     "    return g.gptq_quantize(W, H, bits, group_size, block_size, percdamp, act_order, sym)",
     "llmopt.gptq.gptq_quantize"),
    (None, "    from llmopt.gptq import gptq_quantize as q\n    return q(W, H, bits)", "llmopt.gptq"),
])
def test_gptq_from_the_course_library_fails(extra, body, shown):
    msg = _verdicts(_with_gptq_body(body, extra))["gptq_quantize"]
    assert shown in msg and "course library" in msg, msg


def test_gptq_without_cholesky_fails():
    nb = _with_gptq_body("""
    W = W.clone()
    Hinv = torch.linalg.inv(H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype))
    scale, zero = quant_params(W, bits, sym)
    Q = torch.zeros_like(W)
    for q in range(W.shape[1]):
        Q[:, q] = quantize(W[:, q:q + 1], scale, zero, bits)[:, 0]
        W += (Q[:, q] - W[:, q])[:, None] * Hinv[q][None, :] / Hinv[q, q]
        Hinv -= Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    return Q, scale, zero
""")
    msg = _verdicts(nb)["gptq_quantize"]
    assert "never calls a Cholesky factorization" in msg, msg


def test_other_parts_from_the_library_fail():
    nb = _solution_nb()
    nb["cells"].append({"cell_type": "code", "metadata": {}, "source": "from llmopt.gptq import obs_update"})
    assert "llmopt.gptq.obs_update" in _verdicts(nb)["obs_update"]


def test_pack_codes_from_the_library_fails():
    nb = _solution_nb()
    for cell in nb["cells"]:
        if nbgrader_meta(cell).get("grade_id") == "pack_codes_impl":
            cell["source"] = ("from llmopt.gptq import pack_codes as _p\n\n\n"
                              "def pack_codes(codes, bits):\n    return _p(codes, bits)\n")
    assert "llmopt.gptq.pack_codes" in _verdicts(nb)["pack_codes"]


# --------------------------------------------------------------------------- NaN, output specs
def test_nan_in_an_output_fails_with_a_message_saying_so():
    def nan_gptq(*a, **k):
        W_hat, s, z = ref.gptq_quantize(*a, **k)
        W_hat[0, 0] = float("nan")                          # NaN > tol is False: must still fail
        return W_hat, s, z
    r = _grade("gptq_quantize", nan_gptq)
    assert r.passed == 0 and all("W_hat contains NaN" in m for m in r.messages), r.messages

    def nan_model(model, method, calib, bits, group_size):
        ref.quantize_model(model, method, calib, bits, group_size)
        model.model.decoder.layers[0].fc1.weight.data[0, 0] = float("nan")
        return model
    r = _grade("quantize_model", nan_model)
    assert r.passed == 0 and all("NaN" in m for m in r.messages), r.messages

    def nan_L(w, Hinv, q, target):
        return ref.obs_update(w, Hinv, q, target)[0], float("nan")
    r = _grade("obs_update", nan_L)
    assert r.passed == 0 and all("L contains NaN" in m for m in r.messages), r.messages


def test_output_specs_match_the_reference_records():
    """What run_X returns for the reference has exactly OUTPUTS[X]'s keys, kinds and shapes."""
    labkit.assert_outputs_match_reference(LAB, {
        "quantize_rtn": ref.quantize_rtn, "pack_codes": ref.pack_codes, "obs_update": ref.obs_update,
        "obs_quantize_columns": ref.obs_quantize_columns, "gptq_quantize": ref.gptq_quantize,
        "GPTQ": ref.GPTQ, "quantize_model": ref.quantize_model})
