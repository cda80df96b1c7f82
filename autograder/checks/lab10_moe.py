"""How the hidden checks of lab10_moe are judged (trusted side; never in the kernel).

The reference is ``llmopt.moe`` (which equals transformers' Mixtral: ``lib/tests/test_moe.py``);
the whole block and the balancing loss are judged against transformers itself:
``MixtralSparseMoeBlock`` (eager experts, fp32) and ``load_balancing_loss_func``.

"Grouped" must be the method, not the loop in disguise. The evidence is the notebook's code
(``METHOD``): ``moe_grouped`` must sort the (token, expert) pairs (argsort/sort) and may not
reach ``moe_loop`` or ``SwiGLUExpert``; an in-kernel count of matmul calls (more than 3 per
expert means a loop over tokens) is an extra, early failure, never a reason to pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autograder import static
from llmopt import moe as ref
from llmopt.testing import compare

# The sandbox shows these llmopt modules (and what they import); moe stays hidden.
LLMOPT_VISIBLE = ["gpt", "data", "bench", "testing", "viz.moe"]
NEEDS_CORPUS = True           # part 3 routes windows of the course corpus through tiny-opt

RTOL = 1e-5


def _not_finite(out: dict) -> str | None:
    for name, t in out.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            bad = ~torch.isfinite(t)
            kind = "NaN" if torch.isnan(t).any() else "inf"
            return f"{name} contains {kind} ({int(bad.sum())} of {t.numel()} entries)"
    return None


def _close(got, exp, name, rtol=RTOL):
    if tuple(got.shape) != tuple(exp.shape):
        return f"{name}: shape {tuple(got.shape)}, expected {tuple(exp.shape)}"
    scale = float(exp.abs().max()) if exp.numel() else 1.0
    return compare(got.double(), exp.double(), rtol=rtol, atol=rtol * max(scale, 1e-6), name=name)


def _near(got, exp, rtol=1e-4):
    return tuple(got.shape) == tuple(exp.shape) and _close(got, exp, "", rtol) is None


# --------------------------------------------------------------------------- the expert
def _swiglu_swapped(x, w1, w2, w3):
    return F.linear(F.silu(F.linear(x, w3)) * F.linear(x, w1), w2)


def verify_SwiGLUExpert(case: dict, out: dict) -> str | None:
    x, w1, w2, w3 = case["x"], case["w1"], case["w2"], case["w3"]
    y = out["y"]
    msg = _not_finite(out)
    if msg:
        return msg
    exp = ref.swiglu(x, w1, w2, w3)
    msg = _close(y, exp, f"y (x {tuple(x.shape)}, d_model {case['d']}, d_ff {case['f']})")
    if msg is None:
        return None
    if _near(y, _swiglu_swapped(x, w1, w2, w3)):
        return msg + " — gate and up projections swapped: SwiGLU(x) = w2(silu(w1 x) · w3 x), silu on w1 (the gate)"
    if _near(y, F.linear(F.relu(F.linear(x, w1)) * F.linear(x, w3), w2)):
        return msg + " — the activation is SiLU (x·sigmoid(x)), not ReLU"
    if _near(y, F.linear(F.silu(F.linear(x, w1)), w2)) or _near(y, F.linear(F.silu(F.linear(x, w1) * F.linear(x, w3)), w2)):
        return msg + " — multiply silu(w1 x) by the up projection w3 x (the gated linear unit), then apply w2"
    return msg + " — SwiGLU(x) = w2(silu(w1 x) · w3 x) with nn.Linear layers w1, w3: d_model → d_ff, w2: d_ff → d_model"


# --------------------------------------------------------------------------- the router
def _by_expert(weights, experts):
    """Rows sorted by expert id, so that the order of the k choices does not matter."""
    order = experts.argsort(-1)
    return weights.gather(-1, order), experts.gather(-1, order)


def verify_TopKRouter(case: dict, out: dict) -> str | None:
    x, W, k = case["x"], case["W_g"], case["k"]
    N, E = x.shape[0], W.shape[0]
    msg = _not_finite({"weights": out["weights"], "logits": out["logits"]})
    if msg:
        return msg
    router = ref.TopKRouter(case["d"], E, k)
    with torch.no_grad():
        router.weight.copy_(W)
        w_exp, e_exp, l_exp = router(x)
    weights, experts, logits = out["weights"], out["experts"], out["logits"]
    msg = _close(logits, l_exp, "logits")
    if msg:
        if tuple(logits.shape) == (E, N):
            return msg + " — logits are (N tokens, E experts): x @ W_g.T"
        return msg + " — logits = x · W_gᵀ with W_g = router.weight of shape (E, d_model)"
    if tuple(experts.shape) != (N, k) or tuple(weights.shape) != (N, k):
        got = tuple(experts.shape) if tuple(experts.shape) != (N, k) else tuple(weights.shape)
        hint = ""
        if got == (k, E) or got == (N, E) or got[0] == k:
            hint = " — top-k over the wrong dimension: take the k largest over the experts (dim=-1) for each token"
        return f"experts/weights: shape {got}, expected (N, k) = {(N, k)}{hint}"
    if experts.is_floating_point():
        return f"experts: dtype {experts.dtype}, expected integer expert indices (topk's indices)"
    w_s, e_s = _by_expert(weights.float(), experts.long())
    w_es, e_es = _by_expert(w_exp, e_exp)
    if not torch.equal(e_s, e_es):
        bad = int((e_s != e_es).any(-1).sum())
        return (f"experts: {bad} of {N} tokens chose other experts than their {k} largest logits — "
                "top-k over the experts (dim=-1) of each token's logits")
    sums = weights.float().sum(-1)
    if (sums - 1).abs().max() > 1e-4:
        probs = torch.softmax(l_exp, -1)
        if _near(w_s, probs.gather(-1, e_es)):
            return (f"weights: they sum to {float(sums.min()):.3f}…{float(sums.max()):.3f} per token, not 1 — "
                    "softmax over all experts without renormalising over the chosen k: "
                    "Softmax(Top2(x·W_g)) is a softmax of the k chosen logits")
        return f"weights: they must sum to one over the {k} chosen experts of each token"
    msg = _close(w_s, w_es, "weights (gate values, matched by expert)", rtol=1e-5)
    if msg:
        return msg + " — weights = softmax of the k chosen logits (in fp32)"
    return None


# --------------------------------------------------------------------------- dispatch
def _dispatch_variants(case):
    x, wts, ex, w1, w2, w3 = (case[n] for n in ("x", "weights", "experts", "w1", "w2", "w3"))
    out = {"swapped": ref.moe_loop(x, wts, ex, w3, w2, w1),       # silu on the up projection
           "unweighted": ref.moe_loop(x, torch.ones_like(wts), ex, w1, w2, w3)}
    N, k = ex.shape
    order = torch.argsort(ex.reshape(-1), stable=True)
    ys = torch.stack([ref.swiglu(x[t // k][None], w1[e], w2[e], w3[e])[0]
                      for t, e in zip(order.tolist(), ex.reshape(-1)[order].tolist())])
    ys = ys * wts.reshape(-1)[order, None]
    out["not_unsorted"] = ys.view(N, k, -1).sum(1)                 # the sorted rows, left in place
    return out


def _verify_dispatch(case: dict, y: torch.Tensor, grouped: bool) -> str | None:
    x, ex = case["x"], case["experts"]
    msg = _not_finite({"y": y})
    if msg:
        return msg
    exp = ref.moe_loop(x, case["weights"], ex, case["w1"], case["w2"], case["w3"])
    N, k = ex.shape
    E = case["w1"].shape[0]
    where = f"N={N} tokens, E={E} experts, k={k}"
    msg = _close(y, exp, f"y ({where})")
    if msg is None:
        return None
    v = _dispatch_variants(case)
    if _near(y, v["swapped"]):
        return msg + " — gate and up projections swapped: w2(silu(w1 x) · w3 x), silu on w1"
    if _near(y, v["unweighted"]):
        return msg + " — multiply each expert's output by the token's gate weight for that expert"
    if grouped and N > 1 and _near(y, v["not_unsorted"]):
        return msg + (" — tokens scattered back to the wrong positions after sorting: undo the sort "
                      "(the sorted pair i belongs to token order[i] // k)")
    if grouped:
        return msg + (" — check the unsort: each row of the sorted buffer belongs to token order[i] // k, "
                      "and each token sums its k weighted expert outputs")
    return msg + " — y[t] = Σ_j weights[t, j] · SwiGLU_{experts[t, j]}(x[t])"


def verify_moe_loop(case: dict, out: dict) -> str | None:
    return _verify_dispatch(case, out["y"], grouped=False)


def verify_moe_grouped(case: dict, out: dict) -> str | None:
    msg = _verify_dispatch(case, out["y"], grouped=True)
    if msg:
        return msg
    E = case["w1"].shape[0]
    calls = int(out["matmul_calls"])
    if calls > 3 * E + 3:
        return (f"{calls} matmul calls for {E} experts: the grouped dispatch runs one matmul per expert "
                "(at most 3 per expert for w1, w3, w2) on the gathered tokens, not one per token")
    return None


# --------------------------------------------------------------------------- the balancing loss
def _hf_loss(logits, k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    E = logits.shape[-1]
    return load_balancing_loss_func((logits.reshape(-1, E),), E, k)


def verify_load_balancing_loss(case: dict, out: dict) -> str | None:
    logits, k = case["logits"], case["k"]
    got = out["loss"]
    msg = _not_finite(out)
    if msg:
        return msg
    if got.numel() != 1:
        return f"loss: {got.numel()} values, expected one scalar (over all tokens of all rows)"
    exp = _hf_loss(logits, k).reshape(1)
    msg = _close(got, exp, f"loss (router_logits {tuple(logits.shape)}, top_k={k})")
    if msg is None:
        return None
    E = logits.shape[-1]
    if logits.dim() == 3:
        per_row = torch.stack([_hf_loss(row, k) for row in logits]).mean().reshape(1)
        if _near(got, per_row, 1e-5):
            return msg + (" — the loss per batch row, then averaged: f_e and P_e are fractions over ALL tokens "
                          "(flatten router_logits to (N, E) first)")
    f_k = _hf_loss(logits, k) / k
    if _near(got, f_k.reshape(1), 1e-5):
        return msg + " — f_e counts every one of the k choices of each token (Σ_e f_e = k), not fractions of N·k"
    probs = torch.softmax(logits.reshape(-1, E).float(), -1)
    if _near(got, (E * (probs.mean(0) ** 2).sum()).reshape(1), 1e-5):
        return msg + " — f_e is the fraction of tokens routed to e (from the top-k choices), not a probability"
    return msg + " — loss = E · Σ_e f_e · P_e: f_e = (tokens with e among their top k) / N, P_e = mean softmax probability of e"


# --------------------------------------------------------------------------- the whole block
def _hf_block(case: dict):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    E, d = case["gate"].shape
    f = case["down_proj"].shape[-1]
    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E,
                        num_experts_per_tok=case["k"])
    cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        block.gate.weight.copy_(case["gate"])
        block.experts.gate_up_proj.copy_(case["gate_up_proj"])
        block.experts.down_proj.copy_(case["down_proj"])
    return block


def verify_SparseMoE(case: dict, out: dict) -> str | None:
    msg = _not_finite(out)
    if msg:
        return msg
    block = _hf_block(case)
    x = case["x"]
    with torch.no_grad():
        y_exp = block(x)
        l_exp = block.gate(x)[0]
    N, E = l_exp.shape
    for dispatch in ("loop", "grouped"):
        y, logits = out[f"y_{dispatch}"], out[f"logits_{dispatch}"]
        if tuple(logits.reshape(-1, logits.shape[-1]).shape) != (N, E):
            return f"router_logits ({dispatch}): shape {tuple(logits.shape)}, expected (N, E) = {(N, E)}"
        msg = _close(logits.reshape(N, E), l_exp, f"router_logits ({dispatch})")
        if msg:
            return msg + " — the router's logits x · W_gᵀ for every token, (B·T, E)"
        msg = _close(y, y_exp, f"y with dispatch='{dispatch}' vs transformers' MixtralSparseMoeBlock "
                               f"(x {tuple(x.shape)}, E={E}, k={case['k']})")
        if msg:
            if tuple(y.shape) != tuple(y_exp.shape):
                return msg + " — return y in x's shape (B, T, d_model)"
            return msg + (" — your router and dispatch pass their own checks? then look at forward: "
                          "flatten x to (N, d), route, dispatch with self.dispatch, reshape back")
    return None


# --- how the parts must be computed (read from the notebook's source, see static.py) --------
_LIBRARY_OK = ("llmopt.testing",)
_PLAIN = ("torch", "math", "numpy", "typing", "functools", "itertools", "collections", "dataclasses",
          "statistics", "warnings", "sys.stderr", "sys.stdout", "time")
_NO_LIBRARY_MOE = static.forbids(
    "transformers", "Mixtral*", "*load_balancing_loss_func*", "*MoeBlock*", "megablocks", "deepspeed",
    "tutel", "fairscale", "vllm", "sglang",
    why=": this part asks for your own MoE code, not a library's (transformers' Mixtral, MegaBlocks, ...)")
_OWN_CODE = [static.no_dynamic_access(), static.no_llmopt_imports(allowed=_LIBRARY_OK), _NO_LIBRARY_MOE,
             static.imports_only(*_PLAIN, *_LIBRARY_OK)]
def _sorts_by_expert():
    """Some reachable code uses a sort (torch.argsort / torch.sort / x.argsort() / x.sort(),
    also on a call's result): the grouped dispatch orders the (token, expert) pairs by expert."""
    def rule(code, fn):
        units, _ = code.reachable(fn)
        for name, b, u, jit in units:
            if any(n.rsplit(".", 1)[-1] in ("argsort", "sort") for n in u.names | u.calls):
                return None
        return (f"{fn} never sorts the (token, expert) pairs by expert (torch.argsort): the grouped "
                "dispatch gathers the tokens expert by expert into contiguous slices")
    return rule


_GROUPED = _OWN_CODE + [
    static.does_not_reach("moe_loop", "SwiGLUExpert",
                          why=": the grouped dispatch is its own code (sort, gather, one matmul per expert "
                              "on its slice, unsort), not the loop or the expert module in disguise"),
    _sorts_by_expert()]
METHOD = {"SwiGLUExpert": _OWN_CODE, "TopKRouter": _OWN_CODE, "moe_loop": _OWN_CODE,
          "moe_grouped": _GROUPED, "load_balancing_loss": _OWN_CODE, "SparseMoE": _OWN_CODE}


# --- what each run_X records: {key: (kind, shape)}, checked before anything is computed ----
def _sparse_outputs(case):
    return {f"{k}_{d}": ("float", None) for k in ("y", "logits") for d in ("loop", "grouped")}


OUTPUTS = {
    "SwiGLUExpert": lambda case: {"y": ("float", None)},
    "TopKRouter": lambda case: {"weights": ("float", None), "experts": ("any", None), "logits": ("float", None)},
    "moe_loop": lambda case: {"y": ("float", None)},
    "moe_grouped": lambda case: {"y": ("float", None), "matmul_calls": ("int", ())},
    "load_balancing_loss": lambda case: {"loss": ("float", (None,))},
    "SparseMoE": _sparse_outputs,
}
