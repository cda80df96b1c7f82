"""The trusted half of grading: judge what the kernel recorded.

Runs outside the student's kernel, in a process of its own with memory and time limits
(``verify_in_subprocess``), so that a hostile record costs its own submission the check and
nothing else. For check ``X`` of lab ``L`` it draws the cases again with
``autograder.cases.L.inputs_X(seed)`` (the kernel's inputs are never trusted), reads the
stored record of each case (``autograder.records``), checks the record's keys, dtypes and
shapes against what the check expects — from the safetensors header, before loading a byte
of data — and only then asks ``autograder.checks.L.verify_X(inputs, outputs)`` whether the
case is right. A check whose method the notebook's code lacks (``autograder.static``) scores
nothing, whatever its outputs.

What a check expects is ``checks.L.OUTPUTS[X](inp) -> {key: (kind, shape)}`` (kind "float",
"int", "bool" or "any"; None in a shape for a free dimension). A check without a declared
spec gets a generic bound: no more than ``GENERIC_FACTOR`` times the elements of its inputs.

``grade_functions`` runs recording and verification in one process: the tests use it to
show that every check passes on the reference and fails on broken code.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile

from .record import MAX_CASE_BYTES, record_check
from .records import FrameParser, RecordStore, read_index
from .runner import read_untrusted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERIC_FACTOR = 16
VERIFY_MEMORY_BYTES = 4 * 2**30  # address space of the verifying process
VERIFY_SECONDS = 600
_KINDS = {"float": ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"),
          "int": ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"),
          "bool": ("BOOL",)}


@dataclasses.dataclass
class CheckResult:
    """The verdict on one check: how many cases passed and what to tell the student."""
    name: str
    passed: int
    total: int
    messages: list[str]

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total

    def summary(self) -> str:
        head = f"{self.name}: {self.passed}/{self.total} cases passed"
        return "\n".join([head] + [f"  - {m}" for m in self.messages[:5]])


def tensor_header(data: bytes) -> dict[str, tuple[str, tuple]]:
    """{key: (dtype, shape)} from a safetensors file's header, without reading its data."""
    if len(data) < 8:
        raise ValueError("too short for safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, 2**20):
        raise ValueError("header length out of range")
    header = json.loads(data[8:8 + n])
    if not isinstance(header, dict):
        raise ValueError("header is not a mapping")
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or \
                not all(isinstance(s, int) and s >= 0 for s in info["shape"]):
            raise ValueError(f"bad entry {key[:40]!r}")
        out[key] = (str(info.get("dtype")), tuple(info["shape"]))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _input_numel(inp) -> int:
    import torch
    if isinstance(inp, torch.Tensor):
        return inp.numel()
    if isinstance(inp, dict):
        return sum(_input_numel(v) for v in inp.values())
    if isinstance(inp, (list, tuple)):
        return sum(_input_numel(v) for v in inp)
    return 1


def check_form(got: dict, spec: dict | None, inp) -> str | None:
    """Why the record's keys, dtypes or shapes are not what the check expects (or None)."""
    if spec is None:  # no declared spec: only a bound on the size
        limit = GENERIC_FACTOR * _input_numel(inp) + 2**16
        total = sum(_numel(shape) for _, shape in got.values())
        if len(got) > 64 or total > limit:
            return f"the outputs hold {total:,} values in {len(got)} tensors, far more than this check returns"
        return None
    missing, extra = sorted(set(spec) - set(got)), sorted(set(got) - set(spec))
    if missing:
        return f"missing output {missing[0]!r}"
    if extra:
        return f"unexpected output {extra[0][:40]!r}"
    for key, (kind, shape) in spec.items():
        dtype, got_shape = got[key]
        if kind != "any" and dtype not in _KINDS[kind]:
            return f"{key}: dtype {dtype}, expected a {kind} tensor"
        if shape is not None and (len(got_shape) != len(shape) or
                                  any(e is not None and e != g for e, g in zip(shape, got_shape))):
            want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
            return f"{key}: shape {tuple(got_shape)}, expected {want}"
    return None


def _lab_modules(lab: str):
    return (importlib.import_module(f"autograder.cases.{lab}"),
            importlib.import_module(f"autograder.checks.{lab}"))


def verify_check(lab: str, name: str, seed: int, store: str, method_gap: str | None = None) -> CheckResult:
    """Judge the stored records of check ``name`` against the reference."""
    from safetensors.torch import load

    cases, checks = _lab_modules(lab)
    inputs = list(getattr(cases, f"inputs_{name}")(seed))
    verify = getattr(checks, f"verify_{name}")
    specs = getattr(checks, "OUTPUTS", {})
    if method_gap:
        return CheckResult(name, 0, len(inputs), [method_gap])
    try:
        index = read_index(store, name)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return CheckResult(name, 0, len(inputs), [f"unreadable recording ({exc})"])
    if index is None:
        return CheckResult(name, 0, len(inputs), ["not run: the cell that calls this check "
                                                  "was not reached (an error or a time-out "
                                                  "before it?)"])
    passed, messages = 0, []
    for i, inp in enumerate(inputs):
        entry = index.get(i)
        if entry is None:
            messages.append(f"case {i}: not recorded")
            continue
        if entry.get("error"):
            messages.append(f"case {i}: your code raised {str(entry['error'])[:500]}")
            continue
        try:
            data = read_untrusted(store, name, f"{i}.safetensors", cap=MAX_CASE_BYTES + 2**20)
            problem = check_form(tensor_header(data), specs[name](inp) if name in specs else None, inp)
            if problem:
                messages.append(f"case {i}: {problem}")
                continue
            out = load(data)
        except Exception as exc:  # a forged or truncated file: the case fails, nothing else
            messages.append(f"case {i}: unreadable output ({str(exc)[:200]})")
            continue
        try:
            msg = verify(inp, out)
        except KeyError as exc:
            msg = f"missing output {exc}"
        except Exception as exc:  # outputs of an unexpected form (wrong dims, dtype, ...)
            msg = f"your output could not be compared ({type(exc).__name__}: {str(exc)[:300]})"
        if msg is None:
            passed += 1
        else:
            messages.append(f"case {i}: {msg}")
    return CheckResult(name, passed, len(inputs), messages)


def method_gaps(lab: str, notebook: str | None) -> dict[str, str]:
    """{check: what is missing} for checks whose method the notebook's code lacks."""
    if not notebook:
        return {}
    from . import static
    with open(notebook) as f:
        return static.method_verdicts(lab, json.load(f))


def verify_all(lab: str, names: list[str], seed: int, store: str, notebook: str | None = None) -> dict:
    gaps = method_gaps(lab, notebook)
    return {n: verify_check(lab, n, seed, store, gaps.get(n)) for n in names}


def _limit(memory_bytes: int, seconds: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def verify_in_subprocess(lab: str, names: list[str], seed: int, store: str,
                         notebook: str | None = None, *, threads: int = 1,
                         memory_bytes: int = VERIFY_MEMORY_BYTES,
                         timeout: float = VERIFY_SECONDS) -> tuple[dict[str, CheckResult], dict]:
    """``verify_all`` in a fresh, limited process; a record that breaks it fails only its checks.

    Returns the results and the process's accounting (peak RSS in bytes, seconds).
    """
    # -I: nothing from the current folder or the environment's PYTHONPATH (a root helper may
    # run in a folder the caller controls); the course's own paths, explicitly
    boot = (f"import sys; sys.path[:0] = [{REPO!r}, {os.path.join(REPO, 'lib')!r}]; "
            "from autograder.verify import main; sys.exit(main(sys.argv[1:]))")
    argv = [sys.executable, "-I", "-c", boot, lab, str(seed), store, json.dumps(names)]
    if notebook:
        argv += ["--notebook", notebook]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            stdin=subprocess.DEVNULL, preexec_fn=_limit(memory_bytes, int(timeout)))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    try:
        data = json.loads(out.decode().strip().splitlines()[-1])
        results = {n: CheckResult(**data["results"][n]) for n in names}
        return results, {"peak_bytes": data["peak_bytes"], "seconds": data["seconds"]}
    except (ValueError, KeyError, IndexError, TypeError):
        why = ("verification ran out of its time or memory" if proc.returncode in (-9, -24) else
               f"verification failed (exit {proc.returncode})")
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        note = f"{why}: your outputs could not be judged ({tail[0][-200:]})"
        return ({n: CheckResult(n, 0, 1, [note]) for n in names},
                {"peak_bytes": 0, "seconds": 0.0, "failed": note})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autograder.verify")
    ap.add_argument("lab")
    ap.add_argument("seed", type=int)
    ap.add_argument("store")
    ap.add_argument("names")
    ap.add_argument("--notebook")
    args = ap.parse_args(argv)
    import time

    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    results = verify_all(args.lab, json.loads(args.names), args.seed, args.store, args.notebook)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"results": {n: dataclasses.asdict(r) for n, r in results.items()},
                      "peak_bytes": peak, "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


def record_to_store(lab: str, functions: dict, seed: int, folder: str) -> RecordStore:
    """Record ``{check_name: fn}`` in this process, through the wire format, into ``folder``."""
    store = RecordStore(folder)
    parser = FrameParser(store)
    for name, fn in functions.items():
        wire = io.BytesIO()
        record_check(lab, name, fn, seed, wire.write)
        parser.feed(wire.getvalue())
    return store


def grade_functions(lab: str, functions: dict, seed: int = 0) -> dict[str, CheckResult]:
    """Record and verify ``{check_name: fn}`` in this process (for tests and instructors)."""
    with tempfile.TemporaryDirectory() as folder:
        record_to_store(lab, functions, seed, folder)
        return {name: verify_check(lab, name, seed, folder) for name in functions}


if __name__ == "__main__":
    sys.exit(main())
