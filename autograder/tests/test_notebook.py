"""Reading and sanitising submitted notebooks (no kernel needed)."""
import copy
import json

import pytest

from autograder import course
from autograder.notebook import (NotGradable, SolutionLeak, cell_source, grade_cells, nbgrader_meta,
                                 read_notebook, sanitize)

LAB = "lab01_kv_cache"


@pytest.fixture(scope="module")
def source():
    with open(course.source_notebook(LAB)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def release():
    with open(course.release_notebook(LAB)) as f:
        return json.load(f)


def by_id(nb):
    return {nbgrader_meta(c).get("grade_id"): c for c in nb["cells"] if nbgrader_meta(c).get("grade_id")}


def test_invalid_json_is_not_gradable(tmp_path):
    p = tmp_path / "nb.ipynb"
    p.write_text('{"cells": [')
    with pytest.raises(NotGradable, match="not valid notebook JSON"):
        read_notebook(str(p))


@pytest.mark.parametrize("text,reason", [("[1, 2]", "not a notebook"),
                                         ('{"cells": [], "nbformat": 3}', "format 3"),
                                         ('{"cells": [42], "nbformat": 4}', "cell 0")])
def test_malformed_notebooks_are_not_gradable(tmp_path, text, reason):
    p = tmp_path / "nb.ipynb"
    p.write_text(text)
    with pytest.raises(NotGradable, match=reason):
        read_notebook(str(p))


def test_grade_cells_name_their_checks(source):
    cells = {c.grade_id: c for c in grade_cells(source)}
    assert cells["check_generate"].checks == ["generate"]
    assert sum(c.points for c in cells.values()) == 15


def test_edited_test_cell_is_restored(source, release):
    student = copy.deepcopy(source)
    by_id(student)["check_generate"]["source"] = "pass  # tests removed"
    out = sanitize(student, source, release)
    assert cell_source(by_id(out)["check_generate"]) == cell_source(by_id(source)["check_generate"])


def test_deleted_test_cell_comes_back_after_its_solution(source, release):
    student = copy.deepcopy(source)
    student["cells"] = [c for c in student["cells"] if nbgrader_meta(c).get("grade_id") != "check_KVCache"]
    out = sanitize(student, source, release)
    ids = [nbgrader_meta(c).get("grade_id") for c in out["cells"]]
    assert ids.index("check_KVCache") == ids.index("KVCache_impl") + 1


def test_student_answer_and_extra_cells_are_kept(source, release):
    student = copy.deepcopy(source)
    by_id(student)["KVCache_impl"]["source"] = "class KVCache: pass  # mine"
    student["cells"].insert(3, {"cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": []})
    out = sanitize(student, source, release)
    assert cell_source(by_id(out)["KVCache_impl"]) == "class KVCache: pass  # mine"
    assert any(cell_source(c) == "x = 1" for c in out["cells"])


def test_duplicate_and_forged_grade_ids_become_plain_cells(source, release):
    student = copy.deepcopy(source)
    forged = copy.deepcopy(by_id(student)["check_generate"])
    forged["source"] = "print('forged')"
    forged["metadata"]["nbgrader"]["points"] = 1000
    student["cells"].append(forged)
    out = sanitize(student, source, release)
    graded = [c for c in out["cells"] if nbgrader_meta(c).get("grade_id") == "check_generate"]
    assert len(graded) == 1 and cell_source(graded[0]) == cell_source(by_id(source)["check_generate"])
    assert graded[0]["metadata"]["nbgrader"]["points"] == 4
    assert any(cell_source(c) == "print('forged')" and not nbgrader_meta(c) for c in out["cells"])


def test_outputs_are_cleared_and_ids_unique(source, release):
    student = copy.deepcopy(source)
    student["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x"}]
    out = sanitize(student, source, release)
    assert all(c.get("outputs", []) == [] for c in out["cells"])
    assert len({c["id"] for c in out["cells"]}) == len(out["cells"])


def _answers(nb):
    return [c for c in nb["cells"] if nbgrader_meta(c).get("solution")]


def test_deleted_answers_come_back_as_the_release_stubs(source, release):
    student = copy.deepcopy(release)
    student["cells"] = [c for c in student["cells"] if not nbgrader_meta(c).get("solution")]
    out = sanitize(student, source, release)
    for cell in _answers(out):
        assert cell_source(cell) == cell_source(by_id(release)[nbgrader_meta(cell)["grade_id"]])
    text = "".join(cell_source(c) for c in out["cells"])
    assert "BEGIN SOLUTION" not in text and "self.v[layer" not in text  # no instructor code


def test_retyped_answers_come_back_as_stubs(source, release):
    student = copy.deepcopy(release)
    for cell in _answers(student):
        if cell["cell_type"] == "code":  # answer turned into markdown: not an answer any more
            cell["cell_type"] = "markdown"
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
    out = sanitize(student, source, release)
    code_answers = [c for c in _answers(out) if c["cell_type"] == "code"]
    assert code_answers and all("raise NotImplementedError()" in cell_source(c) for c in code_answers)
    assert "self.v[layer" not in "".join(cell_source(c) for c in out["cells"])


def test_a_stale_release_holding_solutions_is_a_grader_error(source, release):
    stale = copy.deepcopy(release)
    for cell in _answers(stale):  # as if labs/ had been built without stripping answers
        cell["source"] = cell_source(by_id(source)[nbgrader_meta(cell)["grade_id"]])
    student = copy.deepcopy(release)
    student["cells"] = [c for c in student["cells"] if not nbgrader_meta(c).get("solution")]
    with pytest.raises(SolutionLeak, match="make labs"):
        sanitize(student, source, stale)
