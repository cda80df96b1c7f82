"""Hidden-check cases of lab10_moe (run in the student's kernel; no answers here).

Weights are drawn as Mixtral stores them (router (E, d); experts stacked: w1, w3 (E, d_ff, d),
w2 (E, d, d_ff)); routing tables give every token k distinct experts, with idle experts, one
token, k = 1 and k = 3 among the cases. The whole-block check hands the student's
``SparseMoE.from_hf`` an object laid out like transformers' ``MixtralSparseMoeBlock``.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import gen as _gen

# --------------------------------------------------------------------------- helpers


def _normal(shape, g, std=1.0):
    return torch.randn(shape, generator=g) * std


def expert_weights(E: int, d: int, f: int, g: torch.Generator):
    """w1, w2, w3 as SwiGLU experts hold them (nn.Linear layout), stacked over experts."""
    return (_normal((E, f, d), g, d ** -0.5), _normal((E, d, f), g, f ** -0.5),
            _normal((E, f, d), g, d ** -0.5))


def routing(N: int, E: int, k: int, g: torch.Generator, idle=()):
    """k distinct experts per token (none of ``idle``) and positive weights summing to one."""
    allowed = torch.tensor([e for e in range(E) if e not in idle])
    experts = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(N)])
    weights = torch.softmax(torch.randn(N, k, generator=g), -1)
    return weights, experts


# --- SwiGLUExpert(d_model, d_ff): forward(x) ----------------------------------------------

def inputs_SwiGLUExpert(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 1)
    cases = []
    for d, f, shape in ((16, 40, (9,)), (8, 24, (2, 5)), (32, 16, (1,))):
        w1, w2, w3 = (t[0] for t in expert_weights(1, d, f, g))
        cases.append(dict(d=d, f=f, w1=w1, w2=w2, w3=w3, x=_normal((*shape, d), g)))
    return cases


def run_SwiGLUExpert(cls, case: dict) -> dict:
    m = cls(case["d"], case["f"])
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(m, name).weight.copy_(case[name])
        y = m(case["x"].clone())
    return {"y": torch.as_tensor(y)}


# --- TopKRouter(d_model, n_experts, top_k): forward(x) -> (weights, experts, logits) -------

def inputs_TopKRouter(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 2)
    cases = []
    for N, d, E, k in ((40, 16, 8, 2), (8, 12, 8, 2), (25, 8, 4, 1), (30, 16, 6, 3)):
        cases.append(dict(d=d, E=E, k=k, W_g=_normal((E, d), g, 0.6), x=_normal((N, d), g)))
    return cases


def run_TopKRouter(cls, case: dict) -> dict:
    m = cls(case["d"], case["E"], case["k"])
    with torch.no_grad():
        m.weight.copy_(case["W_g"])
        weights, experts, logits = m(case["x"].clone())
    return {"weights": torch.as_tensor(weights), "experts": torch.as_tensor(experts),
            "logits": torch.as_tensor(logits)}


# --- moe_loop / moe_grouped(x, weights, experts, w1, w2, w3) -> y --------------------------

def _dispatch_cases(g: torch.Generator) -> list[dict]:
    cases = []
    for N, d, f, E, k, idle in ((48, 16, 24, 8, 2, (5,)), (1, 8, 12, 4, 2, ()), (64, 12, 20, 3, 3, ()),
                                (33, 16, 32, 6, 1, (0, 4)), (20, 8, 16, 16, 2, ())):
        w1, w2, w3 = expert_weights(E, d, f, g)
        weights, experts = routing(N, E, k, g, idle)
        cases.append(dict(x=_normal((N, d), g), weights=weights, experts=experts, w1=w1, w2=w2, w3=w3))
    return cases


def inputs_moe_loop(seed: int) -> list[dict]:
    return _dispatch_cases(_gen(seed * 1000 + 3))


def _call(fn, case):
    return fn(case["x"].clone(), case["weights"].clone(), case["experts"].clone(),
              case["w1"].clone(), case["w2"].clone(), case["w3"].clone())


def run_moe_loop(fn, case: dict) -> dict:
    with torch.no_grad():
        return {"y": torch.as_tensor(_call(fn, case))}


def inputs_moe_grouped(seed: int) -> list[dict]:
    return _dispatch_cases(_gen(seed * 1000 + 4))


_MATMULS = {"matmul", "mm", "bmm", "linear", "einsum", "addmm", "baddbmm", "_grouped_mm",
            "grouped_mm", "__matmul__", "__rmatmul__", "tensordot", "inner", "mv", "dot"}


def _count_matmuls(fn, case):
    """Call fn and count its matmul-like torch calls (an early, in-kernel signal only)."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in _MATMULS:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        y = _call(fn, case)
    return y, Count.n


def run_moe_grouped(fn, case: dict) -> dict:
    with torch.no_grad():
        y, n = _count_matmuls(fn, case)
    return {"y": torch.as_tensor(y), "matmul_calls": torch.tensor(n)}


# --- load_balancing_loss(router_logits, top_k) -> scalar -----------------------------------

def inputs_load_balancing_loss(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 5)
    skew = torch.tensor([3.0, 2.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0])
    cases = [dict(logits=_normal((4, 16, 8), g, 1.5) + skew * torch.linspace(-1, 2, 4)[:, None, None], k=2),
             dict(logits=_normal((3, 10, 6), g, 2.0), k=2),
             dict(logits=_normal((64, 8), g), k=2),
             dict(logits=_normal((2, 20, 5), g, 2.0), k=1),
             dict(logits=_normal((5, 7, 8), g, 1.0) + skew, k=3)]
    return cases


def run_load_balancing_loss(fn, case: dict) -> dict:
    return {"loss": torch.as_tensor(fn(case["logits"].clone(), case["k"])).detach().float().reshape(-1)}


# --- SparseMoE.from_hf(block, dispatch)(x) -> (y, router_logits) ---------------------------

def hf_like_block(case: dict):
    """An object laid out like transformers 5.x's MixtralSparseMoeBlock (``layer.mlp``)."""
    gate = SimpleNamespace(weight=case["gate"].clone(), top_k=case["k"], num_experts=case["gate"].shape[0])
    experts = SimpleNamespace(gate_up_proj=case["gate_up_proj"].clone(), down_proj=case["down_proj"].clone(),
                              num_experts=case["gate"].shape[0])
    return SimpleNamespace(gate=gate, experts=experts, top_k=case["k"])


def inputs_SparseMoE(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 6)
    cases = []
    for B, T, d, f, E, k in ((2, 12, 16, 24, 8, 2), (1, 9, 32, 48, 4, 2), (3, 5, 8, 16, 6, 3), (1, 1, 16, 8, 8, 2)):
        w1, w2, w3 = expert_weights(E, d, f, g)
        cases.append(dict(k=k, gate=_normal((E, d), g, 0.5), gate_up_proj=torch.cat([w1, w3], 1),
                          down_proj=w2, x=_normal((B, T, d), g)))
    return cases


def run_SparseMoE(cls, case: dict) -> dict:
    out = {}
    with torch.no_grad():
        for dispatch in ("loop", "grouped"):
            m = cls.from_hf(hf_like_block(case), dispatch=dispatch)
            y, logits = m(case["x"].clone())
            out[f"y_{dispatch}"] = torch.as_tensor(y)
            out[f"logits_{dispatch}"] = torch.as_tensor(logits)
    return out
