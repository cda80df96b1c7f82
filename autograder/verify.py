"""The trusted half of grading: judge what the kernel recorded.

Runs outside the student's kernel. For check ``X`` of lab ``L`` it draws the cases again
with ``autograder.cases.L.inputs_X(seed)`` (the kernel's inputs are never trusted), reads
the recorded outputs defensively (regular files only, no symlinks, size-capped,
safetensors only) and asks ``autograder.checks.L.verify_X(inputs, outputs)`` whether each
case is right. ``grade_functions`` runs recording and verification in one process: the
tests use it to show that every check passes on the reference and fails on broken code.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import tempfile

from .record import MAX_CASE_BYTES, record_check
from .runner import read_untrusted


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


def _load_outputs(results_dir: str, name: str, i: int):
    from safetensors.torch import load
    return load(read_untrusted(results_dir, name, f"{i}.safetensors", cap=MAX_CASE_BYTES + 2**20))


def verify_check(lab: str, name: str, seed: int, results_dir: str) -> CheckResult:
    """Judge the recording of check ``name`` in ``results_dir`` against the reference."""
    cases = importlib.import_module(f"autograder.cases.{lab}")
    checks = importlib.import_module(f"autograder.checks.{lab}")
    inputs = list(getattr(cases, f"inputs_{name}")(seed))
    verify = getattr(checks, f"verify_{name}")
    try:
        index = json.loads(read_untrusted(results_dir, f"{name}.json", cap=2**20))
        entries = {int(e["case"]): e for e in index["cases"]}
    except FileNotFoundError:
        return CheckResult(name, 0, len(inputs), ["not run: the cell that calls this check "
                                                  "was not reached (an error or a time-out "
                                                  "before it?)"])
    except (ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        return CheckResult(name, 0, len(inputs), [f"unreadable recording ({exc})"])
    passed, messages = 0, []
    for i, inp in enumerate(inputs):
        entry = entries.get(i)
        if entry is None:
            messages.append(f"case {i}: not recorded")
            continue
        if entry.get("error"):
            messages.append(f"case {i}: your code raised {str(entry['error'])[:500]}")
            continue
        try:
            out = _load_outputs(results_dir, name, i)
        except Exception as exc:  # a forged or truncated file: the case fails, nothing else
            messages.append(f"case {i}: unreadable output ({exc})")
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


def grade_functions(lab: str, functions: dict, seed: int = 0) -> dict[str, CheckResult]:
    """Record and verify ``{check_name: fn}`` in this process (for tests and instructors)."""
    results = {}
    with tempfile.TemporaryDirectory() as results_dir:
        for name, fn in functions.items():
            record_check(lab, name, fn, seed, results_dir)
            results[name] = verify_check(lab, name, seed, results_dir)
    return results
