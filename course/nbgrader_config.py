"""nbgrader configuration of the course (run `nbgrader ...` from this folder).

The settings themselves live in ``autograder/course.py`` so that the autograder's CLI and
an instructor's ``nbgrader`` agree: the course root is the repository, ``solutions/`` is the
source folder, ``labs/`` the release folder, and submissions, feedback and the gradebook go
to ``.grading/`` (override with ``AUTOGRADER_WORKDIR``). ``nbgrader autograde`` runs each
notebook through the autograder (record in the kernel, verify outside) instead of nbgrader's
own executor.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "lib")]

from autograder.course import DEFAULT_WORKDIR, nbgrader_config  # noqa: E402

c = get_config()  # noqa: F821 (provided by traitlets when nbgrader loads this file)
nbgrader_config(c, workdir=os.environ.get("AUTOGRADER_WORKDIR", DEFAULT_WORKDIR))
