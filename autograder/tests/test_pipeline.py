"""The real grading pipeline, end to end: notebooks run in kernels, checks are verified
outside, scores land in grades.csv and in nbgrader's gradebook.

For every lab: the full solution scores full marks and the untouched release scores zero.
For lab01 also: a broken notebook is ``not_gradable``, and submissions that exit, kill
their kernel or hang lose only what they did not reach, without disturbing the others.
"""
import csv
import filecmp
import json
import os

import pytest

from autograder import course
from autograder.grade import grade_folder
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


@pytest.fixture(scope="module", params=LABS)
def graded(request, tmp_path_factory):
    lab = request.param
    root = tmp_path_factory.mktemp(lab)
    subs = root / "submissions"
    solved = sample_submission(lab, release_path(lab))
    write(subs, "alice", lab, solved)
    write(subs, "bob", lab, sample_submission(lab, release_path(lab), solved=False))
    if lab == "lab01_kv_cache":
        write(subs, "dave", lab, '{"cells": [ {"cell_type": "code", "source": "x = ')  # truncated upload
        write(subs, "eve", lab, with_cell(solved, 0, "import sys\nsys.exit()"))
        first_check = next(i for i, c in enumerate(solved["cells"])
                           if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == "check_kv_cache_bytes")
        write(subs, "frank", lab, with_cell(solved, first_check + 1, "import os\nos._exit(1)"))
        write(subs, "gina", lab, with_cell(solved, first_check + 1, "while True:\n    pass"))
        # warnings and stderr inside a graded function, i.e. inside the grade cells
        noisy = "    import sys, warnings; warnings.warn('harmless'); print('noise', file=sys.stderr)\n"
        old = "    head_dim = config.d_model // config.n_head\n"
        write(subs, "hana", lab, sample_submission(lab, release_path(lab),
                                                   replace={"kv_cache_bytes_impl": (old, noisy + old)}))
    out_csv = root / "grades.csv"
    workdir = root / "grading"
    results = grade_folder(lab, str(subs), str(out_csv), jobs=2, workdir=str(workdir),
                           timeout=150, progress=False)
    with open(out_csv) as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    return lab, {r.student: r for r in results}, rows, workdir


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


def lab01(graded):
    lab, results, rows, _ = graded
    if lab != "lab01_kv_cache":
        pytest.skip("the fault-injection submissions are lab01's")
    return results


def test_invalid_json_is_not_gradable(graded):
    dave = lab01(graded)["dave"]
    assert dave.status == "not_gradable" and "JSON" in dave.message


def test_sys_exit_in_first_cell_does_not_stop_grading(graded):
    results = lab01(graded)
    assert results["eve"].status == "graded"
    assert results["alice"].score == results["alice"].max_score  # the others are untouched


def test_dead_kernel_keeps_the_checks_it_reached(graded):
    frank = lab01(graded)["frank"]
    assert frank.status == "graded" and "kernel died" in frank.message
    assert frank.cells["check_kv_cache_bytes"]["score"] == 2
    assert frank.cells["check_generate"]["score"] == 0 and frank.score == 2


def test_hanging_submission_times_out_and_keeps_what_it_reached(graded):
    gina = lab01(graded)["gina"]
    assert gina.status == "graded" and "stopped" in gina.message
    assert gina.score == 2


def test_warnings_on_stderr_cost_nothing(graded):
    hana = lab01(graded)["hana"]
    assert hana.status == "graded" and hana.score == hana.max_score, hana.message


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
