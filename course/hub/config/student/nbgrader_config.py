"""nbgrader for a student on the course hub (JUPYTER_CONFIG_PATH=<prefix>/etc/student)."""
import os
import sys

c = get_config()  # noqa: F821
c.CourseDirectory.course_id = "llm-optimization-labs"
c.Exchange.root = os.environ.get("LLMOPT_HUB_EXCHANGE", "/srv/nbgrader/exchange")
# Fetched assignments and feedback go into the server's root folder (the hub says which).
c.Exchange.assignment_dir = os.environ.get("LLMOPT_NOTEBOOK_ROOT", ".")
# Submissions stay writable by their student only (nbgrader makes them 0777): hub_submit.py.
here = os.path.dirname(os.path.abspath(__file__))
if here not in sys.path:
    sys.path.append(here)
c.ExchangeFactory.submit = "hub_submit.SafeExchangeSubmit"
