"""Hidden-check cases of lab06_zero_fsdp (run in the student's kernel; no answers here).

Distributed checks run the student's function on real processes through
``llmopt.launch.launch`` (support code, not the module under study): gloo, 2 and 4 ranks, a
few steps of a small MLP whose layer sizes do not divide by the world size. Nothing measured
here is trusted: memory is judged by the sandbox's memory limit (a rank over it is killed),
correctness by the trusted side's own reference on its own copy of the inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from llmopt.launch import RankError, launch

LAUNCH_TIMEOUT_S = 90
MEMORY_LAUNCH_TIMEOUT_S = 270   # the memory cases move gigabytes between 4–8 processes on 2 cores
SGD = dict(lr=0.1, momentum=0.9)
ADAM = dict(lr=1e-2)
ADAM_STEPS = 2          # Adam steps of the training cases


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the model and data every distributed case uses (the verifier rebuilds them) --------

def build_mlp(case: dict) -> nn.Sequential:
    torch.manual_seed(case["seed"])
    d_in, h, d_out = case["d_in"], case["hidden"], case["d_out"]
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.Tanh(),
                         nn.Linear(h, d_out))


def make_batch(case: dict):
    g = _gen(case["seed"] + 1)
    n = case["batch_per_rank"] * case["world_size"]
    return torch.randn(n, case["d_in"], generator=g), torch.randn(n, case["d_out"], generator=g)


def local_batch(case: dict, rank: int):
    x, y = make_batch(case)
    b = case["batch_per_rank"]
    return x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]


def flat_params(named: dict) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).float() for v in named.values()])


def _dist_cases(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for ws in (2, 4):
        cases.append(dict(world_size=ws, seed=int(torch.randint(0, 10_000, (1,), generator=g)),
                          d_in=int(torch.randint(5, 12, (1,), generator=g)),
                          hidden=4 * int(torch.randint(3, 6, (1,), generator=g)) + 1,  # odd
                          d_out=int(torch.randint(2, 6, (1,), generator=g)),
                          batch_per_rank=2, steps=5))
    return cases


# --- model_state_bytes(num_params, stage, world_size, k=12, param_bytes=2, grad_bytes=2) -

def inputs_model_state_bytes(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = [dict(num_params=7_500_000_000, stage=s, world_size=64, k=12, param_bytes=2,
                  grad_bytes=2) for s in range(4)]                         # the paper's example
    for s in range(4):
        cases.append(dict(num_params=int(torch.randint(10**6, 10**10, (1,), generator=g)), stage=s,
                          world_size=int(2 ** torch.randint(1, 8, (1,), generator=g)),
                          k=int((8, 12, 16)[int(torch.randint(0, 3, (1,), generator=g))]),
                          param_bytes=int((2, 4)[s % 2]), grad_bytes=int((2, 4)[s // 2])))
    return cases


def run_model_state_bytes(fn, case: dict) -> dict:
    got = fn(case["num_params"], case["stage"], case["world_size"], k=case["k"],
             param_bytes=case["param_bytes"], grad_bytes=case["grad_bytes"])
    return {"bytes": torch.tensor(float(got), dtype=torch.float64)}


# --- shard_flat(flat, rank, world_size) ---------------------------------------------------

def inputs_shard_flat(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for numel, ws in ((12, 4), (int(torch.randint(13, 40, (1,), generator=g)) * 4 + 1, 4),
                      (int(torch.randint(5, 30, (1,), generator=g)) * 2 + 1, 2), (3, 4)):
        cases.append(dict(flat=torch.randn(numel, generator=g), world_size=ws))
    return cases


def run_shard_flat(fn, case: dict) -> dict:
    shards = [fn(case["flat"].clone(), r, case["world_size"]) for r in range(case["world_size"])]
    return {"sizes": torch.tensor([int(s.numel()) for s in shards]),
            "shards": torch.cat([s.detach().reshape(-1) for s in shards])}


# --- average_gradients(model): data parallelism on real processes -------------------------

def inputs_average_gradients(seed: int) -> list[dict]:
    return _dist_cases(seed)


def _dp_rank(rank, world_size, fn, case):
    model = build_mlp(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = local_batch(case, rank)
    for _ in range(case["steps"]):
        nn.functional.mse_loss(model(x), y).backward()
        fn(model)
        opt.step()
        opt.zero_grad()
    return flat_params(dict(model.named_parameters()))


def run_average_gradients(fn, case: dict) -> dict:
    out = launch(_dp_rank, case["world_size"], fn, case, timeout=LAUNCH_TIMEOUT_S, backend="gloo")
    spread = max((o - out[0]).abs().max().item() for o in out)
    return {"params": out[0], "rank_spread": torch.tensor(spread, dtype=torch.float64)}


# --- zero_stage1 / zero_stage2 / zero_stage3: shard_model + gather_full_params ------------
#
# Each check is (shard_model, gather_full_params) and has two cases:
#   0. training: the stage(s) on 2 and on 4 ranks, SGD with momentum and Adam, from small MLPs
#      whose layer sizes do not divide by the world size; the trusted side compares the
#      gathered parameters with one process training on the whole batch.
#   1. memory: one Adam step of a wide MLP on `world_size` ranks, then a forward pass of a
#      probe batch (the evidence that the step was taken). The sizes are fixed so that the
#      stage's model state fits in the grading sandbox's memory limit and the next weaker
#      stage's does NOT — even with nothing else in memory, and even without an fp32 master
#      copy. The limit is the operating system's (a cgroup), not a measurement made here: a
#      rank that goes over is killed, and the case fails.

ZERO_STAGES = {"zero_stage1": (0, 1), "zero_stage2": (2,), "zero_stage3": (3,)}
MEMORY_STAGE = {"zero_stage1": 1, "zero_stage2": 2, "zero_stage3": 3}
# (world_size, width, depth) of the memory case of each stage; depth Linear(width, width)
# layers. Sized (and re-checked by the tests) in autograder/checks/lab06_zero_fsdp.py.
MEMORY_SIZES = {1: (4, 2048, 25), 2: (8, 2048, 22), 3: (4, 2048, 56)}
MEMORY_BLOCK = 64          # the weights are zero but for a random BLOCK×BLOCK corner
MEMORY_ADAM = dict(lr=1e-4, eps=1e-3)   # a large eps: the step is smooth in the gradient
MEMORY_BATCH_PER_RANK = 1
MEMORY_PROBE_ROWS = 2


def inputs_zero_stage(name: str, seed: int) -> list[dict]:
    training = [dict(c, kind="training", stages=ZERO_STAGES[name]) for c in _dist_cases(seed)]
    ws, width, depth = MEMORY_SIZES[MEMORY_STAGE[name]]
    g = _gen(seed + 17)
    memory = dict(kind="memory", stage=MEMORY_STAGE[name], world_size=ws, width=width,
                  depth=depth, seed=int(torch.randint(0, 10_000, (1,), generator=g)))
    return [dict(kind="training", stages=ZERO_STAGES[name], runs=training), memory]


def inputs_zero_stage1(seed: int) -> list[dict]:
    return inputs_zero_stage("zero_stage1", seed)


def inputs_zero_stage2(seed: int) -> list[dict]:
    return inputs_zero_stage("zero_stage2", seed)


def inputs_zero_stage3(seed: int) -> list[dict]:
    return inputs_zero_stage("zero_stage3", seed)


def _zero_rank(rank, world_size, fns, case):
    shard_model, gather_full_params = fns
    x, y = local_batch(case, rank)
    out = {}
    for opt_name, opt_cls, kw in (("sgd", torch.optim.SGD, SGD), ("adam", torch.optim.Adam, ADAM)):
        for stage in case["stages"]:
            model, opt = shard_model(build_mlp(case), stage, opt_cls, **kw)
            steps = case["steps"] if opt_name == "sgd" else ADAM_STEPS
            for _ in range(steps):
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                del loss
                opt.step()
                opt.zero_grad()
            out[f"{opt_name}{stage}_params"] = flat_params(gather_full_params(model))
            del model, opt
    return out


def _run_training(fn, inp: dict) -> dict:
    result = {}
    for case in inp["runs"]:
        n = case["world_size"]
        out = launch(_zero_rank, n, tuple(fn), case, timeout=LAUNCH_TIMEOUT_S, backend="gloo")
        for key in out[0]:
            spread = max((o[key] - out[0][key]).abs().max().item() for o in out)
            result[f"n{n}_{key}"] = out[0][key]
            result[f"n{n}_{key.replace('_params', '_spread')}"] = torch.tensor(spread, dtype=torch.float64)
    return result


# --- the memory case's model: zero weights cost nothing until written ----------------------

def _lazy_zeros(*shape) -> torch.Tensor:
    """fp32 zeros on fresh anonymous pages: no memory is used until they are written."""
    import mmap
    n = math.prod(shape)
    buf = mmap.mmap(-1, 4 * n)
    return torch.frombuffer(buf, dtype=torch.float32, count=n).view(*shape)


def memory_layer(case: dict, layer: int):
    """(weight corner (BLOCK, BLOCK), bias (width,)) of layer ``layer``, deterministic in the seed."""
    g = _gen(case["seed"] * 1000 + layer)
    corner = torch.randn(MEMORY_BLOCK, MEMORY_BLOCK, generator=g) / math.sqrt(MEMORY_BLOCK)
    return corner, 0.5 * torch.randn(case["width"], generator=g)


def build_memory_mlp(case: dict) -> nn.Sequential:
    """``depth`` × (Linear(width, width), Tanh); each weight zero but for its random corner."""
    w, layers = case["width"], []
    for i in range(case["depth"]):
        lin = nn.Linear(w, w, device="meta")
        weight = _lazy_zeros(w, w)
        corner, bias = memory_layer(case, i)
        weight[:MEMORY_BLOCK, :MEMORY_BLOCK] = corner
        lin.weight, lin.bias = nn.Parameter(weight), nn.Parameter(bias)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers)


def memory_batch(case: dict):
    """(x (world_size·batch, width), probe (PROBE_ROWS, width))."""
    g = _gen(case["seed"] + 5)
    n = case["world_size"] * MEMORY_BATCH_PER_RANK
    return torch.randn(n, case["width"], generator=g), torch.randn(MEMORY_PROBE_ROWS, case["width"], generator=g)


def memory_loss(out: torch.Tensor) -> torch.Tensor:
    """Sum of squares per row, mean over rows: every rank's mean of it is the whole batch's."""
    return out.square().sum(1).mean()


def _memory_rank(rank, world_size, fns, case):
    shard_model, _ = fns
    x, probe = memory_batch(case)
    b = MEMORY_BATCH_PER_RANK
    model, opt = shard_model(build_memory_mlp(case), case["stage"], torch.optim.Adam, **MEMORY_ADAM)
    loss = memory_loss(model(x[rank * b:(rank + 1) * b]))
    loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        out = model(probe)                              # the evidence: the updated model
    return {"probe": out.detach().clone(), "loss": loss.detach().reshape(())}


_OOM_HINTS = {1: "does each rank keep the optimizer state (the fp32 master copy, Adam's two moments) "
                 "of its own shard only?",
              2: "are the full gradients of a unit dropped once they are reduce-scattered "
                 "(in backward, unit by unit)?",
              3: "are the parameters freed (untyped_storage().resize_(0)) after the all-gather, "
                 "once the unit's forward and backward are done?"}


def _run_memory(fn, case: dict) -> dict:
    n, s = case["world_size"], case["stage"]
    try:
        out = launch(_memory_rank, n, tuple(fn), case, timeout=MEMORY_LAUNCH_TIMEOUT_S, backend="gloo")
    except RankError as exc:
        if "killed by SIGKILL" in str(exc):
            raise MemoryError(
                f"ran out of memory at stage {s} ({n} ranks, {case['depth']} layers of "
                f"{case['width']}×{case['width']}): {_OOM_HINTS[s]} ({exc})") from None
        raise
    spread = max((o["probe"] - out[0]["probe"]).abs().max().item() for o in out)
    return {"probe": out[0]["probe"], "loss": out[0]["loss"],
            "rank_spread": torch.tensor(spread, dtype=torch.float64)}


def _run_zero_stage(fn, inp: dict) -> dict:
    """``fn`` is the pair ``(shard_model, gather_full_params)``."""
    return _run_memory(fn, inp) if inp["kind"] == "memory" else _run_training(fn, inp)


run_zero_stage1 = run_zero_stage2 = run_zero_stage3 = _run_zero_stage


def num_params(case: dict) -> int:
    d_in, h, d_out = case["d_in"], case["hidden"], case["d_out"]
    return (d_in + 1) * h + (h + 1) * h + (h + 1) * d_out


def shard_size(numel: int, world_size: int) -> int:
    return math.ceil(numel / world_size)


# --- bucketed_all_reduce(tensors, buffer): ZeRO-R's constant-size buffer ------------------

def inputs_bucketed_all_reduce(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for ws, cap in ((2, 7), (4, int(torch.randint(5, 12, (1,), generator=g)))):
        sizes = [int(v) for v in torch.randint(1, 3 * cap, (5,), generator=g)]
        cases.append(dict(world_size=ws, cap=cap, sizes=sizes,
                          seed=int(torch.randint(0, 10_000, (1,), generator=g))))
    return cases


def bucket_tensors(case: dict, rank: int) -> list:
    g = _gen(case["seed"] + rank)
    return [torch.randn(n, generator=g) for n in case["sizes"]]


def _bucket_rank(rank, world_size, fn, case):
    import torch.distributed as dist
    tensors = bucket_tensors(case, rank)
    calls, real = [], dist.all_reduce

    def spy(t, *args, **kwargs):                # count the collectives and their sizes
        calls.append(t.numel())
        return real(t, *args, **kwargs)
    dist.all_reduce = spy
    try:
        fn(tensors, torch.zeros(case["cap"]))
    finally:
        dist.all_reduce = real
    return {"out": torch.cat([t.reshape(-1) for t in tensors]),
            "calls": torch.tensor(calls, dtype=torch.int64)}


def run_bucketed_all_reduce(fn, case: dict) -> dict:
    out = launch(_bucket_rank, case["world_size"], fn, case, timeout=LAUNCH_TIMEOUT_S, backend="gloo")
    return {"out": out[0]["out"], "calls": out[0]["calls"],
            "rank_spread": torch.tensor(max((o["out"] - out[0]["out"]).abs().max().item() for o in out),
                                        dtype=torch.float64)}


# --- partitioned_checkpoint: PartitionedCheckpoint (ZeRO-R's P_a), its backward -----------

def inputs_partitioned_checkpoint(seed: int) -> list[dict]:
    g = _gen(seed + 7)
    cases = []
    for ws in (2, 4):
        rows = int(torch.randint(3, 7, (1,), generator=g))
        d = int(torch.randint(5, 9, (1,), generator=g))
        if (rows * d) % ws == 0:                   # padding in the shards: numel not divisible
            rows += 1 if ((rows + 1) * d) % ws else 2
        cases.append(dict(world_size=ws, rows=rows, d=d,
                          seed=int(torch.randint(0, 10_000, (1,), generator=g))))
    return cases


def checkpoint_inputs(case: dict):
    """(linear layer, x, upstream gradient): the same on every rank (a replicated activation)."""
    g = _gen(case["seed"])
    lin = nn.Linear(case["d"], case["d"])
    with torch.no_grad():
        lin.weight.copy_(torch.randn(case["d"], case["d"], generator=g) / case["d"] ** 0.5)
        lin.bias.copy_(torch.randn(case["d"], generator=g))
    x = torch.randn(case["rows"], case["d"], generator=g)
    grad = torch.randn(case["rows"], case["d"], generator=g)
    return lin, x, grad


def _checkpoint_rank(rank, world_size, cls, case):
    lin, x, grad = checkpoint_inputs(case)
    x.requires_grad_(True)
    y = cls.apply(lambda t: torch.tanh(lin(t)), x)
    y.backward(grad)
    zeros = torch.zeros(case["rows"], case["d"])
    return {"dx": x.grad if x.grad is not None else zeros * float("nan"),
            "dw": lin.weight.grad if lin.weight.grad is not None else zeros[:1].expand(case["d"], -1) * float("nan"),
            "y": y.detach()}


def run_partitioned_checkpoint(cls, case: dict) -> dict:
    out = launch(_checkpoint_rank, case["world_size"], cls, case, timeout=LAUNCH_TIMEOUT_S, backend="gloo")
    spread = max((o["dx"] - out[0]["dx"]).abs().max().item() for o in out)
    return {"dx": out[0]["dx"], "dw": out[0]["dw"], "y": out[0]["y"],
            "rank_spread": torch.tensor(spread, dtype=torch.float64)}
