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
workdir = os.path.join(root, ".grading")  # gradebook, submissions, feedback, results
os.makedirs(workdir, exist_ok=True)  # sqlite cannot create the gradebook's folder itself
autograder.course.nbgrader_config(c, workdir=workdir)
# Autograde (formgrader button or `nbgrader autograde`) grades in the sandbox as root, through
# the hub's sudo helper: see hub_grading.py beside this file.
here = os.path.dirname(os.path.abspath(__file__))
if here not in sys.path:
    sys.path.append(here)
c.Autograde.autograde_preprocessors = [
    "hub_grading.SandboxedApplyVerdicts" if p == "autograder.nbgrader_plugins.ApplyVerdicts" else p
    for p in c.Autograde.autograde_preprocessors]
# Collect refuses inbound entries that are symlinks or belong to someone other than the
# student they name, and copies no symlink of a submission: see hub_collect.py.
c.ExchangeFactory.collect = "hub_collect.SafeExchangeCollect"
c.Exchange.root = os.environ.get("LLMOPT_HUB_EXCHANGE", "/srv/nbgrader/exchange")
# Fetched assignments and feedback go into the server's root folder (the hub says which).
c.Exchange.assignment_dir = os.environ.get("LLMOPT_NOTEBOOK_ROOT", ".")
