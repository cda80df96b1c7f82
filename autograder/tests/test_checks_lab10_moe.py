"""The hidden checks of lab10_moe, both ways: the reference passes, a stub and each broken variant
of course/mistakes.md (lab10 rows) fail with a message that points at the mistake, and the METHOD
rules refuse transformers' Mixtral / load_balancing_loss_func, the course library, and a "grouped"
dispatch that is the loop in disguise."""
import json
import pathlib
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import labkit
from autograder import grade_functions, static
from autograder.notebook import cell_source, nbgrader_meta
from llmopt import moe as ref

LAB = "lab10_moe"
SOLUTION = pathlib.Path(__file__).parents[2] / "solutions" / LAB / f"{LAB}.ipynb"


def _grade(name, fn, seed=0):
    return labkit.grade(LAB, name, fn, seed)


_stub = labkit.stub


def _fails(name, fn, hint, all_cases=False):
    return labkit.fails(LAB, name, fn, hint, all_cases)


# --------------------------------------------------------------------------- the reference
REFERENCE = {"SwiGLUExpert": ref.SwiGLUExpert, "TopKRouter": ref.TopKRouter, "moe_loop": ref.moe_loop,
             "moe_grouped": ref.moe_grouped, "load_balancing_loss": ref.load_balancing_loss,
             "SparseMoE": ref.SparseMoE}


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_passes(seed):
    res = grade_functions(LAB, REFERENCE, seed)
    for name, r in res.items():
        assert r.ok, (name, r.summary())


class _StubModule(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        raise NotImplementedError()

    @classmethod
    def from_hf(cls, block, dispatch="grouped"):
        raise NotImplementedError()


def test_stubs_fail():
    stubs = {name: (_StubModule if name[0].isupper() else _stub) for name in REFERENCE}
    res = grade_functions(LAB, stubs)
    for name, r in res.items():
        assert r.passed == 0 and "not implemented" in r.messages[0].lower() or "NotImplementedError" in r.messages[0], \
            (name, r.messages)


# --------------------------------------------------------------------------- mistakes
class SwappedExpert(ref.SwiGLUExpert):
    def forward(self, x):                                   # gate and up projections swapped
        return self.w2(F.silu(self.w3(x)) * self.w1(x))


def test_swiglu_gate_up_swapped():
    _fails("SwiGLUExpert", SwappedExpert, "gate and up projections swapped", all_cases=True)


class ReluExpert(ref.SwiGLUExpert):
    def forward(self, x):
        return self.w2(F.relu(self.w1(x)) * self.w3(x))


def test_swiglu_relu():
    _fails("SwiGLUExpert", ReluExpert, "SiLU")


class NoRenormRouter(ref.TopKRouter):
    def forward(self, x):                                   # softmax over all, no renormalisation
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits.float(), -1)
        w, e = probs.topk(self.top_k, -1)
        return w, e, logits


class WrongDimRouter(ref.TopKRouter):
    def forward(self, x):                                   # top-k over the tokens
        logits = F.linear(x, self.weight)
        top, e = logits.topk(self.top_k, dim=0)
        return torch.softmax(top, 0), e, logits


def test_router_softmax_without_renormalising():
    _fails("TopKRouter", NoRenormRouter, "without renormalising", all_cases=True)


def test_router_topk_wrong_dimension():
    _fails("TopKRouter", WrongDimRouter, "wrong dimension", all_cases=True)


def _loop_swapped(x, weights, experts, w1, w2, w3):
    return ref.moe_loop(x, weights, experts, w3, w2, w1)


def _grouped_no_unsort(x, weights, experts, w1, w2, w3, use_grouped_mm=None):
    """Sort, compute, weight — and sum the sorted rows where they are (no unsort)."""
    N, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x[order // k]
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=w1.shape[0]).tolist()):
        if n:
            ys[start:start + n] = ref.swiglu(xs[start:start + n], w1[e], w2[e], w3[e])
        start += n
    ys = ys * weights.reshape(-1)[order, None]
    return ys.view(N, k, -1).sum(1)


def _grouped_wrong_index(x, weights, experts, w1, w2, w3, use_grouped_mm=None):
    """Scatters back with the pair index instead of its token (order, not order // k)."""
    N, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x[order // k]
    ys = torch.cat([ref.swiglu(xs[i:i + 1], w1[int(flat[order[i]])], w2[int(flat[order[i]])],
                               w3[int(flat[order[i]])]) for i in range(len(order))])
    ys = ys * weights.reshape(-1)[order, None]
    y = torch.zeros_like(x)
    y.index_add_(0, order % N, ys)
    return y


def _grouped_per_token(x, weights, experts, w1, w2, w3, use_grouped_mm=None):
    """Right values, one matmul per (token, expert) pair: the counter refuses it."""
    N, k = experts.shape
    order = torch.argsort(experts.reshape(-1), stable=True)
    y = torch.zeros_like(x)
    for i in order.tolist():
        t, j = divmod(i, k)
        e = int(experts[t, j])
        y[t] += weights[t, j] * ref.swiglu(x[t:t + 1], w1[e], w2[e], w3[e])[0]
    return y


def test_dispatch_gate_up_swapped():
    _fails("moe_loop", _loop_swapped, "gate and up projections swapped", all_cases=True)
    _fails("moe_grouped", lambda *a, **kw: _loop_swapped(*a[:6]), "gate and up projections swapped", all_cases=True)


def test_dispatch_unweighted():
    _fails("moe_loop", lambda x, w, e, *W: ref.moe_loop(x, torch.ones_like(w), e, *W), "gate weight")


def test_grouped_scattered_to_wrong_positions():
    r = _fails("moe_grouped", _grouped_no_unsort, "wrong positions after sorting")
    assert r.passed <= 1, r.messages           # only the single-token case survives
    r = _fails("moe_grouped", _grouped_wrong_index, "unsort")
    assert r.passed <= 1, r.messages


def test_grouped_per_token_matmuls_fail_the_counter():
    _fails("moe_grouped", _grouped_per_token, "not one per token")


def _loss_per_row(router_logits, top_k=2):
    if router_logits.dim() == 3:
        return torch.stack([ref.load_balancing_loss(row, top_k) for row in router_logits]).mean()
    return ref.load_balancing_loss(router_logits, top_k)


def test_loss_per_batch_row():
    r = _fails("load_balancing_loss", _loss_per_row, "per batch row")
    assert r.passed == 1, r.messages           # only the (N, E) case agrees


def test_loss_fraction_of_nk():
    _fails("load_balancing_loss", lambda lg, k=2: ref.load_balancing_loss(lg, k) / k, "Σ_e f_e = k", all_cases=True)


def test_loss_unreduced():
    def per_token(lg, k=2):
        return torch.stack([ref.load_balancing_loss(r, k) for r in lg.reshape(-1, lg.shape[-1])])
    _fails("load_balancing_loss", per_token, "one scalar", all_cases=True)


class SparseMoESwapped(ref.SparseMoE):
    @classmethod
    def from_hf(cls, block, dispatch="grouped"):
        m = super().from_hf(block, dispatch)
        with torch.no_grad():
            w1 = m.w1.clone()
            m.w1.copy_(m.w3)
            m.w3.copy_(w1)
        return m


class SparseMoENoRenorm(ref.SparseMoE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        r = NoRenormRouter(self.router.weight.shape[1], self.n_experts, self.top_k)
        r.weight = self.router.weight
        self.router = r


def test_sparse_moe_mistakes_fail_against_transformers():
    _fails("SparseMoE", SparseMoESwapped, "MixtralSparseMoeBlock", all_cases=True)
    _fails("SparseMoE", SparseMoENoRenorm, "MixtralSparseMoeBlock")


def test_nan_outputs_fail_with_a_message_saying_so():
    def nan_loop(*args):
        y = ref.moe_loop(*args)
        y[0, 0] = float("nan")
        return y
    r = _grade("moe_loop", nan_loop)
    assert r.passed == 0 and all("NaN" in m for m in r.messages), r.messages


def test_output_specs_match_the_reference_records():
    from autograder.checks import lab10_moe as checks
    assert set(checks.METHOD) == set(REFERENCE)
    labkit.assert_outputs_match_reference(LAB, REFERENCE)


# --------------------------------------------------------------------------- the method
def _solution_nb():
    return json.loads(SOLUTION.read_text())


def _with_body(fn, body, extra_cell=None):
    """The solution notebook with the solution block of the cell defining ``fn`` replaced by ``body``
    (for a class: the block inside its forward)."""
    nb = _solution_nb()
    for i, cell in enumerate(nb["cells"]):
        src = cell_source(cell)
        if nbgrader_meta(cell).get("solution") and re.search(rf"^(def|class) {fn}\b", src, re.M):
            pattern = rf"((?:def|class) {fn}\b.*?)[ \t]*### BEGIN SOLUTION.*?### END SOLUTION"
            cell["source"] = re.sub(pattern, lambda m: m.group(1) + body.strip("\n"), src, count=1, flags=re.S)
            if extra_cell:
                nb["cells"].insert(i, {"cell_type": "code", "metadata": {}, "source": extra_cell})
            return nb
    raise KeyError(fn)


def _verdicts(nb):
    return static.method_verdicts(LAB, nb)


def test_solution_follows_the_method():
    assert _verdicts(_solution_nb()) == {}


_HF = "transformers.models.mixtral.modeling_mixtral"


@pytest.mark.parametrize("fn,extra,body,shown", [
    ("load_balancing_loss", f"from {_HF} import load_balancing_loss_func",
     "    return load_balancing_loss_func((router_logits.reshape(-1, router_logits.shape[-1]),), "
     "router_logits.shape[-1], top_k)", "load_balancing_loss_func"),
    ("load_balancing_loss", None,
     f"    import {_HF} as mx\n    return mx.load_balancing_loss_func((router_logits,), 8, top_k)", "transformers"),
    ("moe_loop", f"from {_HF} import MixtralExperts",
     "    return MixtralExperts.forward(None, x, experts, weights)", "MixtralExperts"),
    ("moe_grouped", "from transformers.integrations.moe import grouped_mm_experts_forward as gmm",
     "    order = torch.argsort(experts.flatten())\n    return gmm(None, x, experts, weights)", "transformers"),
    ("moe_grouped", "from llmopt.moe import moe_grouped as ref_grouped",
     "    return ref_grouped(x, weights, experts, w1, w2, w3)", "llmopt.moe"),
    ("moe_loop", "from llmopt import moe as ref", "    return ref.moe_loop(x, weights, experts, w1, w2, w3)", "llmopt.moe"),
])
def test_library_moe_is_refused(fn, extra, body, shown):
    msg = _verdicts(_with_body(fn, body, extra)).get(fn)
    assert msg and shown in msg, msg


def test_library_router_in_a_class_is_refused():
    nb = _with_body("TopKRouter", "        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter\n"
                                  "        return MixtralTopKRouter.forward(self, x)")
    assert "transformers" in _verdicts(nb)["TopKRouter"]
    nb = _with_body("SparseMoE", "        import transformers\n        return transformers.MixtralSparseMoeBlock.forward(self, x), None")
    assert "transformers" in _verdicts(nb)["SparseMoE"]


def test_grouped_that_is_the_loop_in_disguise_is_refused():
    nb = _with_body("moe_grouped", "    order = torch.argsort(experts.flatten())\n"
                                   "    return moe_loop(x, weights, experts, w1, w2, w3)")
    assert "moe_loop" in _verdicts(nb)["moe_grouped"]
    nb = _with_body("moe_grouped", "    return moe_loop(x, weights, experts, w1, w2, w3)")
    assert "moe_grouped" in _verdicts(nb)
    # no sort: a per-expert where() loop under another name
    nb = _with_body("moe_grouped", "    y = torch.zeros_like(x)\n    for e in range(w1.shape[0]):\n"
                                   "        t, s = torch.where(experts == e)\n"
                                   "        y.index_add_(0, t, swiglu(x[t], w1[e], w2[e], w3[e]) * weights[t, s, None])\n"
                                   "    return y")
    assert "sort" in _verdicts(nb)["moe_grouped"]
    # through a helper that calls the loop
    nb = _with_body("moe_grouped", "    order = experts.flatten().argsort()\n    return helper(x, weights, experts, w1, w2, w3)",
                    extra_cell="def helper(*a):\n    return moe_loop(*a)")
    assert "moe_loop" in _verdicts(nb)["moe_grouped"]
    # per token through the expert module
    nb = _with_body("moe_grouped", "    order = torch.sort(experts.flatten()).indices\n"
                                   "    ex = SwiGLUExpert(x.shape[1], w1.shape[1])\n    return ex(x)")
    assert "SwiGLUExpert" in _verdicts(nb)["moe_grouped"]


def test_hidden_access_is_refused():
    nb = _with_body("load_balancing_loss", "    return getattr(__import__('transformers'), 'load_' + 'balancing')(router_logits)")
    assert "load_balancing_loss" in _verdicts(nb)


def test_a_sort_written_as_a_method_call_is_accepted():
    nb = _solution_nb()
    for cell in nb["cells"]:
        src = cell_source(cell)
        if "def moe_grouped(" in src:
            assert "torch.argsort(flat, stable=True)" in src
            cell["source"] = src.replace("torch.argsort(flat, stable=True)", "experts.reshape(-1).argsort(stable=True)")
    assert _verdicts(nb) == {}
