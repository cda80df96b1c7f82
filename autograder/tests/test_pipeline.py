"""The real grading pipeline, end to end: notebooks run in kernels, checks are verified
outside, scores land in grades.csv and in nbgrader's gradebook.

For every lab: the full solution scores full marks and the untouched release scores zero;
a broken notebook is ``not_gradable``; a ``sys.exit`` does not stop the run; a kernel that
dies keeps the checks it reached; warnings and stderr inside a graded function cost nothing.
For lab01 also: a submission that hangs is stopped by the wall clock and keeps what it
reached (a hang costs the whole time-out, so it is tried once).
"""
import csv
import filecmp
import json
import os
import re

import pytest

from autograder import course
from autograder.grade import grade_folder
from autograder.notebook import cell_source, grade_cells, nbgrader_meta
from autograder.release import release_labs, sample_submission

LABS = course.labs()


def release_path(lab):
    return os.path.join(course.REPO, "labs", lab, f"{lab}.ipynb")


def write(folder, student, lab, nb):
    os.makedirs(folder / student / lab, exist_ok=True)
    path = folder / student / lab / f"{lab}.ipynb"
    if isinstance(nb, str):
        path.write_text(nb)
    else:
        path.write_text(json.dumps(nb))


def with_cell(nb, index, source):
    nb = json.loads(json.dumps(nb))
    nb["cells"].insert(index, {"cell_type": "code", "metadata": {}, "source": source,
                               "outputs": [], "execution_count": None, "id": f"extra{index}"})
    return nb


HEAVY = ("widget(", "time_ms(", "perplexity(")


def light(nb):
    """Without the measurement and widget cells (plain student cells): a cheaper run."""
    nb = json.loads(json.dumps(nb))
    nb["cells"] = [c for c in nb["cells"] if nbgrader_meta(c) or c["cell_type"] != "code"
                   or not any(k in cell_source(c) for k in HEAVY)]
    return nb


def first_check(lab, nb):
    """(index in ``nb`` of the lab's first grade cell, the function its hidden test records)."""
    with open(course.source_notebook(lab)) as f:
        for c in json.load(f)["cells"]:
            m = re.search(r"""check\(\s*["'](\w+)["']\s*,\s*(\w+)""", cell_source(c))
            if nbgrader_meta(c).get("grade") and m:
                gid, fn = nbgrader_meta(c)["grade_id"], m.group(2)
                break
    index = next(i for i, c in enumerate(nb["cells"]) if nbgrader_meta(c).get("grade_id") == gid)
    return index, fn


NOISY = """import sys, warnings
_quiet_{fn} = {fn}
def {fn}(*args, **kwargs):
    warnings.warn("harmless")
    print("noise", file=sys.stderr)
    return _quiet_{fn}(*args, **kwargs)
"""


_GRADED = {}  # lab -> its graded folder, once per run (the fixtures below share it)


@pytest.fixture(scope="module", params=LABS)
def graded(request, tmp_path_factory):
    return _graded(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def graded_lab01(tmp_path_factory):
    return _graded("lab01_kv_cache", tmp_path_factory)


def _graded(lab, tmp_path_factory):
    if lab in _GRADED:
        return _GRADED[lab]
    root = tmp_path_factory.mktemp(lab)
    subs = root / "submissions"
    solved = sample_submission(lab, release_path(lab))
    release = sample_submission(lab, release_path(lab), solved=False)
    write(subs, "alice", lab, solved)
    write(subs, "bob", lab, release)
    write(subs, "dave", lab, '{"cells": [ {"cell_type": "code", "source": "x = ')  # truncated upload
    write(subs, "eve", lab, with_cell(release, 0, "import sys\nsys.exit()"))
    first, fn = first_check(lab, solved)
    write(subs, "frank", lab, with_cell(light(solved), first_check(lab, light(solved))[0] + 1,
                                        "import os\nos._exit(1)"))
    noisy = with_cell(light(solved), first_check(lab, light(solved))[0], NOISY.format(fn=fn))
    i = first_check(lab, noisy)[0]
    noisy["cells"] = noisy["cells"][:i + 1]  # stderr inside a graded function; nothing after it
    write(subs, "hana", lab, noisy)
    if lab == "lab01_kv_cache":
        write(subs, "gina", lab, with_cell(solved, first + 1, "while True:\n    pass"))
    out_csv = root / "grades.csv"
    workdir = root / "grading"
    results = grade_folder(lab, str(subs), str(out_csv), jobs=2, workdir=str(workdir),
                           timeout=float(os.environ.get("AUTOGRADER_TEST_TIMEOUT", "150")),
                           progress=False)
    with open(out_csv) as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    _GRADED[lab] = lab, {r.student: r for r in results}, rows, workdir
    return _GRADED[lab]


def test_solution_scores_full_marks(graded):
    lab, results, rows, _ = graded
    alice = results["alice"]
    assert alice.status == "graded", alice.message
    assert alice.max_score > 0 and alice.score == alice.max_score, \
        "\n".join(c["message"] for c in alice.cells.values())
    assert rows["alice"]["status"] == "graded" and float(rows["alice"]["score"]) == alice.max_score


def test_release_scores_zero(graded):
    lab, results, rows, _ = graded
    bob = results["bob"]
    assert bob.status == "graded" and bob.score == 0 and bob.max_score == results["alice"].max_score
    assert "NotImplementedError" in " ".join(c["message"] for c in bob.cells.values())


def test_feedback_shows_no_hidden_source(graded):
    lab, results, _, _ = graded
    for r in results.values():
        for cell in r.cells.values():
            assert "BEGIN HIDDEN TESTS" not in cell["message"] and "check(" not in cell["message"]


def test_scores_land_in_the_gradebook(graded):
    from nbgrader.api import Gradebook

    lab, results, _, workdir = graded
    with Gradebook(f"sqlite:///{workdir}/gradebook.db", course.COURSE_ID) as gb:
        for student in ("alice", "bob"):
            sub = gb.find_submission(lab, student)
            auto = sum(g.auto_score or 0 for nb in sub.notebooks for g in nb.grades if g.cell.cell_type == "code")
            assert auto == pytest.approx(results[student].score), student


def test_csv_has_the_contract_columns(graded):
    _, _, rows, _ = graded
    assert list(next(iter(rows.values())).keys()) == ["student", "lab", "score", "max_score", "status", "message"]


def first_points(lab):
    with open(course.source_notebook(lab)) as f:
        return grade_cells(json.load(f))[0].points


def test_invalid_json_is_not_gradable(graded):
    dave = graded[1]["dave"]
    assert dave.status == "not_gradable" and "JSON" in dave.message


def test_sys_exit_in_first_cell_does_not_stop_grading(graded):
    lab, results, _, _ = graded
    eve = results["eve"]
    assert eve.status == "graded", eve.message
    assert all("not run" not in c["message"] for c in eve.cells.values()), eve.cells  # every check ran
    assert results["alice"].score == results["alice"].max_score  # the others are untouched


def test_dead_kernel_keeps_the_checks_it_reached(graded):
    lab, results, _, _ = graded
    frank = results["frank"]
    assert frank.status == "graded" and "kernel died" in frank.message, frank.message
    assert frank.score == first_points(lab), frank.cells


def test_warnings_on_stderr_cost_nothing(graded):
    lab, results, _, _ = graded
    hana = results["hana"]
    first = next(iter(hana.cells.values()))  # the grade cell whose function writes to stderr
    assert hana.status == "graded" and first["score"] == first["max"] == first_points(lab), first
    assert hana.score == first_points(lab)


def test_hanging_submission_times_out_and_keeps_what_it_reached(graded_lab01):
    """Tried once, on lab01: a hang costs the whole wall clock."""
    lab, results, _, _ = graded_lab01
    gina = results["gina"]
    assert gina.status == "graded" and "stopped" in gina.message
    assert gina.score == first_points(lab)


def test_feedback_html_has_no_hidden_tests(graded):
    from nbgrader.apps import NbGraderAPI

    lab, results, _, workdir = graded
    api = NbGraderAPI(config=course.nbgrader_config(workdir=str(workdir),
                                                    release_dir=str(workdir / "release")))
    out = api.generate_feedback(lab, "bob")
    assert out["success"], out.get("log")
    html = (workdir / "feedback" / "bob" / lab / f"{lab}.html").read_text()
    assert "NotImplementedError" in html  # the check messages are there
    assert "BEGIN HIDDEN TESTS" not in html and 'check("' not in html and "check(&quot;" not in html


def test_labs_are_what_make_labs_builds(tmp_path):
    release_labs(release_dir=str(tmp_path / "labs"), workdir=str(tmp_path / "grading"))
    for lab in LABS:
        cmp = filecmp.dircmp(tmp_path / "labs" / lab, os.path.join(course.REPO, "labs", lab))
        assert not (cmp.left_only or cmp.right_only or cmp.diff_files), \
            f"labs/{lab} is stale: run `make labs` and commit the result"
        assert filecmp.cmp(tmp_path / "labs" / lab / f"{lab}.ipynb", release_path(lab), shallow=False), \
            f"labs/{lab} is stale: run `make labs` and commit the result"
