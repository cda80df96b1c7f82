"""How the hidden checks of lab06_zero_fsdp are judged (trusted side; never in the kernel).

References are single-process trainings on the whole batch (what data parallelism and
every ZeRO stage must reproduce) and ``llmopt.zero.model_state_bytes``; measured bytes per
rank must be within 5% of the formula (fp32 model: 4-byte params and grads, plus an fp32
master copy in the optimizer: K = 8 for SGD with momentum, 12 for Adam).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from llmopt.testing import compare
from llmopt.zero import model_state_bytes

from ..cases.lab06_zero_fsdp import (ADAM, ADAM_STEPS, SGD, build_mlp, flat_params, make_batch,
                                     num_params)

PARAM_ATOL = 1e-6
MEM_RTOL = 0.05


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


def verify_shard_model(case: dict, out: dict) -> str | None:
    n, psi = case["world_size"], num_params(case)
    for opt_name, opt_cls, kw, k in (("sgd", torch.optim.SGD, SGD, 8), ("adam", torch.optim.Adam, ADAM, 12)):
        steps = case["steps"] if opt_name == "sgd" else ADAM_STEPS
        ref = _single_process(case, opt_cls, kw, steps)
        for stage in range(4):
            where = f"stage {stage}, {n} ranks, {opt_cls.__name__}"
            spread = float(out[f"{opt_name}{stage}_spread"])
            if spread > PARAM_ATOL:
                return (f"{where}: ranks' gathered parameters differ by {spread:.3g} — after "
                        "step() every rank must hold the same (all-gathered) parameters")
            msg = _compare_training(case, out[f"{opt_name}{stage}_params"], opt_cls, kw, where,
                                    steps, ref)
            if msg:
                return msg
            mem = out[f"{opt_name}{stage}_mem"]                     # (N, 3): params, grads, opt
            want = model_state_bytes(psi, stage, n, k=k, param_bytes=4, grad_bytes=4)
            parts = {"parameters": (4 * psi if stage < 3 else 4 * psi / n),
                     "gradients": (4 * psi if stage < 2 else 4 * psi / n),
                     "optimizer state": (k * psi if stage < 1 else k * psi / n)}
            for rank in range(n):
                total = float(mem[rank].sum())
                if abs(total / want - 1) <= MEM_RTOL:
                    continue
                got = dict(zip(parts, (float(v) for v in mem[rank])))
                hints = []
                for name, expect in parts.items():
                    if got[name] > (1 + MEM_RTOL) * expect + 64:
                        hints.append(f"{name}: {got[name] / expect:.2f}× the formula's share")
                    elif got[name] < (1 - MEM_RTOL) * expect - 64:
                        hints.append(f"{name}: only {got[name] / expect:.2f}× the formula's share")
                hint = ""
                if stage >= 1 and got["optimizer state"] > 0.8 * k * psi:
                    hint = (" — the optimizer state is whole on every rank: build the optimizer "
                            "over this rank's shard (an fp32 master copy of 1/N_d of the parameters)")
                elif stage == 3 and got["parameters"] > 0.8 * 4 * psi:
                    hint = (" — the full parameters stay allocated: free the all-gathered buffer "
                            "(untyped_storage().resize_(0)) after each unit's forward and backward")
                elif stage == 2 and got["gradients"] > 0.8 * 4 * psi:
                    hint = (" — full gradients are kept: reduce-scatter each unit's gradient as "
                            "soon as backward produced it and drop the full one")
                return (f"{where}, rank {rank}: model state {total / want:.3f}× the formula "
                        f"(allowed ±{MEM_RTOL:.0%}); {'; '.join(hints) or 'no part stands out'}{hint}")
    return None


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
    if calls:                  # seen through dist.all_reduce
        if max(calls) > cap:
            return (f"{where}: an all-reduce of {max(calls)} elements — everything must go through "
                    f"the {cap}-element buffer (split tensors bigger than it)")
        if len(calls) != math.ceil(total / cap):
            return (f"{where}: {len(calls)} all-reduces, expected ⌈{total}/{cap}⌉ = "
                    f"{math.ceil(total / cap)} — pack tensors into the buffer and reduce it only when "
                    "it is full (and once at the end)")
    return None
