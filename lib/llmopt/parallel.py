"""The classic ways to split training across ranks (the lesson's code).

Lecture: «Стандартные подходы к распределенному обучению» — Data Parallelism (each rank
holds the whole model and a slice of the batch; gradients are *averaged* across ranks:
little communication, poor memory efficiency) and Model Parallelism (each rank holds some
of the layers; activations travel between ranks: good memory efficiency, much
communication). Tensor parallelism (Megatron-LM's column-parallel linear) splits one
layer instead of the stack.

- ``average_gradients(model)``: data parallelism's all-reduce, divided by the world size.
- ``split_layers``/``pipeline_step``: the layers split across ranks, activations sent
  forward and their gradients sent back with point-to-point send/recv.
- ``ColumnParallelLinear``: ``Y = X Wᵀ`` with W's rows (output features) split across
  ranks and the output all-gathered (backward: each rank keeps its slice of dY, and dX is
  all-reduced).

The process launcher and the flat collectives live in ``llmopt.launch`` (support code the
labs may show); they are re-exported here: ``parallel.launch`` is the public name. The
per-rank memory probe (``measured_state_bytes``) lives in ``llmopt.viz.zero``, beside the
widget that draws it, and is re-exported too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .launch import (DEFAULT_TIMEOUT_S, RankError, all_gather_flat, free_port,  # noqa: F401
                     launch, reduce_scatter_flat)
from .viz.zero import live_storages, measured_state_bytes, reachable_tensors  # noqa: F401


# ------------------------------------------------------------------- data parallelism

def average_gradients(model: nn.Module) -> None:
    """All-reduce every gradient and divide by the world size (in place)."""
    world_size = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)             # sum over ranks
            p.grad.div_(world_size)             # the mean: each rank saw 1/N of the batch


# ------------------------------------------------------ model (pipeline) parallelism

def split_layers(layers, rank: int, world_size: int):
    """The contiguous slice of ``layers`` that ``rank`` holds (as equal as possible)."""
    n = len(layers)
    bounds = [n * r // world_size for r in range(world_size + 1)]
    return nn.Sequential(*list(layers)[bounds[rank]:bounds[rank + 1]])


def pipeline_step(stage: nn.Module, x: torch.Tensor | None, target: torch.Tensor | None,
                  loss_fn, act_shape, rank: int, world_size: int):
    """One forward+backward through layers split over ranks (no micro-batches: naive MP).

    Rank 0 gets the input ``x``, the last rank the ``target``; activations of shape
    ``act_shape`` go rank→rank+1 and their gradients back. Returns ``(loss or None,
    bytes_sent)`` where bytes_sent counts this rank's activation and gradient traffic.
    """
    sent = 0
    dtype = next(stage.parameters()).dtype
    device = next(stage.parameters()).device
    if rank == 0:
        inp = x
    else:
        inp = torch.empty(act_shape, dtype=dtype, device=device)
        dist.recv(inp, src=rank - 1)
        inp.requires_grad_(True)
    out = stage(inp)
    if rank == world_size - 1:
        loss = loss_fn(out, target)
        loss.backward()
    else:
        dist.send(out.detach().contiguous(), dst=rank + 1)
        sent += out.numel() * out.element_size()
        grad_out = torch.empty_like(out)
        dist.recv(grad_out, src=rank + 1)
        out.backward(grad_out)
        loss = None
    if rank > 0:
        dist.send(inp.grad.contiguous(), dst=rank - 1)
        sent += inp.grad.numel() * inp.grad.element_size()
    return loss, sent


# -------------------------------------------------------------- tensor parallelism

class _GatherLastDim(torch.autograd.Function):
    """Forward: all-gather the column slices. Backward: keep this rank's slice of dY."""

    @staticmethod
    def forward(ctx, y_local):
        ws = dist.get_world_size()
        parts = [torch.empty_like(y_local) for _ in range(ws)]
        dist.all_gather(parts, y_local.contiguous())
        ctx.rank, ctx.width = dist.get_rank(), y_local.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width].contiguous()


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums dX over ranks (each rank's slice contributes)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class ColumnParallelLinear(nn.Module):
    """``nn.Linear`` whose ``out_features`` are split across ranks (Megatron-LM).

    Each rank holds rows ``[r·out/N, (r+1)·out/N)`` of W (and of b): 1/N of the memory;
    the forward all-gathers the output slices. ``from_linear`` takes the slice of a full
    layer, so every rank's full output equals the unsplit layer's.
    """

    def __init__(self, in_features, out_features, bias=True, rank=None, world_size=None):
        super().__init__()
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        assert out_features % self.world_size == 0, "out_features must divide by the world size"
        self.local_out = out_features // self.world_size
        self.weight = nn.Parameter(torch.empty(self.local_out, in_features))   # (out/N, in)
        self.bias = nn.Parameter(torch.zeros(self.local_out)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        rows = slice(layer.rank * layer.local_out, (layer.rank + 1) * layer.local_out)
        with torch.no_grad():
            layer.weight.copy_(linear.weight[rows])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[rows])
        return layer

    def forward(self, x):                                                  # (..., in)
        y_local = nn.functional.linear(_AllReduceGrad.apply(x), self.weight, self.bias)
        return _GatherLastDim.apply(y_local)                               # (..., out)
