"""Run one submission's notebook in a process of its own, with a wall clock.

The executor (``python -m autograder.execute``) is started in a new session, so that on a
time-out the whole process group — nbclient, the kernel, anything the student's code
started — is killed. ``Sandbox`` decides how that command is wrapped: ``NoSandbox`` runs
it as it is (trusted notebooks only, e.g. the instructor's solution); the sandboxed
runner of ``sandbox.py`` wraps it in its own namespaces and limits. Everything that
comes back out — the executed notebook and the records — is then read defensively.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Execution:
    """How a run ended: ``ended`` is completed, kernel_died, timeout or executor_error."""
    ended: str
    seconds: float
    detail: str = ""
    out_dir: str = ""


class NoSandbox:
    """Run the executor as a plain child process (no isolation beyond a process group)."""
    name = "none"

    def wrap(self, argv: list[str], work_dir: str, out_dir: str) -> list[str]:
        return argv

    def env(self, base: dict) -> dict:
        return base


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute_notebook(nb_path: str, out_dir: str, lab: str, seed: int, *, timeout: float = 600,
                     cell_timeout: int = 300, threads: int = 1, sandbox=None) -> Execution:
    """Execute ``nb_path``; write ``executed.ipynb`` and ``records/`` under ``out_dir``."""
    sandbox = sandbox or NoSandbox()
    os.makedirs(out_dir, exist_ok=True)
    work_dir = os.path.dirname(os.path.abspath(nb_path))
    argv = [sys.executable, "-m", "autograder.execute", nb_path, out_dir, "--lab", lab,
            "--seed", str(seed), "--cell-timeout", str(int(cell_timeout))]
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "lib"), REPO]),
        "IPYTHONDIR": os.path.join(out_dir, ".ipython"),  # no startup files from elsewhere
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
    })
    for key in ("AUTOGRADER_RESULTS", "AUTOGRADER_SEED", "AUTOGRADER_LAB", "AUTOGRADER_SECRET"):
        env.pop(key, None)
    t0 = time.perf_counter()
    log_path = os.path.join(out_dir, "executor.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(sandbox.wrap(argv, work_dir, out_dir), cwd=work_dir,
                                env=sandbox.env(env), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            return Execution("timeout", time.perf_counter() - t0,
                             f"stopped after {timeout:.0f} s of wall-clock time", out_dir)
        finally:
            _kill_group(proc)  # anything the notebook left running in the group
    seconds = time.perf_counter() - t0
    try:
        with open(os.path.join(out_dir, "status.json")) as f:
            status = json.load(f)
        return Execution(str(status.get("ended", "executor_error")), seconds,
                         str(status.get("detail", ""))[:500], out_dir)
    except (OSError, ValueError):
        with open(log_path, "rb") as f:
            tail = f.read()[-800:].decode("utf-8", "replace")
        return Execution("executor_error", seconds,
                         f"the executor exited with code {proc.returncode}: {tail}", out_dir)
