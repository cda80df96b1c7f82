"""llmopt.parallel: data, pipeline and tensor parallelism on real processes (gloo)."""
import torch
import torch.nn as nn

import llmopt.launch
from llmopt.parallel import (ColumnParallelLinear, average_gradients, launch, pipeline_step,
                             split_layers)


def test_parallel_re_exports_the_launcher():
    from llmopt import parallel
    assert parallel.launch is llmopt.launch.launch and parallel.RankError is llmopt.launch.RankError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _dp(rank, world_size):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    b = x.shape[0] // world_size
    for _ in range(3):
        nn.functional.mse_loss(model(x[rank * b:(rank + 1) * b]), y[rank * b:(rank + 1) * b]).backward()
        average_gradients(model)
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def test_data_parallel_equals_one_process_on_the_whole_batch():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    for _ in range(3):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for ps in launch(_dp, 2):
        for p, q in zip(ps, model.parameters()):
            torch.testing.assert_close(p, q.detach(), atol=1e-6, rtol=0)


def _pipe(rank, world_size):
    stage = split_layers(list(_mlp()), rank, world_size)
    x, y = _batch()
    loss, sent = pipeline_step(stage, x if rank == 0 else None, y, nn.functional.mse_loss,
                               (8, 16), rank, world_size)
    return {"loss": loss.detach() if loss is not None else None, "sent": sent,
            "grads": [p.grad for p in stage.parameters()]}


def test_pipeline_split_gives_the_same_loss_and_gradients():
    model = _mlp()
    x, y = _batch()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    out = launch(_pipe, 2)
    torch.testing.assert_close(out[1]["loss"], loss.detach())
    grads = out[0]["grads"] + out[1]["grads"]
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)
    assert out[0]["sent"] == 8 * 16 * 4 and out[1]["sent"] == 8 * 16 * 4, "activation + its gradient"


def _tp(rank, world_size):
    torch.manual_seed(0)
    full = nn.Linear(5, 8)
    layer = ColumnParallelLinear.from_linear(full)
    x = torch.randn(3, 5, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "w_rows": layer.weight.shape[0]}


def test_column_parallel_linear_matches_the_full_layer():
    torch.manual_seed(0)
    full = nn.Linear(5, 8)
    x = torch.randn(3, 5, requires_grad=True)
    y = full(x)
    y.pow(2).sum().backward()
    for o in launch(_tp, 2):
        torch.testing.assert_close(o["y"], y.detach())
        torch.testing.assert_close(o["dx"], x.grad)
        assert o["w_rows"] == 4, "each rank holds out_features / N rows of W"
