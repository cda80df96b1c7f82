"""nbgrader for an instructor on the course hub (JUPYTER_CONFIG_PATH=<prefix>/etc/instructor).

The course root is the instructor's own copy of the course (``LLMOPT_COURSE_ROOT``, default
``~/llm-optimization-labs``, made by ``course/hub/copy-course.sh``): its ``autograder`` and
``lib`` come first on ``sys.path`` so that nbgrader, the formgrader and the autograder all use
that copy (sources, release folder, checks, gradebook in ``.grading/``).
"""
import os
import sys

c = get_config()  # noqa: F821
root = os.path.abspath(os.path.expanduser(os.environ.get("LLMOPT_COURSE_ROOT", "~/llm-optimization-labs")))
for p in (os.path.join(root, "lib"), root):
    if p not in sys.path:
        sys.path.insert(0, p)
import autograder.course  # noqa: E402

if os.path.abspath(autograder.course.REPO) != root:
    raise RuntimeError(f"autograder was imported from {autograder.course.REPO}, not from the course "
                       f"root {root}: start the server with the course root first on sys.path")
autograder.course.nbgrader_config(c, workdir=os.path.join(root, ".grading"))
c.Exchange.root = os.environ.get("LLMOPT_HUB_EXCHANGE", "/srv/nbgrader/exchange")
