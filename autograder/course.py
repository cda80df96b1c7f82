"""The nbgrader configuration of the course, in one place.

``course/nbgrader_config.py`` (what an instructor's ``nbgrader`` reads) and the
autograder's own CLI both call ``nbgrader_config``: the course root is the repository,
``solutions/`` is nbgrader's source folder and ``labs/`` its release folder; submissions,
autograded copies, feedback and the gradebook live in a grading folder (default
``.grading/`` at the root, ignored by git).
"""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COURSE_ID = "llm-optimization-labs"
DEFAULT_WORKDIR = os.path.join(REPO, ".grading")


# The llmopt modules each lab asks the student to rebuild: hidden from the sandbox.
MODULES_UNDER_STUDY = {
    "lab01_kv_cache": ["kv_cache"],
    "lab04_flash_attention": ["flash_attention"],
    "lab06_zero_fsdp": ["zero"],
    "lab07_gptq": ["gptq"],
}


# Labs whose notebooks read the course corpus (perplexity, calibration data): the grader
# builds it once and mounts it read-only into every sandbox.
NEEDS_CORPUS = {"lab07_gptq"}


def modules_under_study(lab: str) -> list[str]:
    """``llmopt`` modules a submission of ``lab`` must not see (its reference answers)."""
    if lab not in MODULES_UNDER_STUDY:
        raise KeyError(f"no entry for {lab!r} in autograder.course.MODULES_UNDER_STUDY: add the "
                       "llmopt modules the lab asks students to rebuild")
    return MODULES_UNDER_STUDY[lab]


def labs() -> list[str]:
    """Assignment ids that have a source notebook in ``solutions/``."""
    root = os.path.join(REPO, "solutions")
    return sorted(d for d in os.listdir(root)
                  if os.path.isfile(os.path.join(root, d, f"{d}.ipynb")))


def source_notebook(lab: str) -> str:
    path = os.path.join(REPO, "solutions", lab, f"{lab}.ipynb")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no lab {lab!r}: {path} does not exist (labs: {', '.join(labs())})")
    return path


def _venv_tools_on_path() -> None:
    """nbgrader runs ``alembic`` from PATH to create a gradebook: find the one beside Python."""
    import sys

    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def nbgrader_config(c=None, workdir: str = DEFAULT_WORKDIR, release_dir: str | None = None):
    """Fill a traitlets ``Config`` with the course's nbgrader settings and return it."""
    from traitlets.config import Config

    c = Config() if c is None else c
    _venv_tools_on_path()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)  # the gradebook's folder (sqlite cannot create it)
    c.CourseDirectory.root = REPO
    c.CourseDirectory.course_id = COURSE_ID
    c.CourseDirectory.source_directory = "solutions"
    c.CourseDirectory.release_directory = release_dir or "labs"
    c.CourseDirectory.submitted_directory = os.path.join(workdir, "submitted")
    c.CourseDirectory.autograded_directory = os.path.join(workdir, "autograded")
    c.CourseDirectory.feedback_directory = os.path.join(workdir, "feedback")
    c.CourseDirectory.db_url = f"sqlite:///{os.path.join(workdir, 'gradebook.db')}"
    c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "*.egg-info"]
    c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
    c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
    # A deleted grade cell comes back (scored by what the notebook does), not ungraded.
    c.OverwriteCells.add_missing_cells = True
    # Execution happens in the autograder's own runner (sandboxed, records outputs);
    # this step applies its verdicts to the grade cells instead of running the kernel.
    c.Autograde.autograde_preprocessors = [
        "autograder.nbgrader_plugins.ApplyVerdicts",
        "nbgrader.preprocessors.IgnorePattern",
        "nbconvert.preprocessors.ClearMetadataPreprocessor",
        "nbgrader.preprocessors.LimitOutput",
        "nbgrader.preprocessors.SaveAutoGrades",
        "nbgrader.preprocessors.AssignLatePenalties",
        "nbgrader.preprocessors.CheckCellMetadata",
    ]
    c.ApplyVerdicts.workdir = workdir
    # Feedback never shows hidden tests (nbgrader's default keeps them).
    c.GenerateFeedback.preprocessors = [
        "nbgrader.preprocessors.GetGrades",
        "nbgrader.preprocessors.ClearHiddenTests",
        "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
    ]
    c.Exchange.root = os.environ.get("NBGRADER_EXCHANGE", os.path.join(workdir, "exchange"))
    return c
