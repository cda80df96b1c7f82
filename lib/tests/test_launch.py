"""llmopt.launch: ranks as real processes (gloo), errors and deaths reported, no hangs."""
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

import llmopt.launch as launch_mod
from llmopt.launch import RankError, all_gather_flat, launch, reduce_scatter_flat


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t, "threads": torch.get_num_threads()}


def test_launch_returns_each_rank_result_in_order():
    out = launch(_sum_ranks, 4)
    assert [o["rank"] for o in out] == [0, 1, 2, 3], "results must come back in rank order"
    assert all(o["sum"].item() == 10.0 for o in out), "all_reduce over 4 ranks must give 1+2+3+4"
    assert all(o["threads"] == 1 for o in out), "each CPU rank should run one thread"


def test_launch_runs_a_closure_like_a_notebook_cell():
    scale = 3.0                                   # a closure: cannot be pickled by reference

    def fn(rank, world_size, x):
        t = torch.tensor([x * scale])
        dist.all_reduce(t)
        return t.item()
    assert launch(fn, 2, 1.5) == [9.0, 9.0], "a function defined in a cell must run by fork"


def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("bad shard size")
    t = torch.zeros(1)
    dist.all_reduce(t)                           # rank 0 waits here for a peer that died
    return t


def test_a_raising_rank_ends_the_run_with_its_error_not_a_hang():
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="rank 1: bad shard size"):
        launch(_raise_on_rank1, 2, timeout=60)
    assert time.monotonic() - t0 < 20, "the other ranks must be killed at once, not waited for"


def test_broken_launch_that_keeps_waiting_is_caught_by_its_timeout(monkeypatch):
    """The course/mistakes.md variant: ranks left waiting. The check above must tell it apart."""
    def keep_waiting(errors, results, procs, out, rank):
        out[rank] = None                     # the broken parent: wait for the others

    monkeypatch.setattr(launch_mod, "_on_error", keep_waiting)
    monkeypatch.setattr(launch_mod, "_after_error", lambda timeout_s: time.sleep(timeout_s + 60))
    with pytest.raises(TimeoutError):
        launch(_raise_on_rank1, 2, timeout=4)


def _die(rank, world_size):
    if rank == 0:
        os._exit(3)
    dist.barrier()


def test_a_rank_that_dies_silently_is_reported():
    with pytest.raises(RankError, match="rank 0 died with exit code 3"):
        launch(_die, 2, timeout=60)


def _oom_killed(rank, world_size):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)    # what a cgroup's OOM killer does
    dist.barrier()


def test_a_rank_killed_by_sigkill_is_named_with_a_hint_of_memory():
    with pytest.raises(RankError, match="rank 1 was killed by SIGKILL .out of memory"):
        launch(_oom_killed, 2, timeout=60)


def _flat(rank, world_size):
    shard = torch.full((3,), float(rank))
    full = torch.empty(3 * world_size)
    all_gather_flat(full, shard)
    out = torch.empty(3)
    reduce_scatter_flat(out, torch.arange(3.0 * world_size))
    return full, out


def test_flat_collectives_move_equal_shards_in_rank_order():
    for r, (full, out) in enumerate(launch(_flat, 2)):
        torch.testing.assert_close(full, torch.tensor([0., 0, 0, 1, 1, 1]))
        torch.testing.assert_close(out, 2 * torch.arange(3.0 * r, 3.0 * r + 3))


def _rss_after_free(rank, world_size):
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    keep = [torch.ones(2 * 2**20) for _ in range(8)]      # 8 MiB each: below glibc's 32 MiB cap
    before = rss()
    for t in keep:
        t.untyped_storage().resize_(0)                   # what ZeRO-3 does after a unit
    return before - rss()


def test_ranks_give_freed_buffers_back_to_the_os():
    freed = launch(_rss_after_free, 1, start_method="spawn")[0]  # a fresh process: what the parent imported (allocators, arenas) must not decide
    assert freed > 48 * 2**20, f"only {freed / 2**20:.0f} MiB of 64 came back after resize_(0)"
