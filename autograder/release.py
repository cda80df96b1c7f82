"""Build the student release (``labs/``) from the source notebooks with nbgrader.

``make labs`` calls ``release_labs()``: nbgrader's ``generate_assignment`` strips the
solutions (leaving each signature, docstring and ``raise NotImplementedError()``) and the
hidden tests, and records the source cells in the gradebook. ``sample_submission`` builds
what a student would hand in — the release with answers filled in, optionally with a bug
planted — for the demo and the tests.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile

from . import course
from .notebook import cell_source, nbgrader_meta


def release_labs(labs: list[str] | None = None, release_dir: str | None = None,
                 workdir: str = course.DEFAULT_WORKDIR) -> list[str]:
    """Generate the release notebooks of ``labs`` (default: all) into ``release_dir``.

    The course gradebook is not touched: ``python -m autograder grade`` records the source
    cells there when it grades.
    """
    from nbgrader.apps import NbGraderAPI

    labs = labs or course.labs()
    release_dir = os.path.abspath(release_dir or os.path.join(course.REPO, "labs"))
    os.makedirs(workdir, exist_ok=True)
    # nbgrader writes <release>/<lab>/; generate into a scratch folder, then move into place
    # so that a failure never leaves a half-written labs/. The scratch gradebook keeps the
    # release independent of the course gradebook (which refuses changed cells once graded).
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        config = course.nbgrader_config(workdir=scratch, release_dir=os.path.join(scratch, "release"))
        api = NbGraderAPI(config=config)
        for lab in labs:
            out = api.generate_assignment(lab, force=True, create=True)
            if not out["success"]:
                raise RuntimeError(f"nbgrader generate_assignment {lab} failed:\n"
                                   f"{out.get('log', '')[-3000:]}{out.get('error') or ''}")
        for lab in labs:
            dest = os.path.join(release_dir, lab)
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            shutil.copytree(os.path.join(scratch, "release", lab), dest)
    return [os.path.join(release_dir, lab) for lab in labs]


_MARKER = re.compile(r"^\s*### (BEGIN|END) SOLUTION\s*$\n?", re.M)


def sample_submission(lab: str, release_nb: str, *, solved: bool = True,
                      replace: dict[str, tuple[str, str]] | None = None) -> dict:
    """A student's notebook: the release with the source's answers filled in.

    ``replace`` plants bugs: {grade_id: (old text, new text)} edits that solution cell.
    """
    with open(release_nb) as f:
        nb = json.load(f)
    if not solved:
        return nb
    with open(course.source_notebook(lab)) as f:
        source = json.load(f)
    answers = {nbgrader_meta(c)["grade_id"]: _MARKER.sub("", cell_source(c))
               for c in source["cells"] if nbgrader_meta(c).get("solution")}
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        gid = nbgrader_meta(cell).get("grade_id")
        if gid in answers and nbgrader_meta(cell).get("solution"):
            text = answers[gid]
            if replace and gid in replace:
                old, new = replace[gid]
                if old not in text:
                    raise ValueError(f"cannot plant the bug: {old!r} is not in cell {gid}")
                text = text.replace(old, new)
            cell["source"] = text
    return nb
