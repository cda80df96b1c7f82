"""Run one submission's notebook in a process session of its own, with a wall clock.

The executor (``python -m autograder.execute``) is started in a new session; on a time-out
the whole session — nbclient, the kernel, anything the student's code started — is killed.
``sandbox`` decides how the command is wrapped: ``None`` runs it as it is (trusted notebooks
only: an instructor's own solution), ``sandbox.Bubblewrap`` runs it isolated and limited.
Layout of a run folder (the only place a sandboxed run can write)::

    run/work/<lab>.ipynb     the sanitised notebook (a copy; the trusted one stays outside)
    run/records/             what the hidden checks recorded
    run/executed.ipynb       the notebook with its outputs, saved after every cell
    run/status.json          how the executor ended
    run/home/                the submission's HOME (caches, IPython profile)

Everything read back from it is untrusted: ``read_untrusted`` refuses symlinks anywhere
under the run folder, non-regular files and oversized files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
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
    usage: dict = dataclasses.field(default_factory=dict)  # the sandbox's cgroup accounting


def read_untrusted(base: str, *parts: str, cap: int) -> bytes:
    """Read ``base/parts...`` refusing symlinks in any component, non-files and > ``cap`` bytes."""
    path = base
    for i, part in enumerate(parts):
        if part in ("", ".", "..") or os.sep in part:
            raise ValueError(f"bad path component {part!r}")
        path = os.path.join(path, part)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise ValueError(f"{os.path.relpath(path, base)} is a symlink")
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{os.path.relpath(path, base)} is not a folder")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > cap:
            raise ValueError(f"{st.st_size} bytes, over the {cap}-byte cap")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(cap + 1)[:cap]
    finally:
        os.close(fd)


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute_notebook(nb_path: str, run_dir: str, log_path: str, lab: str, seed: int, *,
                     timeout: float = 600, cell_timeout: int = 300, threads: int = 1,
                     sandbox=None) -> Execution:
    """Execute ``nb_path`` (inside ``run_dir/work``); outputs go to ``run_dir``."""
    argv = [sys.executable, "-m", "autograder.execute", nb_path, run_dir, "--lab", lab,
            "--seed", str(seed), "--cell-timeout", str(int(cell_timeout))]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AUTOGRADER_", "JUPYTER", "JPY_"))}
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "lib"), REPO]),
        "IPYTHONDIR": os.path.join(run_dir, "home", ".ipython"),  # no startup files from elsewhere
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    })
    os.makedirs(os.path.join(run_dir, "home"), exist_ok=True)
    uid = sandbox.acquire() if sandbox is not None else None
    usage: dict = {}
    t0 = time.perf_counter()
    try:
        cmd = sandbox.command(argv, run_dir, uid, env) if sandbox is not None else argv
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=os.path.dirname(nb_path), env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_session(proc)
                proc.wait()
                return Execution("timeout", time.perf_counter() - t0,
                                 f"stopped after {timeout:.0f} s of wall-clock time")
            finally:
                _kill_session(proc)  # anything the notebook left running in the session
    finally:
        if sandbox is not None:
            usage = sandbox.usage(uid)
            sandbox.release(uid)
    seconds = time.perf_counter() - t0
    oom = usage.get("oom_kills", 0) > 0
    # Tasks refused by the pids cgroup: the submission exhausted them (the executor shares
    # the limit and then fails to start threads); its own doing, like running out of memory.
    forkbomb = ("the submission hit the sandbox's process limit (a fork bomb?) and the run "
                "broke down" if usage.get("pids_refused", 0) > 0 else "")
    try:
        status = json.loads(read_untrusted(run_dir, "status.json", cap=4096))
        ended = str(status.get("ended", "executor_error"))
        if ended not in ("completed", "kernel_died", "executor_error"):
            ended = "executor_error"
        detail = str(status.get("detail", ""))[:500]
        if ended == "kernel_died" and oom:
            detail = f"out of memory (over the sandbox's limit); {detail}"
        if ended == "executor_error" and forkbomb:
            ended, detail = "kernel_died", f"{forkbomb} ({detail[:200]})"
        return Execution(ended, seconds, detail, usage)
    except (OSError, ValueError, AttributeError):
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 800))
            tail = f.read().decode("utf-8", "replace")
        tail = "\n".join(line for line in tail.splitlines()  # ipykernel's standard warning
                          if "Kernel is running over TCP without encryption" not in line).strip()
        if oom:  # the submission used more memory than it may: its own doing
            return Execution("kernel_died", seconds, "killed: out of memory (over the sandbox's "
                             "limit)", usage)
        if forkbomb:
            return Execution("kernel_died", seconds, forkbomb, usage)
        # No status and no OOM: the executor itself was killed (by the host, or by the
        # submission signalling its parent). Never a silent zero: the grader reports an error.
        how = ("killed (by the host, or by the submission signalling it)"
               if proc.returncode in (-9, 137, -15, 143) else "failed")
        return Execution("executor_error", seconds,
                         f"the executor {how} without writing a status (exit code "
                         f"{proc.returncode}): {tail[-300:]}", usage)
