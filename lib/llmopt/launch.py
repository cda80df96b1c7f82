"""Running ranks as real processes: ``launch`` and the flat collectives.

Support code for every distributed lab (no lesson answer lives here):

- ``launch(fn, world_size, *args, backend=None)`` runs ``fn(rank, world_size, *args)`` on
  ``world_size`` fresh processes joined by ``torch.distributed`` (gloo on the CPU, NCCL on
  GPUs) and returns each rank's result. It forks (so functions defined in a notebook cell
  work: nothing is pickled by reference), finds a free port, gives each CPU rank one
  thread, collects results through one pipe per rank (no POSIX semaphores, so it runs in
  the grading sandbox), and when a rank raises (or dies, or the time runs out) it kills
  the others and re-raises the error here, naming the rank — a collective that waits for
  a dead peer would otherwise hang forever. On GPUs (NCCL) it spawns instead when ``fn``
  is importable, since CUDA does not survive a fork. A rank killed by the kernel (the
  out-of-memory killer of a cgroup, say) is reported as a ``RankError`` with its signal.
- ``all_gather_flat(out, inp)`` / ``reduce_scatter_flat(out, inp)``: equal-sized flat
  shards in rank order (``all_gather_into_tensor`` / ``reduce_scatter_tensor``).
- ``release_freed_memory()``: make this process give freed large buffers back to the OS at
  once (glibc otherwise keeps some of them), so memory use follows what is alive.
"""
from __future__ import annotations

import multiprocessing as _mp
import os
import pickle
import queue as _queue
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


# ----------------------------------------------------------------------------- launch

def free_port() -> int:
    """A TCP port on localhost that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_cpu(obj):
    """Results travel as plain pickles: move tensors to the CPU and detach them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _worker(fn, rank, world_size, args, backend, port, results, timeout_s):
    import gc
    gc.freeze()   # what the fork inherited is not ours: gc (and live_storages) skip it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        else:  # 2 cores shared by N ranks: one thread each, or they thrash
            torch.set_num_threads(1)
            release_freed_memory()
        import datetime
        kw = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s + 60), **kw)
        out = fn(rank, world_size, *args)
        payload = pickle.dumps(_to_cpu(out))
        results.send((rank, "ok", payload))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        try:
            exc_type = pickle.dumps(type(exc))
        except Exception:  # a class pickle cannot name: fall back to RuntimeError
            exc_type = pickle.dumps(RuntimeError)
        results.send((rank, "error", (exc_type, str(exc), traceback.format_exc())))
        _after_error(timeout_s)
        return
    try:
        dist.barrier()  # leave together: a peer may still need us in a collective
        dist.destroy_process_group()
    except Exception:
        pass


class _Results:
    """The parent's end of the ranks' pipes, read like a queue."""

    def __init__(self, conns):
        self.conns = list(conns)

    def get(self, timeout):
        from multiprocessing.connection import wait
        for c in wait(self.conns, timeout):
            try:
                return c.recv()
            except (EOFError, OSError):         # that rank exited: stop watching its pipe
                self.conns.remove(c)
        raise _queue.Empty


def _rebuild(rank, payload):
    exc_type, msg, tb = payload
    try:
        exc = pickle.loads(exc_type)(f"rank {rank}: {msg}")
    except Exception:
        exc = RuntimeError(f"rank {rank}: {msg}")
    exc.add_note(f"traceback on rank {rank}:\n{tb}")
    return exc


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crash",
              "NCCL communicator was aborted", "Broken pipe")


def _root_cause(errors, results, procs, grace_s=0.5):
    """The first error is often a peer noticing a death: look a moment for the real one."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=0.05)
            if status == "error":
                errors.append((rank, payload))
        except _queue.Empty:
            pass
    own = [(r, p) for r, p in errors if not any(m in p[1] for m in _PEER_GONE)]
    if own:
        return _rebuild(*own[0])
    reported = {r for r, _ in errors}
    for r, p in enumerate(procs):
        if r not in reported and p.exitcode not in (None, 0):
            return RankError(f"rank {r} {_death(p.exitcode)} without reporting a "
                             "result (its peers then lost the connection)")
    return _rebuild(*errors[0])


def _after_error(timeout_s):
    """What a rank does after reporting its error: return at once (its peers' collectives
    then fail fast, and the parent kills them)."""


def _on_error(errors, results, procs, out, rank):
    """The parent's answer to a rank's error: find the root cause and raise it here."""
    raise _root_cause(errors, results, procs)


def _death(exitcode: int) -> str:
    """How a rank ended, in words: an exit code, or the signal that killed it."""
    if exitcode is not None and exitcode < 0:
        import signal
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = " (out of memory? the OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    return f"died with exit code {exitcode}"


class RankError(RuntimeError):
    """A rank died without saying why (killed, segfault, os._exit)."""


def _kill(procs):
    """SIGKILL what is still running (a rank stuck in a collective or in gloo's teardown
    may not answer SIGTERM), then reap every child."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join()


_warmed = False


def _warm_lazy_imports():
    """Build an optimizer once here: its first construction imports torch._dynamo (~3 s);
    forked ranks then inherit the import instead of each paying for it."""
    global _warmed
    if not _warmed:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        _warmed = True


def launch(fn, world_size: int, *args, backend: str | None = None,
           timeout: float = DEFAULT_TIMEOUT_S, start_method: str | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the results.

    ``backend``: "gloo" (default on a CPU) or "nccl" (default when CUDA has at least
    ``world_size`` devices). ``timeout`` (seconds) bounds the whole run. ``start_method``:
    "fork" (default: works for notebook-defined functions, as long as this process has
    not initialised CUDA) or "spawn" (``fn`` must be importable, e.g. defined in a script).
    When a rank raises, the other ranks are killed and the error is raised here with the
    same type, prefixed with the rank.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    if start_method is None:
        # CUDA does not survive a fork once the parent has touched the driver: spawn for
        # GPUs when fn can be imported by the children (a script or a module); fork
        # otherwise (a notebook cell), which is what gloo on a CPU always uses.
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        importable = getattr(fn, "__module__", "__main__") != "__main__" or main_file is not None
        gpu = backend == "nccl" or torch.cuda.is_initialized()
        start_method = "spawn" if gpu and importable else "fork"
    if start_method == "fork":
        _warm_lazy_imports()
    ctx = _mp.get_context(start_method)
    # one pipe per rank, not a Queue: a Queue needs POSIX semaphores (/dev/shm), which a
    # sandbox may not allow
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(fn, r, world_size, args, backend, port, pipes[r][1], timeout))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for _, w in pipes:
        w.close()                                   # the children hold the write ends
    results = _Results([r for r, _ in pipes])
    out, errors, deadline = {}, [], time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.05)
            except _queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"launch: ranks {sorted(set(range(world_size)) - set(out))} "
                                       f"did not finish within {timeout:g} s (a collective "
                                       "waiting for a rank that never joins it?)") from None
                for r, p in enumerate(procs):
                    if r not in out and p.exitcode not in (None, 0):
                        raise RankError(f"rank {r} {_death(p.exitcode)} without reporting a result")
                continue
            if status == "ok":
                out[rank] = pickle.loads(payload)
                continue
            errors.append((rank, payload))
            _on_error(errors, results, procs, out, rank)
    finally:
        _kill(procs)
        for r, _ in pipes:
            r.close()
    return [out[r] for r in range(world_size)]


# ------------------------------------------------------------------- collectives

def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
    """``out`` (N·S,) ← every rank's ``inp`` (S,) in rank order (all_gather_into_tensor).
    ``async_op=True`` returns the work handle: ``.wait()`` before reading ``out``."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, async_op=True) if async_op else fn(out, inp)


def reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
    """``out`` (S,) ← slice ``rank`` of the sum over ranks of ``inp`` (N·S,).
    ``async_op=True`` returns the work handle: ``.wait()`` before reading ``out``."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, async_op=True) if async_op else fn(out, inp)


def release_freed_memory(threshold: int = 1 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap (glibc's
    ``M_MMAP_THRESHOLD``; setting it also stops glibc from raising it on its own), so a
    freed buffer — a ZeRO-3 unit's weights after ``resize_(0)`` — goes back to the OS at
    once instead of staying in the heap. No effect where the C library is not glibc."""
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-3, int(threshold))        # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass
