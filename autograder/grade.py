"""Grade a folder of submissions: run, verify, score, write grades.csv and the gradebook.

    python -m autograder grade LAB SUBMISSIONS --out grades.csv --jobs N

SUBMISSIONS holds ``<student>/<LAB>/<notebook>.ipynb`` as nbgrader collects them. Each
submission is graded on its own (``grade_submission``): read (or ``not_gradable`` with a
reason), sanitised against the source notebook, executed by ``runner.execute_notebook``
with a per-submission seed, and its recorded checks verified outside the kernel. The
submissions run ``--jobs`` at a time; one that crashes, hangs or exits loses only the checks
it did not reach. Each result is saved in its result folder (``load_result`` reads it back: the one hand-off);
then, in one process, the verdicts are written to the nbgrader gradebook through
``nbgrader autograde`` (with ``ApplyVerdicts`` in place of its executor, reading the folder).
A fault of the grader itself gives status ``error`` (retry it), never a silent zero.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import shutil
import sys
import threading
import traceback
import warnings

from . import course
from .notebook import NotGradable, SolutionLeak, grade_cells, read_notebook, sanitize
from .runner import execute_notebook, read_untrusted
from .sandbox import NoSandbox
from .verify import verify_in_subprocess

CSV_COLUMNS = ["student", "lab", "score", "max_score", "status", "message"]


@dataclasses.dataclass
class SubmissionResult:
    student: str
    lab: str
    status: str  # graded | not_gradable | error
    score: float = 0.0
    max_score: float = 0.0
    message: str = ""
    cells: dict = dataclasses.field(default_factory=dict)  # grade_id -> score, max, message
    out_dir: str = ""
    timestamp: str = ""  # the submission's timestamp.txt, when it is plausible (see read_timestamp)
    seconds: float = 0.0  # wall-clock seconds of the sandboxed run
    peak_bytes: int = 0  # the sandbox cgroup's peak memory use
    verify_peak_bytes: int = 0  # the verifying process's peak memory use
    submitted_sha256: str = ""  # the notebook as handed in ...
    sanitized_sha256: str = ""  # ... and as the grader ran it: what a result belongs to

    def row(self) -> dict:
        return {"student": self.student, "lab": self.lab, "score": round(self.score, 2),
                "max_score": round(self.max_score, 2), "status": self.status,
                "message": self.message}

    def executed_cells(self) -> list[dict]:
        """The executed notebook's cells, read as untrusted data (empty if unreadable)."""
        try:
            nb = json.loads(read_untrusted(self.out_dir, "executed.ipynb", cap=64 * 2**20))
            cells = nb["cells"]
            return [c if isinstance(c, dict) else {} for c in cells]
        except (OSError, ValueError, KeyError, TypeError):
            return []


def course_secret(workdir: str) -> bytes:
    """The key behind every seed: ``$AUTOGRADER_SECRET`` or ``<workdir>/secret`` (created once)."""
    if os.environ.get("AUTOGRADER_SECRET"):
        return os.environ["AUTOGRADER_SECRET"].encode()
    path = os.path.join(workdir, "secret")
    if not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:  # atomic: whoever links first wins, everyone reads the same secret
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    with open(path) as f:
        return f.read().strip().encode()


def submission_seed(secret: bytes, student: str, lab: str) -> int:
    """Inputs differ per student and lab, are the same on a regrade, and cannot be guessed."""
    digest = hmac.new(secret, f"{student}/{lab}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _result_dir(workdir: str, student: str, lab: str) -> str:
    return os.path.join(workdir, "results", student, lab)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_result(workdir: str, student: str, lab: str, notebook: str | None = None) -> SubmissionResult | None:
    """The stored result of ``student``'s ``lab`` — the one hand-off between grading and the
    gradebook, nbgrader's autograde and the hub's helper — or None. With ``notebook``, only
    a result of that very notebook (as handed in, or as sanitised) counts."""
    folder = _result_dir(workdir, student, lab)
    try:
        data = json.loads(read_untrusted(folder, "result.json", cap=16 * 2**20))
        fields = {f.name for f in dataclasses.fields(SubmissionResult)}
        result = SubmissionResult(**{k: v for k, v in data.items() if k in fields})
    except (OSError, ValueError, TypeError):
        return None
    if notebook is not None and _sha256(notebook) not in (result.submitted_sha256, result.sanitized_sha256):
        return None
    result.out_dir = folder  # wherever it was graded (the hub grades in a private copy)
    return result


def _save_result(result: SubmissionResult, workdir: str) -> None:
    d = _result_dir(workdir, result.student, result.lab)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=1)


MAX_CLOCK_SKEW_S = 300


def read_timestamp(nb_path: str, now=None) -> tuple[str, str]:
    """(timestamp, note) from ``timestamp.txt`` beside the notebook, read as untrusted.

    nbgrader's late penalties read this file, and the student's own client writes it at
    submit time, so it can be forged. It is kept only if it is a regular file (no symlink),
    small, parses as a date, and is not in the future (beyond ``MAX_CLOCK_SKEW_S``); otherwise
    it is dropped and the note says why (the instructor can then use the collect time).
    """
    import datetime

    from nbgrader.utils import parse_utc

    folder = os.path.dirname(nb_path)
    try:
        raw = read_untrusted(folder, "timestamp.txt", cap=200)
    except FileNotFoundError:
        return "", ""
    except (OSError, ValueError) as exc:
        return "", f"timestamp.txt ignored ({exc})"
    text = raw.decode("utf-8", "replace").strip()
    try:
        when = parse_utc(text)
    except Exception:  # dateutil raises several kinds
        return "", f"timestamp.txt ignored (not a date: {text[:40]!r})"
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    if (when - now).total_seconds() > MAX_CLOCK_SKEW_S:
        return "", f"timestamp.txt ignored (in the future: {text[:40]})"
    return text, ""


def _score(lab: str, source_nb: dict, seed: int, records: str, notebook: str,
           threads: int = 1) -> tuple[float, float, dict, list, dict]:
    """Per grade cell: points × mean fraction of the cases of its checks that passed.

    Every check is judged in one verifying process of its own (memory and time limits).
    """
    cells_meta = grade_cells(source_nb)
    names = list(dict.fromkeys(n for gc in cells_meta for n in gc.checks))
    verdicts, usage = verify_in_subprocess(lab, names, seed, records, notebook, threads=threads)
    cells, failing = {}, []
    total = maximum = 0.0
    for gc in cells_meta:
        results = [verdicts[name] for name in gc.checks]
        fraction = sum(r.fraction for r in results) / len(results) if results else 0.0
        score = round(gc.points * fraction, 3)
        lines = [f"{gc.grade_id}: {score:g} / {gc.points:g} points"]
        lines += [r.summary() for r in results]
        if not results:
            lines.append("(this cell calls no check; it scores 0 — tell your instructor)")
        cells[gc.grade_id] = {"score": score, "max": gc.points, "message": "\n".join(lines)}
        failing += [r.name for r in results if not r.ok]
        total += score
        maximum += gc.points
    return total, maximum, cells, failing, usage


# What the notes say when a run ended early, by its typed cause (``runner.Execution.cause``).
_ENDINGS = {
    "oom": "the kernel ran out of memory (over the sandbox's limit)",
    "pids": "the notebook hit the sandbox's process limit (a fork bomb?)",
    "crash": "the kernel died (os._exit, a crash or out of memory?)",
    "disk": "the notebook filled its disk space (its outputs could not all be saved)",
}


def grade_submission(lab: str, student: str, nb_path: str, *, workdir: str = course.DEFAULT_WORKDIR,
                     timeout: float = 600, cell_timeout: int = 300, threads: int = 1,
                     sandbox=None) -> SubmissionResult:
    """Grade one notebook; never raises for anything the submission does.

    The result folder (``results/<student>/<lab>/``) is the grader's: the sanitised notebook
    (``<lab>.ipynb``), the stored records, what was copied out of the run, ``result.json``.
    The submission writes only into ``run/`` (a tmpfs gone after the run) and the channel.
    """
    out_dir = _result_dir(workdir, student, lab)
    try:
        try:
            student_nb = read_notebook(nb_path)
        except NotGradable as exc:
            return SubmissionResult(student, lab, "not_gradable", message=str(exc), out_dir=out_dir)
        timestamp, ts_note = read_timestamp(nb_path)
        submitted_sha = _sha256(nb_path)
        with open(course.source_notebook(lab)) as f:
            source_nb = json.load(f)
        with open(course.release_notebook(lab)) as f:
            release_nb = json.load(f)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        sanitized = os.path.join(out_dir, f"{lab}.ipynb")
        with open(sanitized, "w") as f:
            json.dump(sanitize(student_nb, source_nb, release_nb), f)
        seed = submission_seed(course_secret(workdir), student, lab)
        run = execute_notebook(sanitized, out_dir, lab, seed, sandbox or NoSandbox(),
                               timeout=timeout, cell_timeout=cell_timeout, threads=threads)
        if run.ended == "executor_error":  # the grader could not run it: retry, never a zero
            raise RuntimeError(f"the notebook could not be executed: {run.detail}")
        score, maximum, cells, failing, vusage = _score(lab, source_nb, seed,
                                                        os.path.join(out_dir, "records"), sanitized, threads)
        notes = {"completed": "",
                 "kernel_died": f"{_ENDINGS.get(run.cause, _ENDINGS['crash'])}; checks after that point were not run",
                 "timeout": f"stopped: {run.detail}; checks after that point were not run"}
        parts = [notes.get(run.ended, run.ended)]
        parts.append("all checks passed" if not failing else "failed: " + ", ".join(failing))
        parts.append(ts_note)
        result = SubmissionResult(student, lab, "graded", score, maximum,
                                  "; ".join(p for p in parts if p), cells, out_dir, timestamp,
                                  round(run.seconds, 2), int(run.usage.get("peak_bytes", 0)),
                                  int(vusage.get("peak_bytes", 0)), submitted_sha, _sha256(sanitized))
    except SolutionLeak as exc:  # never run or grade a notebook that holds the solutions
        result = SubmissionResult(student, lab, "error", message=f"grader error: {exc}", out_dir=out_dir)
    except Exception as exc:  # our fault, not the student's: retryable
        result = SubmissionResult(student, lab, "error",
                                  message=f"grader error (retry): {type(exc).__name__}: {exc}",
                                  out_dir=out_dir)
        traceback.print_exc(file=sys.stderr)
    _save_result(result, workdir)
    return result


def find_submissions(lab: str, folder: str) -> list[tuple[str, str | None, str]]:
    """(student, notebook path or None, note) for every ``<student>/<lab>/`` in ``folder``."""
    found = []
    for student in sorted(os.listdir(folder)):
        lab_dir = os.path.join(folder, student, lab)
        if not os.path.isdir(lab_dir):
            continue
        if os.path.islink(os.path.join(folder, student)) or os.path.islink(lab_dir):
            found.append((student, None, f"{student}/{lab}/ is a symbolic link; submit the folder itself"))
            continue
        notebooks = sorted(n for n in os.listdir(lab_dir) if n.endswith(".ipynb"))
        if f"{lab}.ipynb" in notebooks:
            found.append((student, os.path.join(lab_dir, f"{lab}.ipynb"), ""))
        elif len(notebooks) == 1:
            found.append((student, os.path.join(lab_dir, notebooks[0]),
                          f"graded {notebooks[0]} (expected {lab}.ipynb)"))
        elif not notebooks:
            found.append((student, None, f"no notebook in {student}/{lab}/; submit {lab}.ipynb"))
        else:
            found.append((student, None, f"{len(notebooks)} notebooks and none named {lab}.ipynb; "
                                         "submit exactly one"))
    return found


def write_gradebook(lab: str, results: list[SubmissionResult], workdir: str) -> dict[str, str]:
    """Put graded results into the nbgrader gradebook; returns {student: error} for failures."""
    from nbgrader.apps import NbGraderAPI

    config = course.nbgrader_config(workdir=workdir, release_dir=os.path.join(workdir, "release"))
    api = NbGraderAPI(config=config)
    setup = api.generate_assignment(lab, force=True, create=True)
    if not setup["success"]:
        if "there are submissions associated with it" in setup.get("log", ""):
            raise RuntimeError(f"the source of {lab} gained or lost cells after submissions were "
                               f"graded into {workdir}/gradebook.db; nbgrader protects those grades: "
                               "restore the source, or grade into a new --workdir")
        raise RuntimeError(f"nbgrader generate_assignment failed:\n{setup.get('log', '')[-3000:]}{setup.get('error') or ''}")
    errors = {}
    for r in results:
        if r.status != "graded":
            continue
        dest = os.path.join(workdir, "submitted", r.student, lab)
        os.makedirs(dest, exist_ok=True)
        sanitized = os.path.join(r.out_dir, f"{lab}.ipynb")
        shutil.copy(sanitized, os.path.join(dest, f"{lab}.ipynb"))
        if not r.sanitized_sha256:  # a result made elsewhere: it belongs to the notebook copied here
            r.sanitized_sha256 = _sha256(sanitized)
            _save_result(r, workdir)
        ts = os.path.join(dest, "timestamp.txt")
        if r.timestamp:  # checked by read_timestamp; nbgrader's late penalty uses it
            with open(ts, "w") as f:
                f.write(r.timestamp)
        elif os.path.lexists(ts):
            os.remove(ts)
        with warnings.catch_warnings():  # nbgrader's own SQLAlchemy session warnings
            warnings.simplefilter("ignore", category=Warning)
            out = api.autograde(lab, r.student, force=True, create=True)  # reads result.json
        if not out["success"]:
            errors[r.student] = (out.get("error") or out.get("log") or "")[-1500:]
    return errors


def grade_folder(lab: str, folder: str, out_csv: str, *, jobs: int = 1,
                 workdir: str = course.DEFAULT_WORKDIR, timeout: float = 600,
                 gradebook: bool = True, sandboxed: bool = True,
                 progress: bool = True) -> list[SubmissionResult]:
    """Grade every submission of ``lab`` in ``folder``; write ``out_csv``; return the results.

    ``sandboxed=False`` runs the notebooks with the grader's own rights: for trusted
    notebooks only. When the sandbox cannot run here, ``SandboxUnavailable`` says why.
    """

    course.source_notebook(lab)  # fail early on an unknown lab
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    course_secret(workdir)  # created once, before the workers race for it
    if sandboxed:
        from .sandbox import Bubblewrap
        sandbox = Bubblewrap(lab, workdir, slots=max(1, jobs))
    else:
        sandbox = NoSandbox()
    try:
        return _grade_folder(lab, folder, out_csv, jobs, workdir, timeout, gradebook, sandbox, progress)
    finally:
        sandbox.close()


def _grade_folder(lab, folder, out_csv, jobs, workdir, timeout, gradebook, sandbox, progress):
    from tqdm.auto import tqdm

    subs = find_submissions(lab, folder)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    results: dict[str, SubmissionResult] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {}
        for student, path, note in subs:
            if path is None:
                results[student] = SubmissionResult(student, lab, "not_gradable", message=note)
                continue
            fut = pool.submit(grade_submission, lab, student, path, workdir=workdir,
                              timeout=timeout, threads=threads, sandbox=sandbox)
            futures[fut] = (student, note)
        bar = tqdm(total=len(subs), desc=f"grading {lab}", unit="nb", disable=not progress,
                   initial=len(results))
        for fut in concurrent.futures.as_completed(futures):
            student, note = futures[fut]
            try:
                r = fut.result()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a worker fault (even SystemExit): retryable, never a zero
                r = SubmissionResult(student, lab, "error",
                                     message=f"grader error (retry): {type(exc).__name__}: {exc}")
            if note and r.status == "graded":
                r.message = f"{note}; {r.message}"
            results[student] = r
            bar.update(1)
        bar.close()
    ordered = [results[s] for s, _, _ in subs]
    if gradebook and any(r.status == "graded" for r in ordered):
        try:
            failed = write_gradebook(lab, ordered, workdir)
        except Exception as exc:
            failed = {r.student: str(exc) for r in ordered if r.status == "graded"}
        for r in ordered:
            if r.student in failed:
                r.status = "error"
                r.message = f"graded {r.score:g}/{r.max_score:g} but the gradebook write failed " \
                            f"(retry): {failed[r.student].strip().splitlines()[-1] if failed[r.student].strip() else ''}"
    tmp = out_csv + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in ordered:
            w.writerow(r.row())
    os.replace(tmp, out_csv)
    return ordered


def format_table(results: list[SubmissionResult]) -> str:
    """The gradebook as a plain-text table for the terminal."""
    rows = [["student", "score", "status", "message"]]
    for r in results:
        score = f"{r.score:g}/{r.max_score:g}" if r.status == "graded" else "-"
        rows.append([r.student, score, r.status, r.message[:90]])
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
