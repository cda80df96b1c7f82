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


# What each lab's sandbox shows of llmopt: the support modules its notebook imports (the
# module under study, and every other lab's reference, stay invisible). Declared next to the
# lab's checks as ``LLMOPT_VISIBLE``; the import closure of what is declared comes along.
# ``NEEDS_CORPUS = True`` there: the grader builds the course corpus once and mounts it.
LLMOPT = os.path.join(REPO, "lib", "llmopt")


def lab_checks(lab: str):
    """The lab's trusted checks module: everything the grader knows about the lab."""
    import importlib
    try:
        return importlib.import_module(f"autograder.checks.{lab}")
    except ModuleNotFoundError:
        raise KeyError(f"no autograder/checks/{lab}.py: a lab declares its checks there") from None


def _llmopt_imports(path: str, module: str) -> set[str]:
    """llmopt modules that ``path`` (module ``module``, dotted under llmopt) imports, anywhere."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read())
    package = module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name[len("llmopt."):] for a in node.names if a.name.startswith("llmopt.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("llmopt"):
                target = node.module[len("llmopt"):].lstrip(".")
            else:
                continue
            found.add(target) if target else None
            found |= {f"{target}.{a.name}".lstrip(".") for a in node.names}
    return {m for m in found if m and _module_file(m)}


def _module_file(module: str) -> str | None:
    path = os.path.join(LLMOPT, *module.split("."))
    if os.path.isfile(path + ".py"):
        return path + ".py"
    if os.path.isfile(os.path.join(path, "__init__.py")):
        return os.path.join(path, "__init__.py")
    return None


def visible_modules(lab: str) -> list[str]:
    """llmopt modules (dotted) the sandbox of ``lab`` shows: the declared ones and their imports."""
    declared = getattr(lab_checks(lab), "LLMOPT_VISIBLE", None)
    if declared is None:
        raise KeyError(f"autograder/checks/{lab}.py declares no LLMOPT_VISIBLE: list the llmopt "
                       "support modules its notebook imports (everything else is hidden)")
    todo, seen = list(declared), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        if _module_file(m) is None:
            raise KeyError(f"{lab} declares llmopt.{m} visible, but lib/llmopt has no such module")
        seen.add(m)
        todo += sorted(_llmopt_imports(_module_file(m), m) - seen)
    return sorted(seen)


def needs_corpus(lab: str) -> bool:
    return bool(getattr(lab_checks(lab), "NEEDS_CORPUS", False))


def labs() -> list[str]:
    """Assignment ids that have a source notebook in ``solutions/``."""
    root = os.path.join(REPO, "solutions")
    return sorted(d for d in os.listdir(root)
                  if os.path.isfile(os.path.join(root, d, f"{d}.ipynb")))


def release_notebook(lab: str) -> str:
    """The student release of ``lab`` (``labs/``), whose answer cells are the stubs."""
    path = os.path.join(REPO, "labs", lab, f"{lab}.ipynb")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run `make labs`")
    return path


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
