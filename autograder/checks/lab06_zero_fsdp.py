"""How the hidden checks of lab06_zero_fsdp are judged (trusted side; never in the kernel).

Trust: everything in the student's kernel is the student's — any module can be patched, any
object hidden from a probe — so no grade here rests on a value measured in the kernel.

- Correctness: references are single-process trainings on the whole batch, computed here
  from this side's own copy of the inputs (what data parallelism and every ZeRO stage must
  reproduce), and ``llmopt.zero.model_state_bytes``.
- Memory (the point of ZeRO) is enforced by the operating system: the grading sandbox runs
  the whole notebook — the kernel and every rank it launches — in one memory cgroup of
  ``SANDBOX_MEMORY_BYTES``. Each stage's memory case (``MEMORY_SIZES`` in the cases) is sized
  so that the model state of that stage (the lab's design: params, grads, an fp32 master
  copy and Adam's two moments, K = 12) fits with room to spare, while the model state of the
  next weaker stage ALONE — even without a master copy (K = 8) — is bigger than the whole
  limit: a weaker stage cannot finish, whatever it reports, because the kernel's OOM killer
  stops it. Memory the kernel allocated before only makes that likelier; nothing can be
  faked downwards. What the case returns is the model's output on a probe batch after the
  step, which this side recomputes (``memory_reference``): a run that skipped the work has
  nothing right to return.
- What this cannot see: WHERE the memory is. The limit bounds the sandbox's total, so it
  proves that the state is not replicated across ranks, not that it is spread over them (a
  kernel patched to compute the answer in one process, with one copy of the state, fits;
  so does, at stage 1 only, a data parallelism without master copy that steps inside
  backward: params + Adam's moments, 12Ψ per rank).
- bucketed_all_reduce: its values (the mean over ranks) are judged here; that the notebook's
  code calls dist.all_reduce is read from its source (``METHOD``, static.py); how many calls
  of which sizes is a claim of an in-kernel spy, checked for consistency only (and a spy
  that saw no call fails the case).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from llmopt.testing import compare
from llmopt.zero import model_state_bytes

from .. import static
from ..cases.lab06_zero_fsdp import (ADAM, ADAM_STEPS, SGD, build_mlp, flat_params, make_batch,
                                     num_params)

PARAM_ATOL = 1e-6

# The llmopt modules the lab's notebook imports (the sandbox shows these and what they
# import; zero and parallel — the lesson's answers — stay hidden).
LLMOPT_VISIBLE = ["launch", "bench", "testing", "viz.zero"]

# The grading sandbox's memory limit for one notebook run (autograder.sandbox.Bubblewrap's
# memory_bytes): the memory cases are sized against it (see memory_budget).
SANDBOX_MEMORY_BYTES = 6 * 2**30
MEMORY_K = 12        # Adam on an fp32 master copy (the lab's design): 4 + 4 + 4 bytes per parameter
MEMORY_K_LEAN = 8    # Adam's two moments alone: an fp32 model needs no master copy


def memory_budget(case: dict) -> dict:
    """Model-state bytes of the memory case, all ranks together: at the case's stage with
    the lab's design (what must fit, with the kernel and the ranks' own overhead), and at
    the next weaker stage without a master copy (the leanest honest form of it: what must
    not fit, even alone: > SANDBOX_MEMORY_BYTES)."""
    w, n = case["width"], case["world_size"]
    psi = case["depth"] * (w * w + w)
    total = lambda s, k: n * model_state_bytes(psi, s, n, k=k, param_bytes=4, grad_bytes=4)  # noqa: E731
    return {"num_params": psi, "stage": total(case["stage"], MEMORY_K),
            "weaker": total(case["stage"] - 1, MEMORY_K_LEAN)}


def _training_outputs(case: dict) -> dict:
    spec = {}
    for run in case["runs"]:
        n, psi = run["world_size"], num_params(run)
        for opt in ("sgd", "adam"):
            for stage in case["stages"]:
                spec[f"n{n}_{opt}{stage}_params"] = ("float", (psi,))
                spec[f"n{n}_{opt}{stage}_spread"] = ("float", ())
    return spec


def _zero_outputs(case: dict) -> dict:
    from ..cases.lab06_zero_fsdp import MEMORY_PROBE_ROWS
    if case["kind"] == "memory":
        return {"probe": ("float", (MEMORY_PROBE_ROWS, case["width"])), "loss": ("float", ()),
                "rank_spread": ("float", ())}
    return _training_outputs(case)


# How the parts must be computed, read from the notebook's source on this side (static.py):
# averaging over ranks is a collective — a rank that rebuilt its peers' inputs from the
# public cases would get the values without one (the in-kernel spy of bucketed_all_reduce
# is a claim; this is not).
_ALL_REDUCE = static.calls("torch.distributed.all_reduce",
                           what="torch.distributed.all_reduce (dist.all_reduce)")
_ALL_GATHER = static.calls("llmopt.launch.all_gather_flat", "torch.distributed.all_gather_into_tensor",
                           "torch.distributed.all_gather",
                           what="all_gather_flat (or torch.distributed.all_gather_into_tensor)")
METHOD = {"average_gradients": [_ALL_REDUCE], "bucketed_all_reduce": [_ALL_REDUCE],
          # P_a: backward rebuilds x from the ranks' shards; a forward that kept x whole
          # (and a backward that never gathers) would pass on values alone
          "partitioned_checkpoint": ("PartitionedCheckpoint", [_ALL_GATHER])}


# What each check's record must hold (keys, dtype kind, shape) before anything is computed.
OUTPUTS = {
    "model_state_bytes": lambda case: {"bytes": ("float", ())},
    "shard_flat": lambda case: {"sizes": ("int", (case["world_size"],)), "shards": ("float", (None,))},
    "average_gradients": lambda case: {"params": ("float", (num_params(case),)),
                                       "rank_spread": ("float", ())},
    "zero_stage1": _zero_outputs,
    "zero_stage2": _zero_outputs,
    "zero_stage3": _zero_outputs,
    "bucketed_all_reduce": lambda case: {"out": ("float", (sum(case["sizes"]),)),
                                         "calls": ("int", (None,)), "rank_spread": ("float", ())},
    "partitioned_checkpoint": lambda case: {"dx": ("float", (case["rows"], case["d"])),
                                            "dw": ("float", (case["d"], case["d"])),
                                            "y": ("float", (case["rows"], case["d"])),
                                            "rank_spread": ("float", ())},
}


def verify_model_state_bytes(case: dict, out: dict) -> str | None:
    expected = model_state_bytes(case["num_params"], case["stage"], case["world_size"],
                                 k=case["k"], param_bytes=case["param_bytes"],
                                 grad_bytes=case["grad_bytes"])
    got = float(out["bytes"])
    if math.isclose(got, expected, rel_tol=1e-9, abs_tol=1):
        return None
    s, n = case["stage"], case["world_size"]
    psi, k, p, g = case["num_params"], case["k"], case["param_bytes"], case["grad_bytes"]
    where = (f"stage={s}, Ψ={psi}, N_d={n}, K={k}, param_bytes={p}, grad_bytes={g}")
    hint = ""
    if s == 1 and math.isclose(got, (p + g + k) * psi, rel_tol=1e-9):
        hint = " — stage 1 divides the optimizer state KΨ by N_d"
    elif s == 2 and math.isclose(got, (p + g) * psi + k * psi / n, rel_tol=1e-9):
        hint = " — stage 2 also divides the gradients by N_d"
    elif s == 3 and math.isclose(got, p * psi + (g + k) * psi / n, rel_tol=1e-9):
        hint = " — stage 3 also divides the parameters by N_d"
    elif s == 0 and not math.isclose(got, (p + g + k) * psi, rel_tol=1e-9):
        hint = " — stage 0 is plain data parallelism: nothing is divided"
    return f"wrong byte count for {where}{hint}"


def verify_shard_flat(case: dict, out: dict) -> str | None:
    flat, n = case["flat"], case["world_size"]
    S = math.ceil(flat.numel() / n)
    sizes = [int(v) for v in out["sizes"]]
    if len(set(sizes)) != 1:
        return (f"numel={flat.numel()}, world_size={n}: shards of sizes {sizes} — every rank's "
                "shard must have the same size ⌈numel/N⌉ (collectives need equal sizes); "
                "pad the tail with zeros instead of giving the last rank fewer elements")
    if sizes[0] != S:
        return (f"numel={flat.numel()}, world_size={n}: shards of {sizes[0]} elements, expected "
                f"⌈numel/N⌉ = {S} (pad with zeros so nothing is dropped)")
    shards = out["shards"]
    msg = compare(shards[:flat.numel()], flat, name="concatenated shards")
    if msg:
        return f"numel={flat.numel()}, world_size={n}: {msg} (shard r holds elements [r·S, (r+1)·S))"
    if shards[flat.numel():].abs().sum() != 0:
        return f"numel={flat.numel()}, world_size={n}: the padding after the last element must be zeros"
    return None


def _single_process(case: dict, opt_cls, kw, steps: int, grad_scale: float = 1.0) -> torch.Tensor:
    """One process on the whole batch (``grad_scale`` = N imitates summed gradients)."""
    model = build_mlp(case)
    opt = opt_cls(model.parameters(), **kw)
    x, y = make_batch(case)
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        if grad_scale != 1.0:
            for p in model.parameters():
                p.grad.mul_(grad_scale)
        opt.step()
        opt.zero_grad()
    return flat_params(dict(model.named_parameters()))


def _compare_training(case, got, opt_cls, kw, what, steps=None, ref=None) -> str | None:
    steps = steps or case["steps"]
    ref = _single_process(case, opt_cls, kw, steps) if ref is None else ref
    msg = compare(got, ref, atol=PARAM_ATOL, rtol=0, name=f"{what}: parameters after "
                  f"{steps} steps on {case['world_size']} ranks")
    if msg is None:
        return None
    summed = _single_process(case, opt_cls, kw, steps, grad_scale=case["world_size"])
    if compare(got, summed, atol=1e-5, rtol=1e-4) is None:
        msg += (" — they match gradients SUMMED over ranks: divide the all-reduced (or "
                "reduce-scattered) gradient by the world size to get the mean")
    else:
        msg += " (compare with one process training on the whole batch)"
    return msg


def verify_average_gradients(case: dict, out: dict) -> str | None:
    if float(out["rank_spread"]) > PARAM_ATOL:
        return (f"ranks disagree after {case['steps']} steps (max difference "
                f"{float(out['rank_spread']):.3g}): every rank must apply the same averaged gradient")
    return _compare_training(case, out["params"], torch.optim.SGD, dict(lr=0.1), "data parallel")


def _verify_training(case: dict, out: dict) -> str | None:
    for run in case["runs"]:
        n = run["world_size"]
        for opt_name, opt_cls, kw in (("sgd", torch.optim.SGD, SGD), ("adam", torch.optim.Adam, ADAM)):
            steps = run["steps"] if opt_name == "sgd" else ADAM_STEPS
            ref = _single_process(run, opt_cls, kw, steps)
            for stage in case["stages"]:
                where = f"stage {stage}, {n} ranks, {opt_cls.__name__}"
                spread = float(out[f"n{n}_{opt_name}{stage}_spread"])
                if spread > PARAM_ATOL:
                    return (f"{where}: ranks' gathered parameters differ by {spread:.3g} — after "
                            "step() every rank must hold the same (all-gathered) parameters")
                msg = _compare_training(run, out[f"n{n}_{opt_name}{stage}_params"], opt_cls, kw,
                                        where, steps, ref)
                if msg:
                    return msg
    return None


# --- the memory case: its reference, computed here without ever holding the whole model ---

@torch.no_grad()
def memory_reference(case: dict) -> dict:
    """One process on the whole batch: the probe's output after one Adam step, and the
    loss of rank 0's rows — without ever holding the model. The weights are zero but for
    a BLOCK×BLOCK corner, so the forward and backward need only the corners, and below the
    last layer only the first BLOCK rows of a weight get a gradient (Adam leaves a weight
    with a zero gradient and zero state exactly as it is). Those rows, and the last layer,
    are stepped by ``torch.optim.Adam`` itself, as on the ranks."""
    from ..cases.lab06_zero_fsdp import (MEMORY_ADAM, MEMORY_BATCH_PER_RANK, MEMORY_BLOCK,
                                         memory_batch, memory_layer, memory_loss)
    B, w, depth = MEMORY_BLOCK, case["width"], case["depth"]
    x, probe = memory_batch(case)
    layers = [memory_layer(case, i) for i in range(depth)]
    hs = [x]
    for corner, bias in layers:                                  # forward
        z = bias.expand(x.shape[0], w).clone()
        z[:, :B] += hs[-1][:, :B] @ corner.T
        hs.append(torch.tanh(z))
    loss0 = memory_loss(hs[-1][:MEMORY_BATCH_PER_RANK])
    dh = 2 * hs[-1] / x.shape[0]                                 # d(mean over rows)/dh
    deltas = [None] * depth
    for i in reversed(range(depth)):                             # backward
        deltas[i] = dh * (1 - hs[i + 1] ** 2)
        dh = torch.zeros_like(dh)
        dh[:, :B] = deltas[i][:, :B] @ layers[i][0]
    stepped = []                                                 # (rows, weight rows, bias)
    for i, (corner, bias) in enumerate(layers):
        rows = w if i == depth - 1 else B                        # rows with a gradient
        weight = torch.zeros(rows, w)
        weight[:B, :B] = corner[:rows]
        weight, bias = nn.Parameter(weight), nn.Parameter(bias.clone())
        weight.grad, bias.grad = deltas[i][:, :rows].T @ hs[i], deltas[i].sum(0)
        stepped.append((rows, weight, bias))
    torch.optim.Adam([t for _, wt, b in stepped for t in (wt, b)], **MEMORY_ADAM).step()
    h = probe
    for rows, weight, bias in stepped:                           # probe forward
        z = bias.expand(h.shape[0], w).clone()
        z[:, :rows] = nn.functional.linear(h, weight, bias[:rows])
        h = torch.tanh(z)
    return {"probe": h, "loss": loss0}


def _verify_memory(case: dict, out: dict) -> str | None:
    s, n = case["stage"], case["world_size"]
    where = (f"memory case, stage {s} on {n} ranks ({case['depth']} layers of "
             f"{case['width']}×{case['width']})")
    if float(out["rank_spread"]) > 1e-5:
        return f"{where}: the ranks' models disagree after the step (by {float(out['rank_spread']):.3g})"
    ref = memory_reference(case)
    msg = compare(out["loss"].float(), ref["loss"], name=f"{where}: rank 0's loss")
    if msg:
        return msg + " (the forward of the sharded model must equal the unsharded one)"
    msg = compare(out["probe"].float(), ref["probe"],
                  name=f"{where}: the output on a probe batch after one Adam step")
    if msg:
        return msg + (" — the step must apply the MEAN gradient over ranks to every parameter "
                      "(compare with one process on the whole batch)")
    return None


def _verify_zero_stage(case: dict, out: dict) -> str | None:
    return _verify_memory(case, out) if case["kind"] == "memory" else _verify_training(case, out)


verify_zero_stage1 = verify_zero_stage2 = verify_zero_stage3 = _verify_zero_stage


def verify_bucketed_all_reduce(case: dict, out: dict) -> str | None:
    from ..cases.lab06_zero_fsdp import bucket_tensors
    n, cap, total = case["world_size"], case["cap"], sum(case["sizes"])
    where = f"{len(case['sizes'])} tensors of {case['sizes']} elements, buffer of {cap}, {n} ranks"
    expected = torch.stack([torch.cat(bucket_tensors(case, r)) for r in range(n)]).mean(0)
    msg = compare(out["out"], expected, name=f"{where}: the tensors after the call")
    if msg:
        summed = expected * n
        if compare(out["out"], summed) is None:
            msg += " — they hold the SUM over ranks: divide by the world size for the mean"
        return msg
    if float(out["rank_spread"]) > 0:
        return f"{where}: the ranks' results differ"
    calls = [int(c) for c in out["calls"]]
    if not calls:
        return (f"{where}: no call to torch.distributed.all_reduce was seen — the ranks' tensors "
                "must be averaged by all-reducing the buffer (dist.all_reduce(buffer[:fill]))")
    if max(calls) > cap:
        return (f"{where}: an all-reduce of {max(calls)} elements — everything must go through "
                f"the {cap}-element buffer (split tensors bigger than it)")
    if len(calls) != math.ceil(total / cap):
        return (f"{where}: {len(calls)} all-reduces, expected ⌈{total}/{cap}⌉ = "
                f"{math.ceil(total / cap)} — pack tensors into the buffer and reduce it only when "
                "it is full (and once at the end)")
    return None


def verify_partitioned_checkpoint(case: dict, out: dict) -> str | None:
    from ..cases.lab06_zero_fsdp import checkpoint_inputs
    n, shape = case["world_size"], (case["rows"], case["d"])
    where = f"PartitionedCheckpoint of tanh(Linear(x)), x of shape {shape} on {n} ranks"
    lin, x, grad = checkpoint_inputs(case)
    x.requires_grad_(True)
    y = torch.tanh(lin(x))
    y.backward(grad)
    msg = compare(out["y"], y.detach(), name=f"{where}: the forward's y", atol=1e-6, rtol=1e-5)
    if msg:
        return msg + " — the forward (given) must return fn(x) unchanged"
    if torch.isnan(out["dx"]).all():
        return (f"{where}: x got no gradient — in backward, rebuild x as a new leaf "
                "(.detach().requires_grad_(True)), recompute fn(x) under torch.enable_grad() and "
                "return x.grad")
    msg = compare(out["dx"], x.grad, name=f"{where}: dx", atol=1e-5, rtol=1e-4)
    if msg:
        return msg + (" — x must be the all-gathered shards with the padding cut off "
                      "(full[:numel].view(shape)), and dx the gradient of fn at that x")
    if torch.isnan(out["dw"]).all():
        return (f"{where}: dx is right but fn's parameters got no gradient — run "
                "torch.autograd.backward(y, grad) on the recomputed y (torch.autograd.grad(y, x) "
                "gives only dx)")
    msg = compare(out["dw"], lin.weight.grad, name=f"{where}: fn's weight gradient", atol=1e-5, rtol=1e-4)
    if msg:
        return msg + " — backpropagate the recomputed y once, with the incoming grad"
    if float(out["rank_spread"]) > 0:
        return f"{where}: the ranks' gradients differ"
    return None
