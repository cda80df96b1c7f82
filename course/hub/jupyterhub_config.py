"""JupyterHub for one course of LLM Optimization Labs, with nbgrader's exchange.

    make hub            # course/hub/setup.sh --users, then jupyterhub -f this file (as root)

Who is who
  * ``instructors`` (hub group): nbgrader's formgrader (release, collect, autograde,
    feedback) on their own copy of the course; ``students`` (hub group): the Assignments tab
    (fetch, submit, fetch feedback) and nothing of the formgrader.  The role is chosen when a
    server starts: its ``JUPYTER_CONFIG_PATH`` is ``<prefix>/etc/instructor`` or
    ``<prefix>/etc/student`` (copied from ``course/hub/config/`` by the setup).
  * Python: the hub's venv holds no course package; ``PYTHONPATH`` gives students
    ``<prefix>/student/lib`` (llmopt's support modules and the published labs' references,
    ``check()``: course/hub/student_lib.py, published.txt) and instructors their course root.
  * Every user is a Unix account with a home of mode 700; ``LocalProcessSpawner`` starts each
    user's own ``jupyterhub-singleuser`` as that user, so nbgrader sees the real student name
    and nobody reads anybody else's home.
  * Log-in: JupyterHub's shared-password authenticator and an allow-list (a demo only).
    For a university, replace the authenticator block below (see course/hub/README.md):
    ``c.JupyterHub.authenticator_class = "generic-oauth"`` (package ``oauthenticator``) or
    ``"ldapauthenticator.LDAPAuthenticator"`` (package ``jupyterhub-ldapauthenticator``), and
    fill ``instructors``/``students`` from the university's groups.

Everything listens on 127.0.0.1.  Settings come from the environment (defaults in brackets):
  LLMOPT_HUB_PORT [8000]            the public port (the proxy); the hub's own API is +1 and
                                    the proxy's API +2 unless LLMOPT_HUB_API_PORT /
                                    LLMOPT_HUB_PROXY_API_PORT say otherwise
  LLMOPT_HUB_PREFIX [/opt/llmopt-hub]   the hub's venv (no course package in it), role
                                    configs, students' library (student/lib: students'
                                    PYTHONPATH) and the grader's course copy (setup.sh)
  LLMOPT_HUB_STATE [<repo>/.hub]    hub database, cookie secret, pid files
  LLMOPT_HUB_PROXY [<repo>/.hub/npm/node_modules/.bin/configurable-http-proxy]
  LLMOPT_HUB_EXCHANGE [/srv/nbgrader/exchange]   nbgrader's exchange (mode 1777, made by
                                    course/hub/make-exchange.sh)
  LLMOPT_HUB_INSTRUCTORS [instructor], LLMOPT_HUB_STUDENTS [student1,student2]
  LLMOPT_HUB_PASSWORD [llmopt-demo] the shared demo password (8 characters or more)
  LLMOPT_COURSE_ROOT [<the instructor's root folder>/llm-optimization-labs]  the course root
                                    (it must lie inside the server's root folder)
  LLMOPT_HUB_USERDIR [unset]        e.g. /tmp/run/{username}: start each server there instead
                                    of the home, with JupyterLab's settings and workspaces and
                                    Jupyter's data folder (nbgrader's cache) in
                                    it (the browser tests use it to start clean)
"""
import os
import pwd

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
env = os.environ.get

PREFIX = env("LLMOPT_HUB_PREFIX", "/opt/llmopt-hub")
VENV = os.path.join(PREFIX, "venv")
STUDENT_LIB = os.path.join(PREFIX, "student", "lib")  # what students may import (setup.sh)
STATE = env("LLMOPT_HUB_STATE", os.path.join(REPO, ".hub"))
PORT = int(env("LLMOPT_HUB_PORT", "8000"))
EXCHANGE = env("LLMOPT_HUB_EXCHANGE", "/srv/nbgrader/exchange")
INSTRUCTORS = [u for u in env("LLMOPT_HUB_INSTRUCTORS", "instructor").split(",") if u]
STUDENTS = [u for u in env("LLMOPT_HUB_STUDENTS", "student1,student2").split(",") if u]
os.makedirs(STATE, exist_ok=True)
os.chmod(STATE, 0o700)  # the hub's database (OAuth clients of users' servers) and secrets: root's

c = get_config()  # noqa: F821

# --- network: loopback only ------------------------------------------------------------------
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = PORT
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(env("LLMOPT_HUB_API_PORT", str(PORT + 1)))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{int(env('LLMOPT_HUB_PROXY_API_PORT', str(PORT + 2)))}"
c.ConfigurableHTTPProxy.command = [env("LLMOPT_HUB_PROXY", os.path.join(
    REPO, ".hub", "npm", "node_modules", ".bin", "configurable-http-proxy"))]
c.ConfigurableHTTPProxy.pid_file = os.path.join(STATE, "proxy.pid")
c.JupyterHub.db_url = "sqlite:///" + os.path.join(STATE, "jupyterhub.sqlite")
c.JupyterHub.cookie_secret_file = os.path.join(STATE, "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = os.path.join(STATE, "jupyterhub.pid")

# --- who may log in ---------------------------------------------------------------------------
# Demo: one shared password. University: see the module docstring and course/hub/README.md.
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = env("LLMOPT_HUB_PASSWORD", "llmopt-demo")
c.Authenticator.allowed_users = set(INSTRUCTORS + STUDENTS)
c.JupyterHub.load_groups = {
    "instructors": {"users": INSTRUCTORS},
    "students": {"users": STUDENTS},
}

# --- one server per user, as that Unix user ---------------------------------------------------
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [os.path.join(VENV, "bin", "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.Spawner.environment = {
    "PATH": os.path.join(VENV, "bin") + ":/usr/local/bin:/usr/bin:/bin",
    "LLMOPT_HUB_EXCHANGE": EXCHANGE,
    "OMP_NUM_THREADS": env("LLMOPT_HUB_THREADS", "1"),  # many kernels share the machine
}
c.JupyterHub.shutdown_on_logout = False


def pre_spawn_hook(spawner):
    """Choose the user's role (config folder) and, for the tests, a fresh working folder."""
    name = spawner.user.name
    groups = {g.name for g in spawner.user.groups}
    role = "instructor" if "instructors" in groups or name in INSTRUCTORS else "student"
    extra = {"JUPYTER_CONFIG_PATH": os.path.join(PREFIX, "etc", role)}
    pw = pwd.getpwnam(name)
    root = pw.pw_dir
    userdir = env("LLMOPT_HUB_USERDIR")
    if userdir:
        root = userdir.format(username=name)
        os.makedirs(root, exist_ok=True)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o700)
        spawner.notebook_dir = root
        extra["JUPYTERLAB_WORKSPACES_DIR"] = os.path.join(root, ".workspaces")
        extra["JUPYTERLAB_SETTINGS_DIR"] = os.path.join(root, ".settings")
        extra["JUPYTER_DATA_DIR"] = os.path.join(root, ".jupyter-data")  # nbgrader's cache too
    # nbgrader resolves its assignment folder (fetch, submit, feedback) against the server
    # process's working folder, which is the home: name the server's root folder instead.
    extra["LLMOPT_NOTEBOOK_ROOT"] = root
    # The hub's venv holds no course package (its reference modules would be everyone's):
    # each role gets its own llmopt on PYTHONPATH (servers, kernels and terminals inherit it).
    if role == "instructor":
        # The formgrader needs the course root inside the server's root folder; the
        # instructor's kernels use that copy of the course (references, checks and all).
        course_root = env("LLMOPT_COURSE_ROOT") or os.path.join(root, "llm-optimization-labs")
        extra["LLMOPT_COURSE_ROOT"] = course_root
        extra["PYTHONPATH"] = os.pathsep.join([os.path.join(course_root, "lib"), course_root])
    else:
        # Students: the support modules and the published labs' references only, and the
        # in-kernel half of the autograder (course/hub/student_lib.py, built by setup.sh).
        extra["PYTHONPATH"] = STUDENT_LIB
    spawner.environment = {**spawner.environment, **extra}


c.Spawner.pre_spawn_hook = pre_spawn_hook
