"""Sparse Mixture of Experts: Mixtral's top-2 routing over SwiGLU experts.

Jiang et al., "Mixtral of Experts" (2024), arXiv:2401.04088; the load-balancing loss is
Fedus et al., "Switch Transformers" (2021), eqs. (4)-(6). Lecture: "Mixture of Experts"
(MoE: Mixture of Experts, Mixtral 8x7B):

    y = Σ_{i=0}^{n-1} Softmax(Top2(x · W_g))_i · SwiGLU_i(x)

Each token goes to k = 2 of n = 8 experts chosen by a linear router W_g; the k gate values
are a softmax over the k chosen logits (Mixtral computes the softmax over all n in fp32,
takes the top k and renormalises: the same weights). An expert is a SwiGLU MLP,
SwiGLU(x) = w2(silu(w1 x) ⊙ w3 x) (w1 the gate, w3 the up, w2 the down projection).

Two ways to send the tokens to their experts (dispatch):
- ``moe_loop``: for each expert, find its tokens (torch.where), run it, add the weighted
  output back (index_add). Readable; E small matmuls and E scans of the routing table.
- ``moe_grouped``: sort the N·k (token, expert) pairs by expert once, gather the tokens
  into one contiguous (N·k, d) buffer whose rows come expert by expert, run one matmul per
  expert on its contiguous slice (or all of them in one ``torch._grouped_mm`` call where
  the GPU has it), weight, undo the sort and sum the k outputs of each token.

Experts are stored stacked, as transformers 5.x stores Mixtral's: w1, w3 (E, d_ff, d_model)
— transformers fuses them as ``experts.gate_up_proj`` (E, 2·d_ff, d_model) = cat(w1, w3) —
and w2 (E, d_model, d_ff) (``experts.down_proj``); the router is ``gate.weight`` (E, d_model).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- the expert
def swiglu(x, w1, w2, w3):
    """SwiGLU(x) = w2(silu(w1 x) ⊙ w3 x) with weights in nn.Linear layout (out, in)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)  # (N, d) -> (N, d_ff) -> (N, d)


class SwiGLUExpert(nn.Module):
    """One Mixtral expert: w1 (gate) and w3 (up) d_model -> d_ff, w2 (down) d_ff -> d_model."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., d) -> (..., d_ff) -> (..., d)


# --------------------------------------------------------------------------- the router
class TopKRouter(nn.Module):
    """x · W_g, the top k logits per token, and a softmax over those k (the gate values)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int = 2):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))  # W_g, (E, d) as transformers
        nn.init.normal_(self.weight, std=d_model ** -0.5)

    def forward(self, x):
        """x (N, d) -> weights (N, k) (sum to 1, x's dtype), experts (N, k) int64, logits (N, E)."""
        logits = F.linear(x, self.weight)                         # (N, E)
        top, experts = torch.topk(logits, self.top_k, dim=-1)     # (N, k), over the experts
        weights = torch.softmax(top.float(), dim=-1)              # Softmax(Top2(x W_g)), fp32
        return weights.to(x.dtype), experts, logits


# --------------------------------------------------------------------------- dispatch
def moe_loop(x, weights, experts, w1, w2, w3):
    """y (N, d) = Σ_j weights[:, j] · SwiGLU_{experts[:, j]}(x), one expert at a time.

    x (N, d); weights, experts (N, k); w1, w3 (E, d_ff, d); w2 (E, d, d_ff).
    """
    y = torch.zeros_like(x)                                       # (N, d)
    for e in range(w1.shape[0]):
        token, slot = torch.where(experts == e)                   # the (token, slot) pairs of e
        if token.numel() == 0:
            continue
        out = swiglu(x[token], w1[e], w2[e], w3[e])               # (n_e, d)
        y.index_add_(0, token, out * weights[token, slot, None].to(out.dtype))
    return y


def _grouped_mm_ok(x, w) -> bool:
    """torch._grouped_mm (a single kernel for all experts) exists for bf16 on sm90+ GPUs."""
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
            and w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0))


def moe_grouped(x, weights, experts, w1, w2, w3, use_grouped_mm: bool | None = None):
    """The same y as ``moe_loop``: sort the N·k assignments by expert, one matmul per expert
    on its contiguous slice of gathered tokens (or one ``torch._grouped_mm``), unsort, sum."""
    N, k = experts.shape
    E = w1.shape[0]
    flat = experts.reshape(-1)                                    # (N·k,) expert of each pair
    order = torch.argsort(flat, stable=True)                      # pairs sorted by expert
    xs = x[order // k]                                            # (N·k, d), expert by expert
    counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat))                           # (E,) pairs per expert, no host sync
    if use_grouped_mm is None:
        use_grouped_mm = _grouped_mm_ok(x, w1)
    if use_grouped_mm:
        offs = torch.cumsum(counts, 0).to(torch.int32)            # end of each expert's rows
        g = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)  # (N·k, d_ff), gate
        u = torch._grouped_mm(xs, w3.transpose(1, 2), offs=offs)  # (N·k, d_ff), up
        h = F.silu(g) * u if torch.is_grad_enabled() else F.silu(g, inplace=True).mul_(u)
        ys = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # (N·k, d)
    else:
        ys = torch.empty_like(xs)
        start = 0
        for e, n_e in enumerate(counts.tolist()):                 # one matmul per expert
            if n_e:
                ys[start:start + n_e] = swiglu(xs[start:start + n_e], w1[e], w2[e], w3[e])
            start += n_e
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)  # where each pair went
    ys = ys[inv].view(N, k, -1)                                   # (N, k, d): undo the sort
    return (ys * weights[..., None].to(ys.dtype)).sum(1).to(x.dtype)   # (N, d) Σ_j w_j · SwiGLU_j


# --------------------------------------------------------------------------- capacity
def apply_capacity(experts, weights, n_experts: int, capacity: int):
    """Token dropping (Switch, GShard): each expert takes at most ``capacity`` assignments,
    first come first served in token order; the rest get weight 0 (the residual carries the
    token). Returns (weights, kept) with kept (N, k) bool."""
    N, k = experts.shape
    flat = experts.reshape(-1)                                    # pair order: token, then slot
    onehot = F.one_hot(flat, n_experts)                           # (N·k, E)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1            # rank of the pair in its expert
    kept = (position < capacity).view(N, k)
    return weights * kept.to(weights.dtype), kept


# --------------------------------------------------------------------------- the block
class SparseMoE(nn.Module):
    """Mixtral's sparse MoE block: router + E SwiGLU experts (stacked), top-k of them per token.

    forward(x (..., d)) -> (y (..., d), router_logits (N, E)) with N = x.numel() // d.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int = 8, top_k: int = 2,
                 dispatch: str = "grouped", capacity_factor: float | None = None):
        super().__init__()
        assert dispatch in ("loop", "grouped")
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.dispatch, self.capacity_factor = dispatch, capacity_factor
        self.router = TopKRouter(d_model, n_experts, top_k)
        self.w1 = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * d_model ** -0.5)  # gate
        self.w3 = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * d_model ** -0.5)  # up
        self.w2 = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * d_ff ** -0.5)     # down

    def expert(self, e: int) -> SwiGLUExpert:
        """Expert e as a standalone module (a copy)."""
        m = SwiGLUExpert(self.d_model, self.d_ff).to(self.w1.device, self.w1.dtype)
        with torch.no_grad():
            m.w1.weight.copy_(self.w1[e]), m.w2.weight.copy_(self.w2[e]), m.w3.weight.copy_(self.w3[e])
        return m

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                              # (N, d)
        weights, experts, logits = self.router(x)                 # (N, k), (N, k), (N, E)
        if self.capacity_factor is not None:
            cap = math.ceil(self.capacity_factor * x.shape[0] * self.top_k / self.n_experts)
            weights, _ = apply_capacity(experts, weights, self.n_experts, cap)
        run = moe_loop if self.dispatch == "loop" else moe_grouped
        y = run(x, weights, experts, self.w1, self.w2, self.w3)
        return y.view(shape), logits

    @classmethod
    def from_hf(cls, block, dispatch: str = "grouped") -> "SparseMoE":
        """From transformers' ``MixtralSparseMoeBlock`` (5.x: ``layer.mlp``): router
        ``gate.weight`` (E, d); ``experts.gate_up_proj`` (E, 2·d_ff, d) = cat(w1, w3);
        ``experts.down_proj`` (E, d, d_ff) = w2."""
        E, d = block.gate.weight.shape
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        d_ff = gate_up.shape[1] // 2
        top_k = getattr(block, "top_k", None) or block.gate.top_k
        m = cls(d, d_ff, E, top_k, dispatch=dispatch).to(gate_up.device, gate_up.dtype)
        with torch.no_grad():
            m.router.weight.copy_(block.gate.weight)
            m.w1.copy_(gate_up[:, :d_ff]), m.w3.copy_(gate_up[:, d_ff:]), m.w2.copy_(down)
        return m


# --------------------------------------------------------------------------- the balancing loss
def load_balancing_loss(router_logits, top_k: int = 2):
    """Switch Transformer's auxiliary loss, E · Σ_e f_e · P_e, over ALL tokens (N = every
    row of router_logits (..., E)): f_e the number of tokens that chose e among their top k,
    divided by N (so Σ_e f_e = k), P_e the mean router probability of e (Σ_e P_e = 1).
    Equal to transformers' ``load_balancing_loss_func((router_logits,), E, top_k)``;
    k when perfectly balanced, up to k·E when every token goes to the same experts."""
    E = router_logits.shape[-1]
    probs = torch.softmax(router_logits.reshape(-1, E).float(), dim=-1)   # (N, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices                     # (N, k)
    f = F.one_hot(chosen, E).float().sum(1).mean(0)                       # (E,) Σ f = k
    P = probs.mean(0)                                                     # (E,) Σ P = 1
    return E * (f * P).sum()


# --------------------------------------------------------------------------- counting
def moe_param_counts(d_model: int, d_ff: int, n_layer: int, n_experts: int, top_k: int,
                     n_head: int, n_kv_head: int, vocab_size: int, tied: bool = False):
    """(total, active per token) parameters of a Mixtral-style model (RMSNorm, GQA, no biases)."""
    head_dim = d_model // n_head
    attn = 2 * d_model * d_model + 2 * d_model * n_kv_head * head_dim      # q, o; k, v
    expert = 3 * d_model * d_ff
    per_layer = attn + d_model * n_experts + 2 * d_model                    # + router, 2 norms
    embed = vocab_size * d_model * (1 if tied else 2) + d_model             # + final norm
    total = n_layer * (per_layer + n_experts * expert) + embed
    active = n_layer * (per_layer + top_k * expert) + embed
    return total, active
