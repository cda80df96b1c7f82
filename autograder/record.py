"""The in-kernel half of grading: record what the student's functions return.

A hidden test cell calls ``check("kv_cache_bytes", kv_cache_bytes)``. While the
autograder runs the notebook (``AUTOGRADER_RESULTS`` is set), ``check`` draws the
check's cases from ``autograder.cases.<lab>.inputs_<name>(seed)``, calls the student's
function through ``run_<name>`` and writes each case's outputs as plain tensors
(safetensors, never pickle) to ``$AUTOGRADER_RESULTS/<name>/<i>.safetensors``, with an
index ``<name>.json`` of errors and timings. Nothing here decides a grade: the trusted
verifier (``autograder.verify``) judges the recording outside the kernel.

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

MAX_CASE_BYTES = 64 * 2**20  # a recording bigger than this is refused, not written
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


def record_check(lab: str, name: str, fn, seed: int, results_dir: str) -> list[dict]:
    """Run every case of check ``name`` on ``fn`` and write the outputs under ``results_dir``."""
    from safetensors.torch import save_file

    if not _NAME.match(name):
        raise ValueError(f"invalid check name {name!r}")
    cases = importlib.import_module(f"autograder.cases.{lab}")
    inputs_fn = getattr(cases, f"inputs_{name}")
    run_fn = getattr(cases, f"run_{name}")
    case_dir = os.path.join(results_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    index = []
    for i, inp in enumerate(inputs_fn(seed)):
        entry = {"case": i, "error": None}
        t0 = time.perf_counter()
        try:
            tensors = _to_tensors(run_fn(fn, inp))
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            if size > MAX_CASE_BYTES:
                raise ValueError(f"outputs of {size} bytes exceed the {MAX_CASE_BYTES}-byte cap")
            save_file(tensors, os.path.join(case_dir, f"{i}.safetensors"))
        except NotImplementedError:
            entry["error"] = "not implemented yet (NotImplementedError)"
        except Exception as exc:  # the student's bug, recorded for feedback
            entry["error"] = _short_error(exc)
        entry["seconds"] = round(time.perf_counter() - t0, 4)
        index.append(entry)
    with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
        json.dump({"check": name, "cases": index}, f)
    return index


def check(name: str, fn) -> None:
    """Record check ``name`` on the student's ``fn`` (hidden test cells call this)."""
    results_dir = os.environ.get("AUTOGRADER_RESULTS")
    if not results_dir:
        print(f"[check {name!r} runs when the notebook is graded]")
        return
    lab = os.environ["AUTOGRADER_LAB"]
    seed = int(os.environ["AUTOGRADER_SEED"])
    index = record_check(lab, name, fn, seed, results_dir)
    failed = sum(e["error"] is not None for e in index)
    print(f"[check {name!r}: recorded {len(index) - failed} of {len(index)} cases]")
