"""lab06's hidden checks, tested both ways: the reference passes; stubs and the mistakes of
MUTANTS.md fail, each with a message that points at the mistake. The distributed checks
run real gloo processes (2 and 4 ranks); broken variants reach the ranks by fork."""
import math

import pytest
import torch
import torch.distributed as dist

import llmopt.zero as zero
from autograder import grade_functions
from llmopt import parallel

LAB = "lab06_zero_fsdp"
REF = (zero.shard_model, zero.gather_full_params)


def stub(*args, **kwargs):
    raise NotImplementedError()


def grade(name, fn, seed=1):
    return grade_functions(LAB, {name: fn}, seed=seed)[name]


# --- model_state_bytes ---------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 12345])
def test_formula_reference_passes(seed):
    result = grade("model_state_bytes", zero.model_state_bytes, seed)
    assert result.ok, result.summary()


def test_formula_stub_fails():
    result = grade("model_state_bytes", stub)
    assert result.passed == 0 and "NotImplementedError" in result.messages[0]


def test_formula_with_optimizer_state_not_divided_at_stage_1_fails_with_hint():
    def whole(psi, stage, n, k=12, param_bytes=2, grad_bytes=2):
        if stage == 1:
            return (param_bytes + grad_bytes + k) * psi
        return zero.model_state_bytes(psi, stage, n, k, param_bytes, grad_bytes)
    result = grade("model_state_bytes", whole)
    assert not result.ok and "divides the optimizer state" in " ".join(result.messages)


# --- shard_flat ------------------------------------------------------------------------

def test_shard_flat_reference_passes():
    assert grade("shard_flat", zero.shard_flat).ok


def test_shard_flat_stub_fails():
    assert grade("shard_flat", stub).passed == 0


def uneven(flat, rank, world_size):                     # the last rank gets the remainder
    return torch.tensor_split(flat, world_size)[rank].clone()


def test_uneven_shards_fail_with_hint():
    result = grade("shard_flat", uneven)
    assert not result.ok and "same size" in " ".join(result.messages), result.summary()


def floor_shards(flat, rank, world_size):               # the ragged tail is dropped
    S = flat.numel() // world_size
    return flat[rank * S:(rank + 1) * S].clone()


def test_dropped_tail_fails():
    result = grade("shard_flat", floor_shards)
    assert not result.ok and "⌈numel/N⌉" in " ".join(result.messages)


# --- average_gradients -------------------------------------------------------------------

def test_average_gradients_reference_passes():
    result = grade("average_gradients", parallel.average_gradients)
    assert result.ok, result.summary()


def test_average_gradients_stub_fails():
    result = grade("average_gradients", stub)
    assert result.passed == 0 and "NotImplementedError" in result.messages[0], result.summary()


def summed_gradients(model):
    for p in model.parameters():
        dist.all_reduce(p.grad)


def test_summed_gradients_fail_with_hint():
    result = grade("average_gradients", summed_gradients)
    assert result.passed == 0 and "SUMMED" in result.messages[0], result.summary()


def raise_on_rank_1(model):
    if dist.get_rank() == 1:
        raise ValueError("shape mismatch in my all-reduce")
    parallel.average_gradients(model)


def test_a_raising_rank_is_reported_quickly_not_a_hang():
    import time
    t0 = time.monotonic()
    result = grade("average_gradients", raise_on_rank_1)
    assert result.passed == 0 and "rank 1: shape mismatch" in result.messages[0], result.summary()
    assert time.monotonic() - t0 < 30, "a raising rank must end the case at once"


# --- shard_model + gather_full_params ---------------------------------------------------

@pytest.mark.parametrize("seed", [0, 7])
def test_shard_model_reference_passes(seed):
    result = grade("shard_model", REF, seed)
    assert result.ok, result.summary()


def test_shard_model_stub_fails():
    result = grade("shard_model", (stub, stub))
    assert result.passed == 0 and "NotImplementedError" in result.messages[0], result.summary()


def test_summed_gradients_in_shard_model_fail_with_hint(monkeypatch):
    real_rs, real_ar = zero.reduce_scatter_flat, dist.all_reduce

    def rs_summed(out, inp):
        real_rs(out, inp)
        out.mul_(dist.get_world_size())                 # cancels the division: a sum

    def ar_summed(t, *a, **k):
        real_ar(t, *a, **k)
        t.mul_(dist.get_world_size())
    monkeypatch.setattr(zero, "reduce_scatter_flat", rs_summed)
    monkeypatch.setattr(zero.dist, "all_reduce", ar_summed)
    result = grade("shard_model", REF)
    assert result.passed == 0 and "SUMMED" in result.messages[0], result.summary()


def whole_optimizer(model, stage, optimizer_cls, **kw):      # every stage is plain DP
    return zero.shard_model(model, 0, optimizer_cls, **kw)


def test_optimizer_state_whole_on_every_rank_fails_with_hint():
    result = grade("shard_model", (whole_optimizer, zero.gather_full_params))
    assert result.passed == 0 and "optimizer state is whole" in result.messages[0], result.summary()


def test_params_not_freed_after_all_gather_fail_with_hint(monkeypatch):
    def keep(self):                                     # marks it free, keeps the memory
        self.gathered = False
    monkeypatch.setattr(zero._Unit, "free", keep)
    result = grade("shard_model", REF)
    assert result.passed == 0 and "stage 3" in result.messages[0] \
        and "full parameters stay allocated" in result.messages[0], result.summary()


def test_uneven_shards_in_shard_model_fail(monkeypatch):
    monkeypatch.setattr(zero.math, "ceil", math.floor)  # S = ⌊Ψ/N⌋: the tail has no owner
    result = grade("shard_model", REF)
    assert result.passed == 0, result.summary()


# --- bucketed_all_reduce (ZeRO-R's C_B) ---------------------------------------------------

def test_bucketed_all_reduce_reference_passes():
    result = grade("bucketed_all_reduce", zero.bucketed_all_reduce)
    assert result.ok, result.summary()


def test_bucketed_all_reduce_stub_fails():
    assert grade("bucketed_all_reduce", stub).passed == 0


def one_collective_per_tensor(tensors, buffer):
    for t in tensors:
        dist.all_reduce(t)
        t.div_(dist.get_world_size())


def test_no_bucketing_fails_with_hint():
    result = grade("bucketed_all_reduce", one_collective_per_tensor)
    assert result.passed == 0 and "buffer" in result.messages[0], result.summary()


def summed_buckets(tensors, buffer):
    zero.bucketed_all_reduce(tensors, buffer)
    for t in tensors:
        t.mul_(dist.get_world_size())


def test_summed_buckets_fail_with_hint():
    result = grade("bucketed_all_reduce", summed_buckets)
    assert result.passed == 0 and "SUM" in result.messages[0], result.summary()
