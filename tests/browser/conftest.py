"""Browser tests: Playwright driving Debian's Chromium against a real JupyterLab and a real hub.

    make test-browser        # installs Chromium (Debian) and playwright (pip), then runs these

Fixtures start their servers on free loopback ports and stop them (with everything they
started) at the end. Every step saves a screenshot under ``.artifacts/browser/`` (ignored by
git; CI keeps it as an artifact). Nothing here sleeps to wait: each step waits for an
explicit element with a generous timeout, so a slow machine makes the tests slower, not red.

Playwright never downloads a browser here: ``chromium.launch(executable_path=...)`` uses
Debian's ``/usr/bin/chromium`` (``$CHROMIUM`` overrides it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(REPO, ".artifacts", "browser")
HUB_PREFIX = os.environ.get("LLMOPT_HUB_PREFIX", "/opt/llmopt-hub")
HUB_PASSWORD = "llmopt-demo-tests"
# Chromium flags for a machine with no network but loopback (no background fetches, which the
# closed network refuses noisily) and no GPU; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--disable-extensions"]

# JupyterLab user settings for the tests: no news toast or update check, every cell kept in
# the page (no windowing), no autosave racing the test.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together so that none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_http(url: str, proc: subprocess.Popen, log_path: str, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or never does.

    (The hub's proxy answers 404 until the hub has added its route: that is not ready.)
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # refused, or an HTTP error status
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s:\n{tail(log_path)}")


def tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left of it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def write_lab_settings(settings_dir: str) -> None:
    for rel, value in LAB_SETTINGS.items():
        path = os.path.join(settings_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(value, f)


# --- the browser -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def artifacts() -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed in this venv: run `make browser-deps`")
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("Debian's chromium is not installed: run `make browser-deps` "
                    "(apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Page:
    """A Playwright page with a console-error log and numbered screenshots."""

    def __init__(self, context, prefix: str, artifacts: str):
        self.context = context
        self.page = context.new_page()
        self.page.set_default_timeout(60_000)
        self.prefix = prefix
        self.artifacts = artifacts
        self.errors: list[str] = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _on_console(self, msg) -> None:
        if msg.type == "error":
            self.errors.append(f"console.error: {msg.text} ({msg.location.get('url', '')})")

    def shot(self, name: str) -> str:
        path = os.path.join(self.artifacts, f"{self.prefix}-{name}.png")
        self.page.screenshot(path=path)
        return path


@pytest.fixture
def new_page(request, browser, artifacts):
    """``new_page(prefix)``: a fresh browser context (own cookies) and page."""
    contexts = []
    request.node._llmopt_pages = []

    def make(prefix: str) -> Page:
        ctx = browser.new_context(viewport={"width": 1440, "height": 900})
        contexts.append(ctx)
        page = Page(ctx, prefix, artifacts)
        request.node._llmopt_pages.append(page)
        return page

    yield make
    for ctx in contexts:
        ctx.close()


# --- a real JupyterLab on a copy of labs/ ---------------------------------------------------

@pytest.fixture(scope="module")
def jupyterlab():
    """JupyterLab from the project's venv, serving a scratch copy of ``labs/``.

    Yields ``(base_url, token, root)``. A copy, so that running the notebook never touches
    the committed release.
    """
    tmp = tempfile.mkdtemp(prefix="llmopt-lab-")
    root = os.path.join(tmp, "labs")
    shutil.copytree(os.path.join(REPO, "labs"), root,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    write_lab_settings(os.path.join(tmp, "settings"))
    port, token = free_port(), "llmopt-test-token"
    env = dict(os.environ)
    env.update({
        "JUPYTER_CONFIG_DIR": os.path.join(tmp, "config"),
        "JUPYTER_RUNTIME_DIR": os.path.join(tmp, "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": os.path.join(tmp, "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": os.path.join(tmp, "workspaces"),
        "IPYTHONDIR": os.path.join(tmp, "ipython"),
        "MPLCONFIGDIR": os.path.join(tmp, "mpl"),
        # One torch thread: on 2 busy cores, two OpenMP threads spin against each other and
        # the lab's model runs ~20x slower (measured: 586 vs 23 ms per forward).
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    })
    jupyter = os.path.join(os.path.dirname(sys.executable), "jupyter")
    argv = [jupyter, "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}", "--LabApp.check_for_updates_class="
            "jupyterlab.NeverCheckForUpdate"]
    if os.getuid() == 0:
        argv.append("--allow-root")
    log_path = os.path.join(tmp, "jupyterlab.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/api/status?token={token}", proc, log_path, timeout=120)
        yield base, token, root
    finally:
        stop(proc)
        log.close()
        if os.path.isdir(ARTIFACTS):
            shutil.copy(log_path, os.path.join(ARTIFACTS, "jupyterlab.log"))
        shutil.rmtree(tmp, ignore_errors=True)


# --- a real JupyterHub with nbgrader's exchange -----------------------------------------------

@pytest.fixture(scope="module")
def hub():
    """The course hub (course/hub/jupyterhub_config.py) on free loopback ports, as root.

    Each run gets its own state, exchange and per-user working folders under a scratch
    directory (``LLMOPT_HUB_USERDIR``), and the instructor a fresh copy of the course, so the
    tests never see an earlier run's submissions. Needs ``course/hub/setup.sh --users``.
    """
    if os.getuid() != 0:
        pytest.skip("the hub spawns servers as other Unix users: run as root")
    venv = os.path.join(HUB_PREFIX, "venv")
    chp = os.path.join(REPO, ".hub", "npm", "node_modules", ".bin", "configurable-http-proxy")
    for path, what in ((os.path.join(venv, "bin", "jupyterhub"), "the hub's venv"),
                       (chp, "configurable-http-proxy")):
        if not os.path.exists(path):
            pytest.fail(f"{what} is missing ({path}): run `make browser-deps` "
                        "(course/hub/setup.sh --users)")
    for user in ("instructor", "student1"):
        if subprocess.run(["id", "-u", user], capture_output=True).returncode != 0:
            pytest.fail(f"the demo user {user} does not exist: run course/hub/setup.sh --users")
    tmp = tempfile.mkdtemp(prefix="llmopt-hub-", dir="/tmp")
    os.chmod(tmp, 0o755)
    users = os.path.join(tmp, "users")
    exchange = os.path.join(tmp, "exchange")
    os.makedirs(users)
    os.makedirs(exchange)
    os.chmod(users, 0o755)
    os.chmod(exchange, 0o777)
    # As the hub's setup makes it: sticky (1777), the course's folders the instructor's.
    subprocess.run(["bash", os.path.join(REPO, "course", "hub", "make-exchange.sh"), exchange,
                    "instructor"], check=True)
    # Fresh per-user folders: the instructor's holds a copy of the course (the formgrader wants
    # the course root inside the server's root folder); everyone gets the test settings.
    for user in ("instructor", "student1"):
        d = os.path.join(users, user)
        write_lab_settings(os.path.join(d, ".settings"))
        subprocess.run(["chown", "-R", f"{user}:", d], check=True)
        os.chmod(d, 0o700)
    subprocess.run(["bash", os.path.join(REPO, "course", "hub", "copy-course.sh"),
                    os.path.join(users, "instructor", "llm-optimization-labs"), "instructor"], check=True)
    port, api_port, proxy_port = free_ports(3)
    env = dict(os.environ)
    env.update({
        "LLMOPT_HUB_PORT": str(port), "LLMOPT_HUB_API_PORT": str(api_port),
        "LLMOPT_HUB_PROXY_API_PORT": str(proxy_port), "LLMOPT_HUB_STATE": os.path.join(tmp, "state"),
        "LLMOPT_HUB_EXCHANGE": exchange, "LLMOPT_HUB_USERDIR": os.path.join(users, "{username}"),
        "LLMOPT_HUB_PASSWORD": HUB_PASSWORD, "LLMOPT_HUB_INSTRUCTORS": "instructor",
        "LLMOPT_HUB_STUDENTS": "student1",
    })
    env.pop("LLMOPT_COURSE_ROOT", None)
    log_path = os.path.join(tmp, "hub.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen([os.path.join(venv, "bin", "jupyterhub"), "-f",
                             os.path.join(REPO, "course", "hub", "jupyterhub_config.py")],
                            env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/hub/api/", proc, log_path, timeout=120)
        yield {"url": base, "password": HUB_PASSWORD, "tmp": tmp, "users": users,
               "exchange": exchange, "log": log_path}
    finally:
        stop(proc, grace=30)
        log.close()
        if os.path.isdir(ARTIFACTS):
            shutil.copy(log_path, os.path.join(ARTIFACTS, "hub.log"))
        shutil.rmtree(tmp, ignore_errors=True)


# --- a screenshot of every open page when a test fails -----------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for i, page in enumerate(getattr(item, "_llmopt_pages", [])):
            try:
                page.shot(f"FAILED-{i}")
            except Exception:  # the page may be gone already
                pass
