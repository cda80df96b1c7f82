"""Gradient checkpointing: keep a few activations, recompute the rest in backward (lab05).

Chen, Xu, Zhang, Guestrin, "Training Deep Nets with Sublinear Memory Cost" (2016,
arXiv:1604.06174). Lecture section "Gradient Checkpointing"; notes in
``course/notes/lab05_memory_efficient_training.md``.

Backpropagation needs the activations ``A^i`` of every layer (lecture: ``∂L/∂W^i_{jk} =
B^i_j A^{i-1}_k``), so a plain forward pass keeps ``O(n)`` of them for a depth ``n``.
Checkpointing keeps only the inputs of ``s`` segments and recomputes a segment's insides
when backward reaches it:

- ``checkpoint(fn, *args)``: ``fn(*args)`` under ``no_grad`` in the forward pass (nothing of
  ``fn`` is saved but its inputs); in backward the inputs are detached, ``fn`` runs again with
  grad enabled (with the RNG and autocast state of the forward, so dropout draws the same mask),
  and ``torch.autograd.backward`` through the recomputed graph gives the inputs' gradients and
  accumulates the parameters' ``.grad`` — one extra forward of ``fn``.
- ``checkpoint_sequential(blocks, x, segments)``: ``s = round(√n)`` contiguous segments by
  default; every segment but the last is checkpointed (the last one's activations are the
  first backward needs, as in ``torch.utils.checkpoint.checkpoint_sequential``). Memory:
  ``(s − 1)`` segment inputs plus one segment's activations ``≈ n/s`` layers, smallest at
  ``s = √n``: ``O(√n)``; compute: one extra forward of ``n − n/s`` layers, ≈ 33% more
  than forward + backward (backward ≈ 2 forwards).
- ``saved_activation_bytes(fn, *args)``: the bytes autograd really keeps for backward during
  ``fn(*args)`` (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once,
  parameters left out.

As torch's reentrant checkpoint, at least one tensor input of ``fn`` must require grad
(otherwise the output does not, and no backward reaches the recomputation).
"""
from __future__ import annotations

import math

import torch


def _cuda_devices(tensors) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})


class CheckpointFunction(torch.autograd.Function):
    """``fn(*args)`` that saves only ``args`` and recomputes ``fn`` in backward."""

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.devices = _cuda_devices(args)
        ctx.cpu_rng = torch.get_rng_state()                       # dropout's mask, replayed later
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")}
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.others = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.save_for_backward(*(a for a in args if isinstance(a, torch.Tensor)))
        with torch.no_grad():                                      # nothing inside fn is saved
            return fn(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = iter(ctx.saved_tensors)
        inputs = []
        for is_t, other in zip(ctx.is_tensor, ctx.others):
            if is_t:
                t = next(saved)
                inputs.append(t.detach().requires_grad_(t.requires_grad))
            else:
                inputs.append(other)
        with torch.random.fork_rng(devices=ctx.devices):           # the caller's RNG is left as it was
            torch.set_rng_state(ctx.cpu_rng)
            for d, state in zip(ctx.devices, ctx.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            with torch.enable_grad(), \
                    torch.autocast("cpu", dtype=ctx.autocast["cpu"][1], enabled=ctx.autocast["cpu"][0]), \
                    torch.autocast("cuda", dtype=ctx.autocast["cuda"][1], enabled=ctx.autocast["cuda"][0]):
                outputs = ctx.fn(*inputs)                          # the recomputation, with a graph
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(x.grad if isinstance(x, torch.Tensor) else None for x in inputs)
        return (None, *grads)


def checkpoint(fn, *args):
    """``fn(*args)``, keeping only ``args`` for backward and recomputing ``fn`` there."""
    return CheckpointFunction.apply(fn, *args)


def segment_bounds(n: int, segments: int | None = None) -> list[tuple[int, int]]:
    """``[(start, end)]`` of ``segments`` contiguous segments of ``n`` blocks (default
    ``round(√n)``), sizes as equal as possible, the longer ones first."""
    s = max(1, min(n, round(math.sqrt(n)) if segments is None else segments))
    size, extra = divmod(n, s)
    bounds, start = [], 0
    for i in range(s):
        end = start + size + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _run(blocks):
    def run(x):
        for block in blocks:
            x = block(x)
        return x
    return run


def checkpoint_sequential(blocks, x, segments: int | None = None):
    """Run ``blocks`` in order on ``x``; every segment but the last under ``checkpoint``."""
    blocks = list(blocks)
    bounds = segment_bounds(len(blocks), segments)
    for i, (start, end) in enumerate(bounds):
        run = _run(blocks[start:end])
        x = checkpoint(run, x) if i < len(bounds) - 1 else run(x)  # (B, T, D)
    return x


def saved_activation_bytes(fn, *args) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn(*args)`` runs.

    Every storage counts once (a tensor saved by two ops, or views of one tensor);
    parameters (leaves that require grad) and their views are not activations and are left out.
    """
    storages = {}

    def pack(t):
        base = t if t._base is None else t._base
        if not isinstance(base, torch.nn.Parameter):               # weights are not activations
            s = t.untyped_storage()
            storages[(str(s.device), s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return int(sum(storages.values()))
