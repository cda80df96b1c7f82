"""Reading submitted notebooks without trusting them.

``read_notebook`` parses the JSON (no nbformat schema validation: it is slow and a
student's notebook must not crash the grader) and raises ``NotGradable`` with a reason a
student can act on. ``sanitize`` rebuilds the notebook the kernel will run: the student's
own cells and answers in their order, every graded and locked cell restored from the
instructor's source (so hidden tests are present and edited tests are undone), cells that
were deleted put back — an answer cell as the RELEASE's stub, never the source's solution
(and a restored cell that would still hold solution code raises ``SolutionLeak``: a grader
error, never graded). ``grade_cells`` lists the
source's autograded cells with their points and the checks their hidden tests call.
"""
from __future__ import annotations

import copy
import dataclasses
import html
import json
import os
import re
import stat

MAX_NOTEBOOK_BYTES = 32 * 2**20
_CHECK_CALL = re.compile(r"""\bcheck\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']""")


class NotGradable(Exception):
    """The submission cannot be read as the lab's notebook; the message says why."""


class SolutionLeak(RuntimeError):
    """Sanitising would put the instructor's solution into a submission (a grader fault)."""


def read_notebook(path: str) -> dict:
    """Parse a notebook file into a dict, or raise ``NotGradable`` saying what is wrong."""
    try:  # never follow a symlink (to another student's notebook, or a file of the grader's)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        reason = "it is a symbolic link; submit the notebook file itself" \
            if os.path.islink(path) else exc.strerror
        raise NotGradable(f"cannot open {os.path.basename(path)}: {reason}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotGradable(f"{os.path.basename(path)} is not a regular file")
        raw = f.read(MAX_NOTEBOOK_BYTES + 1)
    if len(raw) > MAX_NOTEBOOK_BYTES:
        raise NotGradable(f"the notebook is over {MAX_NOTEBOOK_BYTES // 2**20} MB; clear the "
                          "outputs (Edit > Clear Outputs of All Cells), save, and resubmit")
    try:
        nb = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotGradable(f"the file is not valid notebook JSON ({exc}); open it in "
                          "JupyterLab, or re-download the lab and copy your answers in") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise NotGradable("the file is JSON but not a notebook (no list of cells)")
    if nb.get("nbformat") != 4:
        raise NotGradable(f"notebook format {nb.get('nbformat')!r} is not supported; save it "
                          "with JupyterLab 4 (nbformat 4)")
    for i, cell in enumerate(nb["cells"]):
        if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
            raise NotGradable(f"cell {i} is not a valid notebook cell")
    return nb


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def nbgrader_meta(cell: dict) -> dict:
    meta = cell.get("metadata", {})
    meta = meta.get("nbgrader", {}) if isinstance(meta, dict) else {}
    return meta if isinstance(meta, dict) else {}


@dataclasses.dataclass
class GradeCell:
    grade_id: str
    points: float
    checks: list[str]


def grade_cells(source_nb: dict) -> list[GradeCell]:
    """The autograded cells of the instructor's source notebook, in order."""
    cells = []
    for cell in source_nb["cells"]:
        meta = nbgrader_meta(cell)
        if cell.get("cell_type") == "code" and meta.get("grade") and not meta.get("solution"):
            checks = _CHECK_CALL.findall(cell_source(cell))
            cells.append(GradeCell(meta["grade_id"], float(meta.get("points", 0)), checks))
    return cells


_TAG_START = re.compile(r"<(?=[A-Za-z!/?])")
_BAD_SCHEME = re.compile(r"(?i)\b(javascript|vbscript|data)(\s*):")


def safe_markdown(text: str) -> str:
    """Student markdown with raw HTML neutralised (rendered as text, not as markup).

    nbgrader's feedback and the formgrader render markdown with raw HTML passed through
    (``<script>``, ``<img onerror>``, ``<iframe>``...). Every ``<`` that starts a tag, a comment
    or a declaration becomes ``&lt;`` (so ``a < b`` and math stay as they are), and
    ``javascript:``, ``vbscript:`` and ``data:`` links lose their scheme.
    """
    return _BAD_SCHEME.sub(lambda m: f"{m.group(1)}-blocked{m.group(2)}:", _TAG_START.sub("&lt;", text))


def sanitize(student_nb: dict, source_nb: dict, release_nb: dict) -> dict:
    """The notebook to execute: the student's answers inside the instructor's frame.

    - a cell whose grade_id names a locked or autograded source cell is replaced by that
      source cell (edited tests are undone, hidden tests come back);
    - a cell whose grade_id names a source solution cell keeps the student's code with the
      source's metadata (a cell retyped to another cell type does not: it becomes an
      ordinary student cell and the answer counts as missing);
    - a duplicate or unknown grade_id makes the cell an ordinary student cell;
    - source cells missing from the submission are inserted after the nearest earlier
      source cell that is present (or at the end); a missing ANSWER cell comes back as the
      release's stub (``raise NotImplementedError()`` / "YOUR ANSWER HERE"), never as the
      source's solution, which would hand the student the answer and full marks.
    Outputs are cleared; the student's metadata and attachments are dropped; the student's
    markdown (answers and extra cells) goes through ``safe_markdown`` and raw cells are
    HTML-escaped (nbconvert renders raw cells without a MIME type as HTML).
    """
    src_cells = source_nb["cells"]
    src_by_id = {nbgrader_meta(c).get("grade_id"): (i, c) for i, c in enumerate(src_cells)
                 if nbgrader_meta(c).get("grade_id")}
    out: list[tuple[int | None, dict]] = []  # (source index or None, cell)
    seen = set()
    for cell in student_nb["cells"]:
        gid = nbgrader_meta(cell).get("grade_id")
        ctype = cell.get("cell_type")
        if gid in src_by_id and gid not in seen and src_cells[src_by_id[gid][0]]["cell_type"] == ctype:
            seen.add(gid)
            i, src = src_by_id[gid]
            smeta = nbgrader_meta(src)
            new = copy.deepcopy(src)
            if smeta.get("solution") and not smeta.get("locked"):
                new["source"] = cell_source(cell)  # the student's answer
                if ctype == "markdown":
                    new["source"] = safe_markdown(new["source"])
                new.pop("attachments", None)
            out.append((i, new))
        else:
            text = cell_source(cell)
            if ctype == "markdown":
                text = safe_markdown(text)
            elif ctype != "code":
                text = html.escape(text)
            new = {"cell_type": ctype if ctype in ("code", "markdown") else "raw",
                   "metadata": {}, "source": text}
            out.append((None, new))
    restored = []  # cells that come from the instructor's notebooks, not from the student
    release_by_id = {nbgrader_meta(c).get("grade_id"): c for c in release_nb["cells"]
                     if nbgrader_meta(c).get("grade_id")}
    for gid, (i, src) in sorted(src_by_id.items(), key=lambda kv: kv[1][0]):
        if gid in seen:
            continue
        if nbgrader_meta(src).get("solution"):
            if gid not in release_by_id:
                raise ValueError(f"the release has no cell {gid!r}: run `make labs`")
            stub = copy.deepcopy(release_by_id[gid])
            src = copy.deepcopy(src)
            src["source"] = cell_source(stub)
        # after the last present cell whose source index is below i
        pos = 0
        for j, (si, _) in enumerate(out):
            if si is not None and si < i:
                pos = j + 1
        out.insert(pos, (i, copy.deepcopy(src)))
        restored.append(src)
    leaks = [nbgrader_meta(c).get("grade_id") for c in restored if _holds_solution(c, source_nb)]
    if leaks:  # the safety net: never run or show the instructor's answer as the student's
        raise SolutionLeak(f"restoring {', '.join(map(str, leaks))} would put solution code into "
                           "the submission: the release (labs/) is stale or the source lacks "
                           "solution markers; run `make labs`")
    cells = []
    for n, (_, cell) in enumerate(out):
        cell = dict(cell)
        cell["id"] = f"cell-{n}"
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        else:
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
        cells.append(cell)
    return {"cells": cells, "metadata": copy.deepcopy(source_nb.get("metadata", {})),
            "nbformat": 4, "nbformat_minor": 5}


_SOLUTION = re.compile(r"^[ \t]*### BEGIN SOLUTION[ \t]*$(.*?)^[ \t]*### END SOLUTION[ \t]*$", re.M | re.S)
MIN_LEAK_CHARS = 40  # shorter solution fragments are too generic to call a leak


def _normal(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def solution_regions(source_nb: dict) -> list[str]:
    """The instructor's answers: code between the solution markers, written answers whole."""
    regions = []
    for cell in source_nb["cells"]:
        meta = nbgrader_meta(cell)
        if not meta.get("solution"):
            continue
        text = cell_source(cell)
        parts = _SOLUTION.findall(text) if cell.get("cell_type") == "code" else [text]
        regions += [_normal(p) for p in parts if len(_normal(p)) >= MIN_LEAK_CHARS]
    return regions


def _holds_solution(cell: dict, source_nb: dict) -> bool:
    """Whether ``cell`` contains one of the source's answers verbatim."""
    text = _normal(cell_source(cell))
    return any(r in text for r in solution_regions(source_nb))
