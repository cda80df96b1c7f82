"""The hidden checks of hw01_compression, both ways: the reference passes (two seeds), a stub and
each broken variant of course/mistakes.md (hw01 row) fail with a message that points at the
mistake, and the shortcuts the issue names fail: magnitude pruning presented as Wanda or
SparseGPT (on inputs where they differ) and a 2:4 mask that is only 50% sparse overall."""
import math

import pytest
import torch

import labkit
from llmopt import sparsity as ref

LAB = "hw01_compression"
REFERENCE = {"magnitude_prune": ref.magnitude_prune, "nm_mask": ref.nm_mask,
             "wanda_prune": ref.wanda_prune, "sparsegpt_prune": ref.sparsegpt_prune,
             "sparsegpt_prune_nm": ref.sparsegpt_prune, "compress_model": ref.compress_model}


def _grade(name, fn, seed=0):
    return labkit.grade(LAB, name, fn, seed)


def _fails(name, fn, hint, seed=0):
    return labkit.fails(LAB, name, fn, hint, seed=seed)


# --------------------------------------------------------------------------- both ways
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", [n for n in REFERENCE if n != "compress_model"])
def test_reference_passes(name, seed):
    r = _grade(name, REFERENCE[name], seed)
    assert r.ok, r.messages


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_compress_model_passes(seed):
    r = _grade("compress_model", ref.compress_model, seed)
    assert r.ok, r.messages


@pytest.mark.parametrize("name", list(REFERENCE))
def test_stub_fails(name):
    assert not _grade(name, labkit.stub).ok


def test_nan_fails_with_a_message_saying_so():
    _fails("sparsegpt_prune", lambda W, H, s, n=0, m=0, **k: W * float("nan"), "NaN")


# --------------------------------------------------------------------------- magnitude
def _per_row_magnitude(W, sparsity, n=0, m=0):
    if n:
        return ref.magnitude_prune(W, sparsity, n, m)
    return W * ref._keep_largest(W.abs(), sparsity)


def test_magnitude_per_row_fails():
    _fails("magnitude_prune", _per_row_magnitude, "compares every weight of the tensor")


def test_magnitude_that_changes_kept_weights_fails():
    _fails("magnitude_prune", lambda W, s, n=0, m=0: ref.magnitude_prune(W, s, n, m) * 1.01,
           "only zeroes weights")


def test_magnitude_rounding_the_count_wrong_fails():
    def off_by_one(W, s, n=0, m=0):
        if n:
            return ref.magnitude_prune(W, s, n, m)
        k = int(s * W.numel()) + 1
        mask = torch.ones(W.numel(), dtype=torch.bool)
        mask[torch.argsort(W.abs().reshape(-1))[:k]] = False
        return W * mask.reshape(W.shape)
    _fails("magnitude_prune", off_by_one, "expected exactly floor(sparsity · numel)")


# --------------------------------------------------------------------------- n:m
def test_nm_over_output_channels_fails():
    _fails("nm_mask", lambda W, n=2, m=4: ref.nm_mask(W.T.contiguous(), n, m).T, "along the output channels")


def test_nm_only_50_percent_overall_fails():
    def half_overall(W, n=2, m=4):                           # the shortcut: n/m dense overall
        return ref.magnitude_prune(W, 1 - n / m) != 0
    _fails("nm_mask", half_overall, "n:m is a pattern, not a ratio")


def test_nm_keeping_the_smallest_fails():
    _fails("nm_mask", lambda W, n=2, m=4: ref.nm_mask(1 / (W.abs() + 1e-9), n, m), "largest |W|")


def test_nm_float_mask_fails():
    _fails("nm_mask", lambda W, n=2, m=4: ref.nm_mask(W, n, m).float(), "torch.bool")


def test_magnitude_24_over_output_channels_fails():
    def outputs(W, s, n=0, m=0):
        return ref.magnitude_prune(W, s) if not n else W * ref.nm_mask(W.T.contiguous(), n, m).T
    _fails("magnitude_prune", outputs, "along the output channels")


# --------------------------------------------------------------------------- Wanda
def test_wanda_per_tensor_fails():
    def per_tensor(W, X, s, n=0, m=0):
        S = W.abs() * X.to(W.dtype).norm(dim=0)
        if n:
            return W * ref.nm_mask(S, n, m)
        return W * ref._keep_largest(S.reshape(1, -1), s).reshape(W.shape)
    _fails("wanda_prune", per_tensor, "compares the weights of one output row")


def test_wanda_norm_over_the_wrong_axis_fails():
    def wrong_axis(W, X, s, n=0, m=0):
        S = W.abs() * X.to(W.dtype).norm(dim=1)[None, :]    # runs only where tokens == in_features
        return W * (ref.nm_mask(S, n, m) if n else ref._keep_largest(S, s))
    r = _fails("wanda_prune", wrong_axis, "norm is taken over the wrong axis")
    assert sum(not m for m in r.messages) == 0              # the non-square cases crash: no pass


def test_magnitude_presented_as_wanda_fails():
    def magnitude_per_row(W, X, s, n=0, m=0):
        return W * (ref.nm_mask(W, n, m) if n else ref._keep_largest(W.abs(), s))
    _fails("wanda_prune", magnitude_per_row, "that is magnitude pruning")
    r = _grade("wanda_prune", lambda W, X, s, n=0, m=0: ref.magnitude_prune(W, s, n, m))
    assert not r.ok


def test_wanda_with_an_update_fails():
    _fails("wanda_prune", lambda W, X, s, n=0, m=0: ref.wanda_prune(W, X, s, n, m) * 0.9, "only zeroes weights")


# --------------------------------------------------------------------------- SparseGPT
def _sgpt_mutant(bug):
    """The reference sweep with one deliberate bug."""
    def fn(W, H, sparsity, n=0, m=0, block_size=128, percdamp=0.01, bits=0):
        if bug == "no_update":                               # the mask of SparseGPT, nothing moves
            return W * (ref.sparsegpt_prune(W, H, sparsity, n, m, block_size, percdamp) != 0)
        if bug == "magnitude":
            return ref.magnitude_prune(W, sparsity, n, m)
        if bug == "per_row":
            from autograder.checks.hw01_compression import _rowwise_sgpt
            return _rowwise_sgpt(W, H, sparsity, block_size, percdamp).to(W.dtype)
        if bug == "H_for_Hinv":
            Hd = H.double() + percdamp * torch.diag(H.double()).mean() * torch.eye(H.shape[0], dtype=torch.float64)
            return ref.sparsegpt_prune(W, torch.linalg.inv(Hd), sparsity, n, m, block_size, 0.0, bits)
        if bug == "nm_over_outputs":
            return ref.sparsegpt_prune(W.T.contiguous(), torch.eye(W.shape[0], dtype=W.dtype), 0, n, m,
                                       block_size).T
        raise ValueError(bug)
    return fn


@pytest.mark.parametrize("bug,hint", [
    ("no_update", "magnitude pruning with extra steps"),
    ("per_row", "the mask was chosen per row"),
    ("H_for_Hinv", "differ from SparseGPT's"),
])
def test_sparsegpt_mutants_fail(bug, hint):
    _fails("sparsegpt_prune", _sgpt_mutant(bug), hint)


def test_magnitude_presented_as_sparsegpt_fails():
    r = _grade("sparsegpt_prune", _sgpt_mutant("magnitude"))
    assert not r.ok and any("magnitude" in m for m in r.messages if m), r.messages
    r = _grade("sparsegpt_prune_nm", _sgpt_mutant("magnitude"))
    assert not r.ok and any("magnitude" in m for m in r.messages if m), r.messages


def test_sparsegpt_nm_mutants_fail():
    _fails("sparsegpt_prune_nm", _sgpt_mutant("no_update"), "magnitude pruning with extra steps")
    _fails("sparsegpt_prune_nm", _sgpt_mutant("nm_over_outputs"), "along the output channels")


def test_sparsegpt_off_grid_fails():
    def no_rounding(W, H, sparsity, n=0, m=0, block_size=128, percdamp=0.01, bits=0):
        return ref.sparsegpt_prune(W, H, sparsity, n, m, block_size, percdamp)
    _fails("sparsegpt_prune", no_rounding, "grid")


# --------------------------------------------------------------------------- the model
def test_compress_model_on_original_inputs_fails():
    @torch.no_grad()
    def original_inputs(model, recipe, calib):
        """Every layer calibrated on the UNcompressed model's activations."""
        from llmopt import gptq
        r = ref.make_recipe(**recipe)
        layers = gptq.decoder_layers(model)
        inputs = gptq._capture_first_layer_inputs(model, layers, calib, 8)
        for layer in layers:
            linears = gptq.layer_linears(layer)
            acc = {n: gptq.GPTQ(lin) for n, lin in linears.items()}
            hs = [lin.register_forward_hook(lambda mod, inp, out, g=acc[n]: g.add_batch(inp[0]))
                  for n, lin in linears.items()]
            nxt = [gptq._with_hidden(a, k, gptq._first(layer(*a, **k))) for a, k in inputs]
            for h in hs:
                h.remove()
            for n, lin in linears.items():
                lin.weight.data.copy_(ref._compress_weight(lin.weight.data.float(), acc[n].H, r))
            inputs = nxt                                     # the bug: outputs from before compression
        return model
    _fails("compress_model", original_inputs, "layer 0 is right")


def test_compress_model_that_does_nothing_fails():
    _fails("compress_model", lambda model, recipe, calib: model, "was not compressed")


def test_compress_model_wanda_per_tensor_fails():
    def per_tensor(model, recipe, calib):
        if recipe["prune"] == "wanda":
            from llmopt import gptq
            for layer in gptq.decoder_layers(model):
                for lin in gptq.layer_linears(layer).values():
                    lin.weight.data.copy_(ref.magnitude_prune(lin.weight.data, recipe["sparsity"]))
            return model
        return ref.compress_model(model, recipe, calib)
    _fails("compress_model", per_tensor, "Wanda compares the weights of one output row")


# --------------------------------------------------------------------------- METHOD rules
def test_solution_follows_the_method():
    assert labkit.verdicts(LAB, labkit.solution_nb(LAB)) == {}


@pytest.mark.parametrize("fn,body,shown", [
    ("wanda_prune", "    from llmopt.sparsity import wanda_prune as w\n    return w(W, X, sparsity, n, m)",
     "llmopt.sparsity"),
    ("sparsegpt_prune", "    from llmopt import gptq\n    return gptq.gptq_quantize(W, H)[0]", "llmopt.gptq"),
    ("magnitude_prune", "    import torch.nn.utils.prune as P\n    return P.l1_unstructured(W, 'w', sparsity)",
     "torch.nn.utils.prune"),
])
def test_library_shortcuts_fail_the_method(fn, body, shown):
    v = labkit.verdicts(LAB, labkit.with_body(labkit.solution_nb(LAB), fn, body))
    assert shown in v[fn], v


def test_compress_model_may_use_the_earlier_labs_but_not_sparsity():
    nb = labkit.with_body(labkit.solution_nb(LAB), "compress_model",
                          "    from llmopt.sparsity import compress_model as c\n    return c(model, recipe, calib)")
    assert "llmopt.sparsity" in labkit.verdicts(LAB, nb)["compress_model"]


def test_output_specs_match_the_reference_records():
    labkit.assert_outputs_match_reference(LAB, REFERENCE)
