"""Unit tests of the grader's defences that need no kernel: forged metadata and cells,
sanitised feedback HTML, timestamps, grader faults, output caps, and the sandbox's refusal
to fall back to running untrusted code unsandboxed. (The end-to-end attacks are in
``test_attacks.py``.)"""
import datetime
import json
import os

import pytest

from autograder import course, grade, sandbox
from autograder.execute import capped_client
from autograder.nbgrader_plugins import safe_outputs
from autograder.notebook import NotGradable, grade_cells, nbgrader_meta, read_notebook, safe_markdown, sanitize
from autograder.release import sample_submission

LAB = "lab01_kv_cache"
RELEASE = os.path.join(course.REPO, "labs", LAB, f"{LAB}.ipynb")
with open(RELEASE) as _f:
    RELEASE_NB = json.load(_f)


@pytest.fixture(scope="module")
def source():
    with open(course.source_notebook(LAB)) as f:
        return json.load(f)


def src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_forged_points_grade_ids_and_duplicates_are_ignored(source):
    nb = sample_submission(LAB, RELEASE, solved=False)
    for c in nb["cells"]:
        c["id"] = "dup"
        if nbgrader_meta(c).get("grade"):
            nbgrader_meta(c)["points"] = 1000
    gid_cell = next(c for c in nb["cells"] if nbgrader_meta(c).get("grade_id") == "check_KVCache")
    gid_cell["source"] = "100.0"  # an edited test
    nb["cells"].insert(0, json.loads(json.dumps(gid_cell)))  # and a copy placed first
    nb["cells"].append({"cell_type": "code", "metadata": {"nbgrader": {"grade": True, "grade_id": "bonus",
                        "points": 99, "solution": False}}, "source": "99", "outputs": [], "execution_count": 1})
    out = sanitize(nb, source, RELEASE_NB)
    assert sorted((g.grade_id, g.points) for g in grade_cells(out)) == \
        sorted((g.grade_id, g.points) for g in grade_cells(source))
    ids = [c["id"] for c in out["cells"]]
    assert len(set(ids)) == len(ids)
    graded = [c for c in out["cells"] if nbgrader_meta(c).get("grade_id") == "check_KVCache"]
    assert len(graded) == 1 and "BEGIN HIDDEN TESTS" in src(graded[0])  # restored from the source
    assert not any(nbgrader_meta(c).get("grade_id") == "bonus" for c in out["cells"])
    assert all(not c.get("outputs") for c in out["cells"] if c["cell_type"] == "code")


def test_a_grade_cell_turned_into_markdown_comes_back(source):
    nb = sample_submission(LAB, RELEASE)
    cell = next(c for c in nb["cells"] if nbgrader_meta(c).get("grade_id") == "check_generate")
    cell["cell_type"] = "markdown"
    out = sanitize(nb, source, RELEASE_NB)
    code = [c for c in out["cells"] if nbgrader_meta(c).get("grade_id") == "check_generate"]
    assert len(code) == 1 and code[0]["cell_type"] == "code"


def test_student_markdown_and_raw_cells_lose_their_markup(source):
    nb = sample_submission(LAB, RELEASE)
    answer = next(c for c in nb["cells"] if nbgrader_meta(c).get("grade_id") == "q_phases")
    answer["source"] = "<script>alert(1)</script> see [x](javascript:alert(2)) and $a < b$, 3 < 4"
    answer["attachments"] = {"x.svg": {"image/svg+xml": "PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+"}}
    nb["cells"].insert(1, {"cell_type": "raw", "metadata": {}, "source": "<img src=x onerror=alert(1)>"})
    out = sanitize(nb, source, RELEASE_NB)
    text = "\n".join(src(c) for c in out["cells"] if c["cell_type"] != "code"
                     and not nbgrader_meta(c).get("locked"))
    assert "<script" not in text and "<img" not in text and "javascript:" not in text
    assert "$a < b$" in text and "3 < 4" in text  # math and comparisons stay readable
    assert all("attachments" not in c for c in out["cells"] if not nbgrader_meta(c).get("locked"))
    # instructor (locked) cells keep their own markup
    locked = [src(c) for c in out["cells"] if nbgrader_meta(c).get("locked")]
    assert locked == [src(c) for c in source["cells"] if nbgrader_meta(c).get("locked")]


def test_safe_markdown():
    assert safe_markdown("<b>x</b> <!-- c --> a < b") == "&lt;b>x&lt;/b> &lt;!-- c --> a < b"
    assert "javascript:" not in safe_markdown("[a](JavaScript :alert(1))".replace(" ", ""))
    assert safe_markdown("plain **markdown** > quote") == "plain **markdown** > quote"


def test_feedback_outputs_keep_only_safe_types():
    outs = safe_outputs([
        {"output_type": "display_data", "data": {"text/html": "<script>x</script>", "text/plain": "ok"}},
        {"output_type": "display_data", "data": {"application/javascript": "alert(1)"}},
        {"output_type": "display_data", "data": {"image/svg+xml": "<svg onload=alert(1)>"}},
        {"output_type": "display_data", "data": {"image/png": 'AAAA" onerror="alert(1)'}},
        {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=\n"}},
        {"output_type": "stream", "name": "stdout", "text": "x" * 10**6},
        {"output_type": "weird"}, "not a dict",
    ])
    kinds = [o["output_type"] for o in outs]
    assert kinds == ["display_data", "display_data", "stream"]
    assert outs[0]["data"] == {"text/plain": "ok"}
    assert outs[1]["data"] == {"image/png": "iVBORw0KGgo=\n"}
    assert len(outs[2]["text"]) <= 20_000


def test_feedback_outputs_per_cell_are_bounded():
    many = [{"output_type": "stream", "name": "stdout", "text": "y" * 20_000}] * 500
    outs = safe_outputs(many)
    assert len(outs) <= 52 and sum(len(o.get("text", "")) for o in outs) < 300_000
    assert "left out" in outs[-1]["text"]


def test_executor_caps_outputs():
    class Fake:
        def __init__(self, *a, **k):
            pass

        def output(self, outs, msg, display_id, cell_index):
            from nbformat.v4 import new_output
            out = new_output("stream", name="stdout", text=msg["text"])
            outs.append(out)
            return out

    client = capped_client(Fake)(cell_cap=1000, notebook_cap=2500)
    outs = []
    for _ in range(50):
        client.output(outs, {"text": "z" * 300}, None, 0)
    assert sum(len(o["text"]) for o in outs) < 1500 and "truncated" in outs[-1]["text"]
    others = []
    for cell in (1, 2, 3):
        client.output(others, {"text": "z" * 900}, None, cell)
    kept = sum(o["text"].count("z") for o in outs + others)
    assert kept <= 2500 and "truncated" in others[-1]["text"]  # the notebook cap


@pytest.mark.parametrize("text, kept, note", [
    ("2026-11-20 10:00:00.000000 UTC", True, ""),
    ("2026-11-27 09:00:00 UTC", True, ""),
    ("2031-01-01 00:00:00.000000 UTC", False, "in the future"),
    ("yesterday, honest", False, "not a date"),
    ("2026-11-20 10:00:00 UTC" + " " * 300, False, "ignored"),
])
def test_timestamps(tmp_path, text, kept, note):
    (tmp_path / "timestamp.txt").write_text(text)
    now = datetime.datetime(2026, 11, 27, 12, tzinfo=datetime.timezone.utc)
    ts, msg = grade.read_timestamp(str(tmp_path / "x.ipynb"), now=now)
    assert bool(ts) == kept and note in msg


def test_symlinked_timestamp_and_missing_timestamp(tmp_path):
    (tmp_path / "real.txt").write_text("2026-11-20 10:00:00 UTC")
    os.symlink(tmp_path / "real.txt", tmp_path / "timestamp.txt")
    ts, msg = grade.read_timestamp(str(tmp_path / "x.ipynb"))
    assert ts == "" and "symlink" in msg
    os.remove(tmp_path / "timestamp.txt")
    assert grade.read_timestamp(str(tmp_path / "x.ipynb")) == ("", "")


def test_symlinked_and_special_notebooks_are_not_read(tmp_path):
    (tmp_path / "real.ipynb").write_text('{"cells": [], "nbformat": 4}')
    os.symlink(tmp_path / "real.ipynb", tmp_path / "link.ipynb")
    with pytest.raises(NotGradable, match="symbolic link"):
        read_notebook(str(tmp_path / "link.ipynb"))
    os.mkfifo(tmp_path / "fifo.ipynb")
    with pytest.raises(NotGradable, match="not a regular file"):
        read_notebook(str(tmp_path / "fifo.ipynb"))


def _folder(tmp_path, students):
    nb = sample_submission(LAB, RELEASE, solved=False)
    for s in students:
        d = tmp_path / "subs" / s / LAB
        d.mkdir(parents=True)
        (d / f"{LAB}.ipynb").write_text(json.dumps(nb))
    return str(tmp_path / "subs")


def test_a_dying_worker_is_a_retryable_error_never_a_zero(tmp_path, monkeypatch):
    def fake(lab, student, path, **kw):
        if student == "crash":
            raise SystemExit("worker died")  # not even an Exception
        if student == "fault":
            raise MemoryError("the grader ran out of memory")
        return grade.SubmissionResult(student, lab, "graded", 1, 12, "ok")

    monkeypatch.setattr(grade, "grade_submission", fake)
    results = grade.grade_folder(LAB, _folder(tmp_path, ["crash", "fault", "ok"]), str(tmp_path / "g.csv"),
                                 jobs=2, workdir=str(tmp_path / "w"), gradebook=False, sandboxed=False,
                                 progress=False)
    by = {r.student: r for r in results}
    for s in ("crash", "fault"):
        assert by[s].status == "error" and "retry" in by[s].message and by[s].score == 0
    assert by["ok"].status == "graded"
    rows = (tmp_path / "g.csv").read_text()
    assert "crash,lab01_kv_cache,0.0,0.0,error" in rows


def test_an_executor_fault_inside_grade_submission_is_an_error(tmp_path, monkeypatch):
    from autograder.runner import Execution

    monkeypatch.setattr(grade, "execute_notebook",
                        lambda *a, **k: Execution("executor_error", 1.0, "the executor was killed"))
    d = _folder(tmp_path, ["x"])
    r = grade.grade_submission(LAB, "x", os.path.join(d, "x", LAB, f"{LAB}.ipynb"),
                               workdir=str(tmp_path / "w"))
    assert r.status == "error" and "retry" in r.message and "killed" in r.message


def test_no_silent_fallback_to_running_unsandboxed(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "_AVAILABLE", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda tool: None)
    ran = []
    monkeypatch.setattr(grade, "grade_submission", lambda *a, **k: ran.append(a))
    with pytest.raises(sandbox.SandboxUnavailable, match="unsafe-no-sandbox"):
        grade.grade_folder(LAB, _folder(tmp_path, ["x"]), str(tmp_path / "g.csv"),
                           workdir=str(tmp_path / "w"), gradebook=False, progress=False)
    assert not ran


def test_cli_refuses_without_a_sandbox(tmp_path, monkeypatch, capsys):
    from autograder.__main__ import main

    monkeypatch.setattr(sandbox, "_AVAILABLE", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda tool: None)
    rc = main(["grade", LAB, _folder(tmp_path, ["x"]), "--out", str(tmp_path / "g.csv"),
               "--workdir", str(tmp_path / "w"), "--quiet"])
    assert rc == 2 and "cannot grade untrusted notebooks safely" in capsys.readouterr().err


def test_two_graders_never_share_a_sandbox_uid(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root")
    try:
        a = sandbox.Bubblewrap(LAB, str(tmp_path), slots=2)
    except sandbox.SandboxUnavailable as exc:
        pytest.skip(str(exc))
    b = sandbox.Bubblewrap(LAB, str(tmp_path), slots=2)
    try:
        ua, ub = set(a._slots.queue), set(b._slots.queue)
        assert len(ua) == len(ub) == 2 and not ua & ub
    finally:
        a.close()
        b.close()


def test_verification_is_deterministic_under_a_thread_pool(tmp_path, source):
    """Pool threads verify at once; the reference must not depend on who else is verifying
    (the verifiers seed torch's global RNG; each now runs in a process of its own). The
    loadtest caught this once: a full solution scored 12 in one run and 10 in the next."""
    import concurrent.futures

    import llmopt.kv_cache as ref
    from autograder.verify import record_to_store

    fns = {"kv_cache_bytes": ref.kv_cache_bytes, "cached_attention": ref.cached_attention,
           "KVCache": ref.KVCache, "generate": ref.generate, "max_batch_size": ref.max_batch_size,
           "reservation_waste": ref.reservation_waste}
    seeds = [11, 12, 13]
    for seed in seeds:
        record_to_store(LAB, fns, seed, str(tmp_path / str(seed)))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        scores = list(pool.map(lambda s: grade._score(LAB, source, s, str(tmp_path / str(s)), None)[0],
                               seeds * 2))
    assert scores == [15.0] * len(scores)


def test_course_secret_is_created_once_under_concurrency(tmp_path, monkeypatch):
    """Two workers grading their first submissions at once must agree on the secret
    (seen in CI: the second failed with FileExistsError and its student got `error`)."""
    import concurrent.futures

    from autograder.grade import course_secret

    monkeypatch.delenv("AUTOGRADER_SECRET", raising=False)
    for attempt in range(5):
        workdir = tmp_path / f"w{attempt}"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            secrets = list(pool.map(lambda _: course_secret(str(workdir)), range(16)))
        assert len(set(secrets)) == 1 and len(secrets[0]) == 64
        assert sorted(p.name for p in workdir.iterdir()) == ["secret"]


def test_a_stored_result_is_used_only_for_its_own_notebook(tmp_path):
    """The result folder is the one hand-off to nbgrader's autograde: a result of another
    notebook (a resubmission, a forged file beside it) must not be applied."""
    a, b = tmp_path / "a.ipynb", tmp_path / "b.ipynb"
    a.write_text('{"cells": [], "nbformat": 4}')
    b.write_text('{"cells": [1], "nbformat": 4}')
    r = grade.SubmissionResult("s", LAB, "graded", 3, 15, "ok", submitted_sha256=grade._sha256(a))
    grade._save_result(r, str(tmp_path / "w"))
    assert grade.load_result(str(tmp_path / "w"), "s", LAB, str(b)) is None
    got = grade.load_result(str(tmp_path / "w"), "s", LAB, str(a))
    assert got.score == 3 and got.out_dir == os.path.join(str(tmp_path / "w"), "results", "s", LAB)
    assert grade.load_result(str(tmp_path / "w"), "nobody", LAB) is None


def test_the_gradebook_step_reads_the_result_and_never_grades_again(tmp_path, monkeypatch):
    """nbgrader's autograde (the gradebook write) must pick up the result folder; grading each
    submission a second time there doubled the time of a run (seen in a clean-clone make test)."""
    calls = []
    real = grade.grade_submission
    monkeypatch.setattr(grade, "grade_submission", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    results = grade.grade_folder(LAB, _folder(tmp_path, ["x"]), str(tmp_path / "g.csv"),
                                 workdir=str(tmp_path / "w"), sandboxed=False, progress=False)
    assert results[0].status == "graded" and calls == ["x"], (results[0].message, calls)
