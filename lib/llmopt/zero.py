"""ZeRO stages 0–3 (and FSDP's all-gather / reduce-scatter) over torch.distributed.

Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (SC20); Zhao et al., "PyTorch FSDP" (VLDB 2023). Lecture: «DeepSpeed – ZeRO»,
«ZeRO-DP: Optimizing Model State Memory», «ZeRO-R», «FSDP».

Model-state memory per rank with Ψ parameters, N_d ranks and K bytes of optimizer state
per parameter (K = 12 for mixed-precision Adam: fp32 master copy, momentum, variance):

    stage 0 (DP)      (2 + 2 + K) Ψ
    stage 1 (P_os)    2Ψ + 2Ψ + KΨ/N_d
    stage 2 (P_os+g)  2Ψ + (2 + K)Ψ/N_d
    stage 3 (P_os+g+p) (2 + 2 + K)Ψ/N_d

Design:
- The model is cut into *units*: every child of an ``nn.ModuleList`` (the transformer
  blocks), else every direct child with parameters; what is left belongs to the root.
- Each unit's parameters become views into one flat buffer of Ψ_u elements padded to a
  multiple of N_d, so every rank's shard has the same size S = ⌈Ψ_u/N_d⌉ (collectives
  need equal sizes; the padding is zeros and never leaves the buffer).
- The optimizer (any ``torch.optim`` class) sees only fp32 *master* shards, one per unit
  (the whole buffer at stage 0): its state is 1/N_d of the model's from stage 1 on. The
  lecture's last steps: the optimizer steps in fp32 on shard i, which is cast to the
  model's dtype and put back.
- stage 0/1: gradients stay whole until ``step()``; stage 0 all-reduces them (mean),
  stage 1 reduce-scatters them. stage 2: a post-accumulate-grad hook reduce-scatters each
  unit's gradients as soon as backward has produced them and frees the full ones.
  stage 3: the flat buffer's storage is freed (``resize_(0)``) outside the unit's
  forward and backward; a forward pre-hook all-gathers it, a hook on the unit's outputs
  all-gathers it again before its backward, and the gradient hook frees it after.
- Communication per step: stages 0–2 move 2Ψ per rank (all-reduce = reduce-scatter +
  all-gather), stage 3 3Ψ (two all-gathers and a reduce-scatter): 1.5×.
- ``overlap=True`` hides that communication behind compute, as FSDP does: at stage 3 the
  all-gather of the *next* unit (in the order of the first forward; reversed in backward)
  is issued asynchronously while the current unit computes (prefetch: at most two units'
  weights are whole at once), and from stage 2 on each unit's reduce-scatter is issued
  asynchronously as soon as its gradients are complete and waited for only two units later
  (bucketed by unit, overlapped with the backward of the units before it).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .launch import all_gather_flat, reduce_scatter_flat
from .viz.zero import measured_state_bytes  # noqa: F401  (re-exported: per-rank bytes)


# ------------------------------------------------------------------------ formula

def model_state_bytes(num_params: int, stage: int, world_size: int, k: int = 12,
                      param_bytes: int = 2, grad_bytes: int = 2) -> int:
    """Model-state bytes per rank at ZeRO ``stage`` (the ZeRO paper's Figure 1)."""
    psi, n = num_params, world_size
    p, g, o = param_bytes * psi, grad_bytes * psi, k * psi
    if stage == 0:
        return p + g + o
    if stage == 1:
        return p + g + o / n
    if stage == 2:
        return p + (g + o) / n
    if stage == 3:
        return (p + g + o) / n
    raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")


def comm_volume(num_params: int, stage: int) -> int:
    """Elements each rank sends per step: 2Ψ for stages 0–2, 3Ψ (1.5×) for stage 3."""
    return 3 * num_params if stage == 3 else 2 * num_params


def shard_flat(flat: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's shard of a 1-D tensor, zero-padded so every shard has ⌈numel/N⌉ elements."""
    S = math.ceil(flat.numel() / world_size)
    padded = torch.zeros(S * world_size, dtype=flat.dtype, device=flat.device)
    padded[:flat.numel()] = flat
    return padded[rank * S:(rank + 1) * S].clone()                       # (S,)


# ------------------------------------------------------------------------ the units

def _free(t: torch.Tensor):
    t.untyped_storage().resize_(0)


def _alloc(t: torch.Tensor):
    if t.untyped_storage().nbytes() == 0:
        t.untyped_storage().resize_(t.numel() * t.element_size())


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Unit:
    """One flat buffer of a unit's parameters, its shard and its fp32 master shard."""

    def __init__(self, module, params, stage, rank, world_size):
        self.module, self.params, self.stage = module, params, stage
        self.rank, self.world_size = rank, world_size
        self.numel = sum(p.numel() for p in params)
        n = 1 if stage == 0 else world_size
        self.S = math.ceil(self.numel / n)                               # shard size
        p0 = params[0]
        self.flat = torch.zeros(self.S * n, dtype=p0.dtype, device=p0.device)  # (N·S,)
        offset = 0
        with torch.no_grad():
            for p in params:                     # params become views into the buffer
                self.flat[offset:offset + p.numel()].copy_(p.reshape(-1))
                p.data = self.flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        lo = 0 if stage == 0 else rank * self.S
        view = self.flat[lo:lo + self.S]
        # stage 3 keeps its own copy of the shard and frees the full buffer
        self.shard = nn.Parameter(view.clone() if stage == 3 else view, requires_grad=True)
        self.master = nn.Parameter(view.detach().float().clone())       # fp32, (S,)
        self.gathered = True
        self.pending = 0
        self.work = None                         # an all-gather in flight (prefetch)
        self.reducing = None                     # a reduce-scatter in flight: (work, out)
        self.live = None                         # shared counter of whole units (stage 3)
        if stage == 3:
            self.free()

    # stage 3: all-gather the weights (FSDP) and free them again
    def gather(self, async_op: bool = False):
        """Make the unit's weights whole; ``async_op``: only issue the all-gather (prefetch)."""
        if self.stage == 3 and not self.gathered:
            _alloc(self.flat)
            self.work = all_gather_flat(self.flat, self.shard.detach(), async_op=True)
            self.gathered = True
            if self.live is not None:
                self.live[0] += 1
                self.live[1] = max(self.live[1], self.live[0])
        if not async_op and self.work is not None:
            self.work.wait()                     # the compute stream waits for the copy
            self.work = None

    def free(self):
        if self.stage == 3 and self.gathered:
            if self.work is not None:            # prefetched but never used
                self.work.wait()
                self.work = None
            _free(self.flat)
            self.gathered = False
            if self.live is not None:
                self.live[0] -= 1

    def flat_grad(self):
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=self.flat.dtype, device=self.flat.device)
                 for p in self.params]
        pad = self.flat.numel() - self.numel
        if pad:
            grads.append(torch.zeros(pad, dtype=self.flat.dtype, device=self.flat.device))
        return torch.cat(grads)                                            # (N·S,)

    def reduce_grads(self, async_op: bool = False):
        """Reduce-scatter the mean gradient into this rank's shard; drop the full ones.
        ``async_op``: only issue it; ``finish_reduce()`` completes it."""
        full = self.flat_grad()
        for p in self.params:
            p.grad = None
        out = torch.empty(self.S, dtype=full.dtype, device=full.device)
        if async_op:
            self.reducing = (reduce_scatter_flat(out, full, async_op=True), out, full)
        else:
            reduce_scatter_flat(out, full)
            _free(full)                          # the unit's whole gradient: gone at once
            self._accumulate(out)
        self.pending = 0

    def finish_reduce(self):
        if self.reducing is not None:
            work, out, full = self.reducing
            work.wait()                          # the compute stream waits for the reduction
            _free(full)
            self.reducing = None
            self._accumulate(out)

    def _accumulate(self, out):
        out.div_(self.world_size)
        if self.shard.grad is None:
            self.shard.grad = out
        else:
            self.shard.grad.add_(out)

    def on_grad(self, _p, inflight=None):
        self.pending += 1
        if self.pending == sum(p.requires_grad for p in self.params):
            if inflight is None:
                self.reduce_grads()
            else:                                # overlap: wait only two units later
                self.finish_reduce()
                self.reduce_grads(async_op=True)
                inflight.append(self)
                while len(inflight) > 2:
                    inflight.pop(0).finish_reduce()
            self.free()


def _units_of(model: nn.Module):
    """The modules that get their own flat buffer, then the root with the rest."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if lists:
        mods = [b for l in lists for b in l]
    else:
        mods = [c for c in model.children() if any(True for _ in c.parameters())]
    taken, units = set(), []
    for m in mods:
        ps = [p for p in m.parameters() if id(p) not in taken]
        taken.update(id(p) for p in ps)
        if ps:
            units.append((m, ps))
    rest = [p for p in model.parameters() if id(p) not in taken]
    if rest:
        units.append((model, rest))
    return units


class ZeroOptimizer:
    """Wraps ``optimizer_cls`` over the fp32 master shards; same loop as any optimizer."""

    def __init__(self, units, stage, optimizer_cls, **opt_kwargs):
        self.units, self.stage = units, stage
        self.optim = optimizer_cls([u.master for u in units], **opt_kwargs)

    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    @torch.no_grad()
    def step(self):
        ws = dist.get_world_size()
        for u in self.units:
            if self.stage == 0:                       # DP: all-reduce, mean
                g = u.flat_grad()
                dist.all_reduce(g)
                u.master.grad = g.div_(ws).float()
            elif self.stage == 1:                     # P_os: only this shard's gradient
                u.reduce_grads()
                u.master.grad = u.shard.grad.float()
            else:                                     # P_os+g(+p): reduced in backward
                if u.shard.grad is None:
                    u.reduce_grads()
                u.master.grad = u.shard.grad.float()
        self.optim.step()
        for u in self.units:
            u.master.grad = None
            if self.stage == 0:
                u.flat.copy_(u.master)
            elif self.stage in (1, 2):                # fp32 → model dtype, then all-gather
                u.shard.copy_(u.master)
                all_gather_flat(u.flat, u.shard.detach().clone())
            else:
                u.shard.copy_(u.master)               # gathered again by the next forward
            if self.stage == 1:
                u.shard.grad = None

    def zero_grad(self, set_to_none: bool = True):
        for u in self.units:
            u.shard.grad = None
            u.master.grad = None
            for p in u.params:
                p.grad = None

    def state_dict(self):
        return self.optim.state_dict()


def shard_model(model: nn.Module, stage: int, optimizer_cls, overlap: bool = False, **opt_kwargs):
    """Shard ``model`` (identical on every rank) for ZeRO ``stage``; return (model, optimizer).

    After it, ``loss.backward(); optimizer.step(); optimizer.zero_grad()`` trains with
    gradients averaged over ranks and that stage's memory. Call it on every rank.
    ``overlap=True``: prefetch the next unit's all-gather and overlap the reduce-scatters
    with the backward (same results; communication hidden behind compute on a GPU).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    rank, ws = dist.get_rank(), dist.get_world_size()
    units = [_Unit(m, ps, stage, rank, ws) for m, ps in _units_of(model)]
    live = [0, 0]                              # whole units now, and the most at once
    for u in units:
        u.live = live
    model._zero_units = units
    model._zero_stage = stage
    model._zero_live = live
    state = {"callback_queued": False}
    order: list = []                           # units in the order of the first forward
    inflight: list | None = [] if overlap else None

    def prefetch(u, step):                     # issue the all-gather of the unit after u
        if overlap and u in order:
            seq = order if step > 0 else order[:1] + order[1:][::-1]   # backward: root first
            i = seq.index(u) + 1
            if i < len(seq):
                seq[i].gather(async_op=True)

    def final_callback():                      # end of backward: flush what is left
        state["callback_queued"] = False
        if stage >= 2:
            for u in list(inflight or []):
                u.finish_reduce()
            if inflight:
                inflight.clear()
            for u in units:
                if u.pending or any(p.grad is not None for p in u.params):
                    u.reduce_grads()
                u.free()

    def queue_final():
        if not state["callback_queued"]:
            state["callback_queued"] = True
            torch.autograd.Variable._execution_engine.queue_callback(final_callback)

    def pre_backward(u):                       # the unit's backward is next: its weights
        queue_final()
        u.gather()
        prefetch(u, -1)

    for u in units:
        if stage >= 2:
            for p in u.params:
                def hook(p, u=u):
                    queue_final()
                    u.on_grad(p, inflight)
                p.register_post_accumulate_grad_hook(hook)
        if stage == 3:
            def pre_forward(module, args, u=u):
                if _in_backward():            # recomputation (checkpointing)
                    u.gather()
                    return
                if u not in order:
                    order.append(u)
                u.gather()
                prefetch(u, +1)

            def post_forward(module, args, output, u=u):
                if _in_backward():            # recomputation (checkpointing): keep them
                    return output
                u.free()
                outs = output if isinstance(output, (tuple, list)) else [output]
                for t in outs:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda grad, u=u: pre_backward(u))
                return output
            u.module.register_forward_pre_hook(pre_forward)
            u.module.register_forward_hook(post_forward)
    return model, ZeroOptimizer(units, stage, optimizer_cls, **opt_kwargs)


@torch.no_grad()
def gather_full_params(model: nn.Module) -> dict:
    """The full parameters as a {name: tensor} dict on every rank (a collective)."""
    units = getattr(model, "_zero_units", [])
    for u in units:
        u.gather()
    out = {name: p.detach().clone() for name, p in model.named_parameters()}
    for u in units:
        u.free()
    return out


# ------------------------------------------------------------------------- ZeRO-R

def bucketed_all_reduce(tensors, buffer: torch.Tensor) -> None:
    """C_B: all-reduce (mean) many tensors through one constant-size buffer, in place.

    Tensors are packed into ``buffer`` until it is full, the buffer is all-reduced, and
    the results are copied back: one collective per buffer-full instead of one per
    tensor, and no allocation that grows with the model. A tensor bigger than the buffer
    goes through in pieces.
    """
    ws = dist.get_world_size()
    cap, fill, pending = buffer.numel(), 0, []

    def flush():
        nonlocal fill
        if fill:
            dist.all_reduce(buffer[:fill])
            buffer[:fill].div_(ws)
            for t, lo, hi, at in pending:
                t.view(-1)[lo:hi].copy_(buffer[at:at + hi - lo])
            pending.clear()
            fill = 0

    for t in tensors:
        flat, lo = t.view(-1), 0
        while lo < flat.numel():
            n = min(cap - fill, flat.numel() - lo)
            buffer[fill:fill + n].copy_(flat[lo:lo + n])
            pending.append((t, lo, lo + n, fill))
            fill, lo = fill + n, lo + n
            if fill == cap:
                flush()
    flush()


def partition_activation(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """P_a: keep only this rank's 1/N of a (replicated) activation checkpoint."""
    return shard_flat(x.detach().reshape(-1), rank, world_size)


def gather_activation(shard: torch.Tensor, shape, world_size: int) -> torch.Tensor:
    """Rebuild the full checkpoint from every rank's shard (all-gather, drop padding)."""
    full = torch.empty(shard.numel() * world_size, dtype=shard.dtype, device=shard.device)
    all_gather_flat(full, shard.contiguous())
    return full[:math.prod(shape)].view(shape)


class PartitionedCheckpoint(torch.autograd.Function):
    """Checkpoint ``fn(x)`` saving 1/N of ``x`` per rank; backward all-gathers, recomputes.

    For activations that are the same on every rank of the group (tensor/model parallel
    replicas, as in ZeRO-R's P_a): memory of the saved checkpoint drops N×.
    """

    @staticmethod
    def forward(ctx, fn, x):
        rank, ws = dist.get_rank(), dist.get_world_size()
        ctx.fn, ctx.shape, ctx.ws = fn, x.shape, ws
        ctx.save_for_backward(partition_activation(x, rank, ws))
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad):
        (shard,) = ctx.saved_tensors
        x = gather_activation(shard, ctx.shape, ctx.ws).detach().requires_grad_(True)
        with torch.enable_grad():
            y = ctx.fn(x)
        torch.autograd.backward(y, grad)
        return None, x.grad


def partitioned_checkpoint(fn, x):
    return PartitionedCheckpoint.apply(fn, x)
