"""Hidden-check cases of lab06_zero_fsdp (run in the student's kernel; no answers here).

Distributed checks run the student's function on real processes through
``llmopt.parallel.launch`` (a library utility, not the module under study): gloo, 2 and 4
ranks, a few steps of a small MLP whose layer sizes do not divide by the world size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from llmopt.parallel import launch, measured_state_bytes

LAUNCH_TIMEOUT_S = 90
SGD = dict(lr=0.1, momentum=0.9)
ADAM = dict(lr=1e-2)
ADAM_STEPS = 2          # the memory run: Adam's state exists after the first step


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
    out = launch(_dp_rank, case["world_size"], fn, case, timeout=LAUNCH_TIMEOUT_S)
    spread = max((o - out[0]).abs().max().item() for o in out)
    return {"params": out[0], "rank_spread": torch.tensor(spread, dtype=torch.float64)}


# --- shard_model(model, stage, optimizer_cls, **opt_kwargs) + gather_full_params(model) --

def inputs_shard_model(seed: int) -> list[dict]:
    return _dist_cases(seed)


def _zero_rank(rank, world_size, fns, case):
    shard_model, gather_full_params = fns
    x, y = local_batch(case, rank)
    out = {}
    for opt_name, opt_cls, kw in (("sgd", torch.optim.SGD, SGD), ("adam", torch.optim.Adam, ADAM)):
        for stage in range(4):
            model, opt = shard_model(build_mlp(case), stage, opt_cls, **kw)
            steps = case["steps"] if opt_name == "sgd" else ADAM_STEPS
            for i in range(steps):
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                del loss
                if i == steps - 1:             # after backward, before the step
                    mem = measured_state_bytes(opt, model)
                opt.step()
                opt.zero_grad()
            out[f"{opt_name}{stage}_params"] = flat_params(gather_full_params(model))
            out[f"{opt_name}{stage}_mem"] = torch.tensor(
                [mem["params"], mem["grads"], mem["optimizer"]], dtype=torch.float64)
            del model, opt
    return out


def run_shard_model(fn, case: dict) -> dict:
    """``fn`` is the pair ``(shard_model, gather_full_params)``."""
    out = launch(_zero_rank, case["world_size"], tuple(fn), case, timeout=LAUNCH_TIMEOUT_S)
    result = {}
    for key in out[0]:
        if key.endswith("_params"):
            spread = max((o[key] - out[0][key]).abs().max().item() for o in out)
            result[key] = out[0][key]
            result[key.replace("_params", "_spread")] = torch.tensor(spread, dtype=torch.float64)
        else:
            result[key] = torch.stack([o[key] for o in out])        # (N, 3) per rank
    return result


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
    out = launch(_bucket_rank, case["world_size"], fn, case, timeout=LAUNCH_TIMEOUT_S)
    return {"out": out[0]["out"], "calls": out[0]["calls"],
            "rank_spread": torch.tensor(max((o["out"] - out[0]["out"]).abs().max().item() for o in out),
                                        dtype=torch.float64)}
