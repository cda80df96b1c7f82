"""The in-kernel half of grading: record what the student's functions return.

A hidden test cell calls ``check("kv_cache_bytes", kv_cache_bytes)``. While the
autograder runs the notebook (``AUTOGRADER_RECORDS`` names a FIFO), ``check`` draws the
check's cases from ``autograder.cases.<lab>.inputs_<name>(seed)``, calls the student's
function through ``run_<name>`` and sends each case's outputs as plain tensors (safetensors,
never pickle) down that one-way channel. The grader reads the other end outside the sandbox
and stores what arrives in a folder the kernel cannot reach, so a later cell cannot rewrite
a record (``autograder.records``). Nothing here decides a grade: the trusted verifier
(``autograder.verify``) judges the records outside the kernel.

One frame per case: a JSON header line, then ``nbytes`` of safetensors::

    {"check": "generate", "case": 0, "error": null, "seconds": 0.12, "nbytes": 4242}\\n<payload>

Outside the autograder ``check`` only says that the check will run at grading time.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import time
import traceback

import torch

MAX_CASE_BYTES = 64 * 2**20  # a recording bigger than this is refused, not sent
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")


def _to_tensors(out) -> dict[str, torch.Tensor]:
    """Turn what ``run_<name>`` returned into a flat dict of contiguous CPU tensors."""
    if not isinstance(out, dict):
        raise TypeError(f"run_* must return a dict of tensors, got {type(out).__name__}")
    tensors = {}
    for key, value in out.items():
        if isinstance(value, bool):
            value = torch.tensor(value)
        elif isinstance(value, (int, float)):
            value = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"output {key!r} is a {type(value).__name__}, expected a tensor")
        tensors[str(key)] = value.detach().to("cpu").contiguous().clone()
    return tensors


def _short_error(exc: BaseException) -> str:
    """The exception and the last frame of the student's code, no grader internals."""
    frames = traceback.extract_tb(exc.__traceback__)
    student = [f for f in frames if "autograder" not in f.filename]
    where = f" (line {student[-1].lineno}: {student[-1].line})" if student and student[-1].line else ""
    return f"{type(exc).__name__}: {exc}{where}"[:2000]


def frame(check: str, case: int, payload: bytes = b"", error: str | None = None,
          seconds: float = 0.0) -> bytes:
    """One record on the wire: a JSON header line and the safetensors payload."""
    header = {"check": check, "case": case, "error": error, "seconds": round(seconds, 4),
              "nbytes": len(payload)}
    return json.dumps(header).encode() + b"\n" + payload


def record_check(lab: str, name: str, fn, seed: int, write) -> list[dict]:
    """Run every case of check ``name`` on ``fn``; ``write(bytes)`` sends each case's frame."""
    from safetensors.torch import save

    if not NAME.match(name):
        raise ValueError(f"invalid check name {name!r}")
    cases = importlib.import_module(f"autograder.cases.{lab}")
    inputs_fn = getattr(cases, f"inputs_{name}")
    run_fn = getattr(cases, f"run_{name}")
    index = []
    for i, inp in enumerate(inputs_fn(seed)):
        error, payload = None, b""
        t0 = time.perf_counter()
        try:
            tensors = _to_tensors(run_fn(fn, inp))
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            if size > MAX_CASE_BYTES:
                raise ValueError(f"outputs of {size} bytes exceed the {MAX_CASE_BYTES}-byte cap")
            payload = save(tensors)
        except NotImplementedError:
            error = "not implemented yet (NotImplementedError)"
        except Exception as exc:  # the student's bug, recorded for feedback
            error = _short_error(exc)
        seconds = time.perf_counter() - t0
        write(frame(name, i, payload, error, seconds))
        index.append({"case": i, "error": error, "seconds": round(seconds, 4)})
    return index


def check(name: str, fn) -> None:
    """Record check ``name`` on the student's ``fn`` (hidden test cells call this)."""
    channel = os.environ.get("AUTOGRADER_RECORDS")
    if not channel:
        print(f"[check {name!r} runs when the notebook is graded]")
        return
    lab = os.environ["AUTOGRADER_LAB"]
    seed = int(os.environ["AUTOGRADER_SEED"])
    with open(channel, "wb", buffering=0) as sink:  # a FIFO: what is written is gone
        index = record_check(lab, name, fn, seed, sink.write)
    failed = sum(e["error"] is not None for e in index)
    print(f"[check {name!r}: recorded {len(index) - failed} of {len(index)} cases]")
