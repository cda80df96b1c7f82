"""Timing, FLOP/byte arithmetic and result files for the course's benchmarks.

- ``time_ms(fn)`` returns the median time of ``fn()`` in milliseconds: CUDA events on a
  GPU (device work is asynchronous, so host clocks lie), ``perf_counter`` on the CPU,
  after warm-up calls that keep compilation and allocation out of the numbers.
- ``tflops(flops, ms)`` and ``gbps(nbytes, ms)`` turn counts into rates.
- ``write_results(name, rows, **meta)`` writes ``bench/results/<name>.json`` with the
  device's name, torch/triton versions and the rows, so every number in
  ``bench/README.md`` can be traced to a run on a named card.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch


def device_name(device=None) -> str:
    """The accelerator's name (e.g. 'NVIDIA H100 80GB HBM3'), or the CPU's."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def time_ms(fn, *, warmup: int = 3, rep: int = 20, device=None) -> float:
    """Median wall time of ``fn()`` in ms, timed with device events on a GPU."""
    on_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    for _ in range(warmup):
        fn()
    times = []
    if on_cuda:
        torch.cuda.synchronize()
        for _ in range(rep):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def results_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("LLMOPT_BENCH_DIR",
                          os.path.join(here, os.pardir, os.pardir, "bench", "results"))


def write_results(name: str, rows: list[dict], out_dir: str | None = None, **meta) -> str:
    """Write ``<out_dir>/<name>.json`` with the device, versions, ``meta`` and ``rows``."""
    out_dir = out_dir or results_dir()
    os.makedirs(out_dir, exist_ok=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    record = {
        "benchmark": name,
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        **meta,
        "rows": rows,
    }
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path
