"""nbgrader preprocessors that put the autograder's verdicts into the gradebook.

``ApplyVerdicts`` replaces nbgrader's ``Execute`` in ``nbgrader autograde``. It reads the
stored result of the very notebook being autograded from the grading folder
(``grade.load_result``: ``python -m autograder grade`` wrote it a moment ago); when there is
none, it grades the submission now (``grade``; the hub overrides it to run the sandbox
through its root helper). It then copies the executed outputs back cell by
cell where the source is unchanged, keeping only safe MIME types, and gives every
autograded cell exactly one stdout message and one numeric result — nothing on stderr —
which nbgrader's ``SaveAutoGrades`` turns into that cell's (partial) score.
"""
from __future__ import annotations

import os
import re

from nbformat.v4 import new_output
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Bool, Unicode

SAFE_MIME = ("text/plain", "image/png", "image/jpeg")
MAX_OUTPUT_CHARS = 20_000
MAX_CELL_CHARS = 200_000  # text kept per cell (images count by their base64 size)
MAX_CELL_OUTPUTS = 50
# Images are put into an <img src="data:...;base64,{{ data }}"> attribute unescaped by
# nbconvert's templates: anything but base64 could close the attribute and add a handler.
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]*")


def safe_outputs(outputs: list) -> list:
    """Student outputs reduced to streams, errors and plain text or images, size-capped."""
    kept, total = [], 0
    for out in outputs or []:
        if not isinstance(out, dict):
            continue
        if total > MAX_CELL_CHARS or len(kept) >= MAX_CELL_OUTPUTS:
            kept.append(new_output("stream", name="stdout", text="[more output left out]\n"))
            break
        kind = out.get("output_type")
        if kind == "stream" and out.get("name") in ("stdout", "stderr"):
            text = out.get("text", "")
            text = "".join(text) if isinstance(text, list) else str(text)
            kept.append(new_output("stream", name=out["name"], text=text[:MAX_OUTPUT_CHARS]))
        elif kind in ("display_data", "execute_result"):
            data = {k: v for k, v in (out.get("data") or {}).items() if k in SAFE_MIME}
            data = {k: ("".join(v) if isinstance(v, list) else str(v)) for k, v in data.items()}
            data = {k: v[:MAX_OUTPUT_CHARS] if k == "text/plain" else v for k, v in data.items()
                    if k == "text/plain" or (len(v) <= 4 * 2**20 and _BASE64.fullmatch(v))}
            if data:
                kept.append(new_output("display_data", data=data))
        elif kind == "error":
            tb = [str(line)[:2000] for line in (out.get("traceback") or [])][-20:]
            kept.append(new_output("error", ename=str(out.get("ename", ""))[:200],
                                   evalue=str(out.get("evalue", ""))[:2000], traceback=tb))
        else:
            continue
        last = kept[-1]
        total += sum(len(v) for v in (last.get("data") or {}).values()) + len(last.get("text", "")) \
            + sum(len(t) for t in last.get("traceback", []))
    return kept


class ApplyVerdicts(NbGraderPreprocessor):
    """Fill grade cells with the autograder's verdicts (replaces nbgrader's Execute)."""

    workdir = Unicode("", help="The autograder's grading folder.").tag(config=True)
    sandboxed = Bool(True, help="Run submissions in the bubblewrap sandbox (False: trusted "
                                "notebooks only).").tag(config=True)

    def grade(self, lab: str, student: str, path: str):
        """Grade the notebook at ``path`` now, into the grading folder."""
        from .grade import grade_submission
        from .sandbox import Bubblewrap, NoSandbox

        sandbox = Bubblewrap(lab, self.workdir) if self.sandboxed else NoSandbox()
        try:
            return grade_submission(lab, student, path, workdir=self.workdir, sandbox=sandbox)
        finally:
            sandbox.close()

    def preprocess(self, nb, resources):
        from .grade import load_result

        student = resources["nbgrader"]["student"]
        lab = resources["nbgrader"]["assignment"]
        name = f"{resources['nbgrader']['notebook']}.ipynb"
        path = os.path.join(resources["metadata"]["path"], name)  # nbgrader's own sanitised copy
        # the result belongs to the notebook as collected (python -m autograder grade put its
        # sanitised copy there) or to the very file being autograded (the hub helper grades it)
        handed_in = os.path.join(self.workdir, "submitted", student, lab, name)
        result = next((r for r in (load_result(self.workdir, student, lab, p)
                                   for p in (handed_in, path) if os.path.isfile(p)) if r), None)
        if result is None:
            result = self.grade(lab, student, path)
        if result.status != "graded":
            raise RuntimeError(f"{student}/{lab} could not be graded: {result.message}")
        executed = result.executed_cells()
        by_grade_id = result.cells
        for i, cell in enumerate(nb.cells):
            meta = cell.metadata.get("nbgrader", {})
            gid = meta.get("grade_id")
            if cell.cell_type != "code":
                continue
            if meta.get("grade") and not meta.get("solution") and gid in by_grade_id:
                verdict = by_grade_id[gid]
                cell.outputs = [
                    new_output("stream", name="stdout", text=verdict["message"] + "\n"),
                    new_output("execute_result", data={"text/plain": repr(float(verdict["score"]))},
                               execution_count=None),
                ]
            elif i < len(executed) and executed[i].get("source") == cell.source:
                cell.outputs = safe_outputs(executed[i].get("outputs"))
            else:
                cell.outputs = []
        return nb, resources
