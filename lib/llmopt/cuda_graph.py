"""Capturing device work in a CUDA graph.

A CUDA graph records a sequence of kernel launches once and replays them as one launch, so
the host's work per kernel (Python, argument binding, driver calls) is paid at capture time
only. That is how a decode step stops waiting for Python
(``llmopt.kv_cache.generate(cuda_graph=True)``, ``llmopt.scheduler.EnginePasses``).

``capture(fn)`` calls ``fn`` once on a side stream first: first calls compile kernels,
allocate memory and create library handles, and none of that may happen inside a capture.
Then it records one call. ``fn`` must do device work only (no host sync, no value read
back), and every replay reads and writes the same tensors the capture saw.
"""
from __future__ import annotations

import torch


def capture(fn) -> torch.cuda.CUDAGraph:
    """``fn()`` recorded in a CUDA graph after one warm-up call; ``graph.replay()`` reruns it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
