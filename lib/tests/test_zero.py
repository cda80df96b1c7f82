"""llmopt.zero: the ZeRO formula, stages 0–3 on 2 and 4 gloo ranks, ZeRO-R pieces."""
import pytest
import torch
import torch.nn as nn

from llmopt.launch import launch
from llmopt.zero import (bucketed_all_reduce, comm_volume, gather_full_params,
                         measured_state_bytes, model_state_bytes, partitioned_checkpoint,
                         shard_flat, shard_model)

GB = 1e9


def test_formula_reproduces_the_papers_7_5b_on_64_gpus_example():
    psi, n = 7.5e9, 64
    got = [model_state_bytes(psi, s, n) / GB for s in range(4)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9], got


def test_formula_is_linear_in_the_byte_counts():
    assert model_state_bytes(10, 0, 4, k=8, param_bytes=4, grad_bytes=4) == 160
    assert model_state_bytes(12, 3, 4) == 12 * 16 / 4
    assert comm_volume(100, 2) == 200 and comm_volume(100, 3) == 300, "stage 3 moves 1.5×"
    with pytest.raises(ValueError):
        model_state_bytes(1, 4, 2)


def test_shards_are_equal_sized_and_padded_when_numel_does_not_divide():
    flat = torch.arange(10.0)
    shards = [shard_flat(flat, r, 4) for r in range(4)]
    assert all(s.shape == (3,) for s in shards), "every shard must have ceil(10/4) = 3 elements"
    torch.testing.assert_close(torch.cat(shards)[:10], flat)
    assert torch.cat(shards)[10:].abs().sum() == 0, "the padding must be zeros"


def _mlp():
    torch.manual_seed(0)          # 10·13+13 = 143 parameters in the first layer: odd sizes
    return nn.Sequential(nn.Linear(10, 13), nn.ReLU(), nn.Linear(13, 33), nn.Tanh(),
                         nn.Linear(33, 5))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 10, generator=g), torch.randn(16, 5, generator=g)


def _single(opt_cls, kw, steps=5):
    model = _mlp()
    opt = opt_cls(model.parameters(), **kw)
    x, y = _batch()
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in model.named_parameters()}


def _all_stages(rank, world_size, runs, steps=5):
    x, y = _batch()
    b = x.shape[0] // world_size
    x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
    out = []
    for opt_cls, kw in runs:
        for stage in range(4):
            model, opt = shard_model(_mlp(), stage, opt_cls, **kw)
            for i in range(steps):
                nn.functional.mse_loss(model(x), y).backward()
                if i == steps - 1:
                    mem = measured_state_bytes(opt, model)
                opt.step()
                opt.zero_grad()
            out.append((opt_cls.__name__, stage, gather_full_params(model), mem))
            del model, opt
    return out


RUNS = [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.Adam, dict(lr=1e-2))]


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_stage_trains_like_one_process_with_the_formulas_memory(world_size):
    refs = {cls.__name__: _single(cls, kw) for cls, kw in RUNS}
    psi = sum(v.numel() for v in refs["SGD"].values())
    results = launch(_all_stages, world_size, RUNS)
    for rank, res in enumerate(results):
        for name, stage, params, mem in res:
            for k, ref in refs[name].items():
                err = (params[k] - ref).abs().max().item()
                assert err <= 1e-6, f"{name} stage {stage} rank {rank}: {k} off by {err:.2e}"
            k_bytes = 12 if name == "Adam" else 8          # fp32 master + 2 or 1 moments
            want = model_state_bytes(psi, stage, world_size, k=k_bytes, param_bytes=4, grad_bytes=4)
            assert abs(mem["total"] / want - 1) < 0.05, (name, stage, rank, mem, want)
            if stage >= 1:
                assert mem["optimizer"] < 1.05 * k_bytes * psi / world_size + 64, (stage, mem)
            if stage == 3:
                assert mem["params"] < 1.05 * 4 * psi / world_size, "full params must be freed"


class _Tied(nn.Module):
    """Blocks in a ModuleList and a weight used twice (embedding = head), like OPT."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))
        self.ln = nn.LayerNorm(8)

    def forward(self, ids):
        h = self.emb(ids)
        for blk in self.blocks:
            h = h + blk(h)
        return self.ln(h) @ self.emb.weight.t()


def _tied(rank, world_size, stage, overlap=False):
    ids = torch.arange(24).remainder(11).view(4, 6)
    b = 4 // world_size
    model, opt = shard_model(_Tied(), stage, torch.optim.SGD, overlap=overlap, lr=0.5)
    for _ in range(3):
        logits = model(ids[rank * b:(rank + 1) * b])
        nn.functional.cross_entropy(logits.reshape(-1, 11), ids[rank * b:(rank + 1) * b].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    if overlap:
        most_live = model._zero_live[1]          # before gather_full_params makes all whole
        return gather_full_params(model), most_live
    return gather_full_params(model)


@pytest.mark.parametrize("stage", [2, 3])
def test_transformer_like_model_with_tied_weights(stage):
    model = _Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.arange(24).remainder(11).view(4, 6)
    for _ in range(3):
        nn.functional.cross_entropy(model(ids).reshape(-1, 11), ids.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    got = launch(_tied, 2, stage)[1]
    for k, v in model.named_parameters():
        torch.testing.assert_close(got[k], v.detach(), atol=1e-6, rtol=0)


def _zero_r(rank, world_size):
    # C_B: many tensors through a 7-element buffer, the same as one all-reduce each
    ts = [torch.full((n,), float(rank + 1)) * torch.arange(n) for n in (3, 10, 1, 5)]
    bucketed_all_reduce(ts, torch.empty(7))
    # P_a: a replicated activation checkpoint kept as 1/N per rank, same gradient
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    x = torch.randn(5, 6, requires_grad=True)
    partitioned_checkpoint(lambda t: torch.tanh(lin(t)), x).sum().backward()
    return {"ts": ts, "dx": x.grad, "dw": lin.weight.grad}


def test_zero_r_constant_buffer_and_partitioned_checkpoint():
    out = launch(_zero_r, 2)
    mean = (1 + 2) / 2
    for t, n in zip(out[0]["ts"], (3, 10, 1, 5)):
        torch.testing.assert_close(t, mean * torch.arange(n, dtype=torch.float32))
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    x = torch.randn(5, 6, requires_grad=True)
    torch.tanh(lin(x)).sum().backward()
    torch.testing.assert_close(out[1]["dx"], x.grad)
    torch.testing.assert_close(out[1]["dw"], lin.weight.grad)


@pytest.mark.parametrize("stage", [2, 3])
def test_overlap_prefetch_and_async_reduce_scatter_change_nothing_but_timing(stage):
    """overlap=True (prefetched all-gathers, reduce-scatters in flight) trains exactly as
    overlap=False, and at stage 3 never holds more than the root and two blocks whole."""
    plain = launch(_tied, 2, stage)
    overlapped = launch(_tied, 2, stage, True)
    for rank in range(2):
        params, most_live = overlapped[rank]
        for k, v in plain[rank].items():
            torch.testing.assert_close(params[k], v, atol=0, rtol=0)
        if stage == 3:
            assert most_live == 3, f"at most the root + current + next unit whole, saw {most_live}"
