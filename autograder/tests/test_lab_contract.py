"""Every lab's declaration is complete and consistent (fast: no kernel, no sandbox).

A lab is its files: the source notebook, ``autograder/cases/<lab>.py`` and
``autograder/checks/<lab>.py``. These tests catch in seconds what would otherwise show only in
the minutes-long sandboxed pipeline: a ``check("X")`` without its three functions, a spec or
a method rule for a check that does not exist, points that do not add up.
"""
import importlib
import json

import pytest

from autograder import course
from autograder.notebook import grade_cells

LABS = course.labs()


def source(lab):
    with open(course.source_notebook(lab)) as f:
        return json.load(f)


@pytest.mark.parametrize("lab", LABS)
def test_every_check_resolves_to_its_functions(lab):
    cases = importlib.import_module(f"autograder.cases.{lab}")
    checks = course.lab_checks(lab)
    names = [n for gc in grade_cells(source(lab)) for n in gc.checks]
    assert names, f"{lab}: no grade cell calls check()"
    for name in names:
        for module, prefix in ((cases, "inputs_"), (cases, "run_"), (checks, "verify_")):
            assert callable(getattr(module, prefix + name, None)), \
                f"{lab}: check({name!r}) needs {module.__name__}.{prefix}{name}"
        assert list(cases.__dict__[f"inputs_{name}"](0)), f"{lab}: inputs_{name}(0) has no cases"


@pytest.mark.parametrize("lab", LABS)
def test_specs_and_method_rules_name_real_checks(lab):
    checks = course.lab_checks(lab)
    names = {n for gc in grade_cells(source(lab)) for n in gc.checks}
    for table in ("OUTPUTS", "METHOD"):
        unknown = set(getattr(checks, table, {})) - names
        assert not unknown, f"{lab}: {table} names checks no grade cell calls: {sorted(unknown)}"
    missing = names - set(getattr(checks, "OUTPUTS", {}))
    assert not missing, f"{lab}: OUTPUTS has no spec for {sorted(missing)}"


@pytest.mark.parametrize("lab", LABS)
def test_points_follow_the_course_template(lab):
    cells = grade_cells(source(lab))
    auto = sum(gc.points for gc in cells)
    assert len(cells) >= 5, f"{lab}: {len(cells)} graded checks; the template asks for at least five"
    for gc in cells:
        assert gc.points <= auto / 3 + 1e-9, \
            f"{lab}: {gc.grade_id} is worth {gc.points:g} of {auto:g} automatic points (over a third)"
    assert all(gc.checks for gc in cells), f"{lab}: a grade cell calls no check"


def test_a_lab_copied_under_a_new_id_releases_and_grades_to_full_marks(tmp_path):
    """A lab is its files: copy lab01's under a new id, edit nothing, and it works end to end
    (released by nbgrader, graded in the sandbox, full marks for its solution)."""
    import os
    import shutil

    from autograder.grade import grade_folder
    from autograder.release import release_labs, sample_submission

    src, new = "lab01_kv_cache", "lab99_kv_cache_copy"
    repo = course.REPO
    made = [os.path.join(repo, "solutions", new), os.path.join(repo, "labs", new),
            os.path.join(repo, "autograder", "cases", f"{new}.py"),
            os.path.join(repo, "autograder", "checks", f"{new}.py")]
    assert not any(os.path.exists(p) for p in made), "a stale copy is in the way"
    try:
        os.makedirs(made[0])
        shutil.copy(course.source_notebook(src), os.path.join(made[0], f"{new}.ipynb"))
        shutil.copy(os.path.join(repo, "autograder", "cases", f"{src}.py"), made[2])
        shutil.copy(os.path.join(repo, "autograder", "checks", f"{src}.py"), made[3])
        release_labs([new], workdir=str(tmp_path / "release-work"))
        nb = sample_submission(new, course.release_notebook(new))
        (tmp_path / "subs" / "alice" / new).mkdir(parents=True)
        (tmp_path / "subs" / "alice" / new / f"{new}.ipynb").write_text(json.dumps(nb))
        results = grade_folder(new, str(tmp_path / "subs"), str(tmp_path / "g.csv"), jobs=1,
                               workdir=str(tmp_path / "w"), timeout=300, progress=False)
        alice = results[0]
        assert alice.status == "graded" and alice.score == alice.max_score > 0, alice.message
    finally:
        for path in made:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
