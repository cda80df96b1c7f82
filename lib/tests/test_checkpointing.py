"""llmopt.checkpointing: checkpointed gradients equal plain ones (dropout included), the
recomputation runs once more in backward, √n segments, and saved bytes shrink as the rule says."""
import math

import pytest
import torch
import torch.nn as nn

from llmopt.checkpointing import (CheckpointFunction, checkpoint, checkpoint_sequential,
                                  saved_activation_bytes, segment_bounds)
from llmopt.gpt import Block, GPTConfig


def _mlp(d=16, p=0.3):
    return nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Dropout(p), nn.Linear(4 * d, d))


def _grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


def _plain_and_ckpt(module, x, seed=0, ckpt=checkpoint):
    out = {}
    for name in ("plain", "ckpt"):
        module.zero_grad()
        xi = x.detach().clone().requires_grad_(True)
        torch.manual_seed(seed)
        y = module(xi) if name == "plain" else ckpt(module, xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[name] = (y.detach(), [xi.grad.clone()] + [p.grad.clone() for p in module.parameters()])
    return out


def test_checkpoint_gradients_equal_plain_with_dropout():
    torch.manual_seed(1)
    m = _mlp()
    r = _plain_and_ckpt(m, torch.randn(5, 16))
    torch.testing.assert_close(r["ckpt"][0], r["plain"][0])
    for a, b in zip(r["ckpt"][1], r["plain"][1]):
        torch.testing.assert_close(a, b)


def test_checkpoint_runs_fn_twice_and_saves_nothing_inside():
    calls = []
    lin = nn.Linear(8, 8)

    def fn(x):
        calls.append(torch.is_grad_enabled())
        return torch.relu(lin(x)) * 2

    x = torch.randn(3, 8, requires_grad=True)
    y = checkpoint(fn, x)
    assert calls == [False]
    y.sum().backward()
    assert calls == [False, True] and lin.weight.grad is not None and x.grad is not None
    assert saved_activation_bytes(lambda x: checkpoint(fn, x), x) == x.numel() * 4   # only the input
    assert saved_activation_bytes(fn, x) == 2 * x.numel() * 4             # x and relu's output


def test_rng_of_the_caller_is_left_alone():
    m = _mlp()
    x = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(3)
    y = checkpoint(m, x)
    after_forward = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_non_tensor_arguments_pass_through():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    y = checkpoint(lambda x, k: lin(x) * k, x, 3.0)
    y.sum().backward()
    torch.testing.assert_close(lin.weight.grad, 3.0 * x.detach().sum(0)[None, :].expand(4, 4))


def test_segment_bounds():
    assert segment_bounds(9) == [(0, 3), (3, 6), (6, 9)]
    assert segment_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert segment_bounds(16) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert segment_bounds(1) == [(0, 1)] and segment_bounds(3, 10) == [(0, 1), (1, 2), (2, 3)]


def _blocks(n, d=16, dropout=0.2):
    cfg = GPTConfig(vocab_size=32, n_layer=n, n_head=2, d_model=d, d_ff=2 * d, dropout=dropout,
                    max_position_embeddings=16)
    torch.manual_seed(0)
    return nn.ModuleList(Block(cfg, i) for i in range(n)).train()


@pytest.mark.parametrize("segments", [None, 1, 2, 5])
def test_checkpoint_sequential_gradients_equal_plain(segments):
    blocks = _blocks(5)
    seq = nn.Sequential(*blocks)
    r = _plain_and_ckpt(seq, torch.randn(2, 6, 16), seed=4,
                        ckpt=lambda m, x: checkpoint_sequential(list(m), x, segments))
    for a, b in zip(r["ckpt"][1], r["plain"][1]):
        torch.testing.assert_close(a, b)


def test_saved_bytes_follow_the_sqrt_rule():
    x = torch.randn(2, 8, 16, requires_grad=True)
    act = x.numel() * 4
    plain, sqrt = [], []
    for n in (4, 9, 16):
        blocks = _blocks(n, dropout=0.0)
        plain.append(saved_activation_bytes(lambda x: nn.Sequential(*blocks)(x), x))
        sqrt.append(saved_activation_bytes(lambda x: checkpoint_sequential(blocks, x), x))
        per_block = plain[-1] / n
        s = round(math.sqrt(n))
        # (s - 1) segment inputs + the last segment's n/s blocks
        assert sqrt[-1] == pytest.approx((s - 1) * act + (n // s) * per_block, rel=0.02)
    assert plain[2] / plain[0] == pytest.approx(4, rel=0.02)                  # O(n)
    assert sqrt[2] / sqrt[0] == pytest.approx(2, rel=0.25)                    # O(√n)


def test_saved_bytes_count_a_storage_once_and_no_parameters():
    lin = nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    # relu's output is saved by relu and twice by the product: one storage
    assert saved_activation_bytes(lambda x: (lambda r: r * r)(torch.relu(lin(x))), x) == 2 * 4 * 8 * 4
    assert saved_activation_bytes(lambda x: x.sum() * 2, x) == 0


def test_is_an_autograd_function():
    assert issubclass(CheckpointFunction, torch.autograd.Function)
