"""The course's autograder: record in the kernel, decide outside it.

- ``check(name, fn)`` (``record.py``) runs in the student's kernel and records outputs.
- ``verify.py`` judges recordings against the ``llmopt`` references, outside the kernel.
- ``notebook.py`` reads and sanitises submitted notebooks; ``runner.py`` executes one
  in its own process group (the sandbox hooks in there); ``grade.py`` grades a folder of
  submissions in parallel and writes ``grades.csv`` and the nbgrader gradebook.
- ``python -m autograder grade LAB SUBMISSIONS --out grades.csv --jobs N`` is the CLI.
"""
from .record import check


def grade_functions(lab, functions, seed=0):
    """Record and verify ``{check_name: fn}`` in this process; see ``verify.grade_functions``."""
    from .verify import grade_functions as _grade
    return _grade(lab, functions, seed)


__all__ = ["check", "grade_functions"]
