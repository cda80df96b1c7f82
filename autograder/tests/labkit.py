"""What every lab's check tests share: grading one function, notebooks with a planted
shortcut, and the record specs against the reference (one copy, imported by each
``test_checks_<lab>.py``)."""
from __future__ import annotations

import json
import re

import torch

from autograder import course, grade_functions, static
from autograder.notebook import cell_source, nbgrader_meta
from autograder.record import _to_tensors

_KINDS = {"float": lambda t: t.is_floating_point(), "bool": lambda t: t.dtype == torch.bool,
          "int": lambda t: not t.is_floating_point() and t.dtype != torch.bool, "any": lambda t: True}


def stub(*args, **kwargs):
    """What the release hands the student."""
    raise NotImplementedError()


def grade(lab: str, name: str, fn, seed: int = 1):
    """The verdict of check ``name`` of ``lab`` on ``fn`` (record and verify in this process)."""
    return grade_functions(lab, {name: fn}, seed=seed)[name]


def solution_nb(lab: str) -> dict:
    with open(course.source_notebook(lab)) as f:
        return json.load(f)


def with_body(nb: dict, fn: str, body: str, extra_cell: str | None = None) -> dict:
    """``nb`` with the solution block of the answer cell defining ``fn`` replaced by ``body``
    (and ``extra_cell``, a student's own cell, inserted before it)."""
    for i, cell in enumerate(nb["cells"]):
        src = cell_source(cell)
        if nbgrader_meta(cell).get("solution") and re.search(rf"^(def|class) {fn}\b", src, re.M):
            pattern = rf"((?:def|class) {fn}\b.*?)[ \t]*### BEGIN SOLUTION.*?### END SOLUTION"
            cell["source"] = re.sub(pattern, lambda m: m.group(1) + body.strip("\n"), src,
                                    count=1, flags=re.S)
            if extra_cell:
                nb["cells"].insert(i, {"cell_type": "code", "metadata": {}, "source": extra_cell})
            return nb
    raise KeyError(fn)


def verdicts(lab: str, nb: dict) -> dict:
    """The lab's METHOD rules on ``nb``: {check: what is missing}."""
    return static.method_verdicts(lab, nb)


def assert_outputs_match_reference(lab: str, reference: dict, seed: int = 0) -> None:
    """What ``run_X`` records for the reference has exactly ``OUTPUTS[X]``'s keys, kinds, shapes."""
    import importlib

    cases = importlib.import_module(f"autograder.cases.{lab}")
    checks = course.lab_checks(lab)
    assert set(checks.OUTPUTS) == set(reference), (sorted(checks.OUTPUTS), sorted(reference))
    for name, fn in reference.items():
        for i, inp in enumerate(getattr(cases, f"inputs_{name}")(seed)):
            out = _to_tensors(getattr(cases, f"run_{name}")(fn, inp))
            spec = checks.OUTPUTS[name](inp)
            assert set(out) == set(spec), (name, i, sorted(out), sorted(spec))
            for key, (kind, shape) in spec.items():
                t = out[key]
                assert _KINDS[kind](t), (name, key, t.dtype)
                assert shape is None or (len(shape) == t.dim() and all(
                    s in (None, n) for s, n in zip(shape, t.shape))), (name, key, tuple(t.shape), shape)


def fails(lab: str, name: str, fn, hint: str, all_cases: bool = False, seed: int = 0):
    """Check ``name`` fails on ``fn`` and its messages name ``hint`` (in every case, or one)."""
    r = grade(lab, name, fn, seed)
    assert not r.ok, f"{name}: a broken variant passed"
    hit = [hint in m for m in r.messages if m]
    assert (all(hit) if all_cases else any(hit)), (hint, r.messages)
    return r
