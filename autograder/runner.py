"""Run one submission's notebook in a sandbox slot, with a wall clock and a records channel.

The executor (``python -m autograder.execute``) is started in a new session inside the
sandbox's slot (``sandbox.Bubblewrap`` isolated and limited; ``sandbox.NoSandbox`` for
trusted notebooks only); on a time-out the whole session — nbclient, the kernel, anything
the student's code started — is killed, and the slot removes whatever is left. Layout of a
submission's result folder (the grader's; the run sees only ``run/`` and the channel)::

    channel/records.fifo     the one-way channel the checks write into (read-only mount)
    records/                 what arrived on it, stored by the grader (``autograder.records``)
    run/                     the run folder, a size-limited tmpfs that exists only during the run:
      work/<lab>.ipynb       the sanitised notebook (a copy; the trusted one stays outside)
      executed.ipynb         the notebook with its outputs, saved after every cell
      status.json            how the executor ended
      home/                  the submission's HOME (caches, IPython profile)
    executed.ipynb, status.json   copied out of run/ (untrusted content, size-capped)
    executor.log             the executor's and kernel's output, capped

Everything read back from the run is untrusted: ``read_untrusted`` refuses symlinks anywhere
under the run folder, non-regular files and oversized files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Execution:
    """How a run ended: ``ended`` is completed, kernel_died, timeout or executor_error."""
    ended: str
    seconds: float
    detail: str = ""
    usage: dict = dataclasses.field(default_factory=dict)  # the sandbox's cgroup accounting
    cause: str = ""  # why a kernel died: oom | pids | crash (see grade._ENDINGS)


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


MAX_LOG_BYTES = 1 * 2**20  # of the executor's (and kernel's) stdout/stderr kept in executor.log
MAX_EXECUTED_BYTES = 64 * 2**20


class _CappedLog(threading.Thread):
    """Drain a pipe into ``path``, keeping the first ``cap`` bytes; the rest is counted, dropped."""

    def __init__(self, pipe, path: str, cap: int = MAX_LOG_BYTES):
        super().__init__(name="executor-log", daemon=True)
        self.pipe, self.path, self.cap, self.dropped = pipe, path, cap, 0

    def run(self) -> None:
        kept = 0
        with open(self.path, "wb") as log:
            while chunk := self.pipe.read(65536):
                room = max(0, self.cap - kept)
                log.write(chunk[:room])
                kept += min(room, len(chunk))
                self.dropped += max(0, len(chunk) - room)
            if self.dropped:
                log.write(f"\n[{self.dropped:,} more bytes of output dropped]\n".encode())


def kernel_env(run_dir: str, threads: int) -> dict:
    """The environment of the executor and the kernel, defined once for every kind of run."""
    home = os.path.join(run_dir, "home")
    env = {
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "lib"), REPO]),
        "IPYTHONDIR": os.path.join(home, ".ipython"),  # no startup files from elsewhere
        "MPLCONFIGDIR": os.path.join(home, ".matplotlib"),
        "TRITON_CACHE_DIR": os.path.join(home, ".triton"),
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }
    for key in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "LLMOPT_CACHE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def execute_notebook(notebook: str, out_dir: str, lab: str, seed: int, sandbox, *,
                     timeout: float = 600, cell_timeout: int = 300, threads: int = 1) -> Execution:
    """Run ``notebook`` (trusted copy) in ``sandbox``; records and results land in ``out_dir``.

    ``out_dir`` (trusted, the grader's) gets ``records/`` (what the checks sent down the
    channel), ``executed.ipynb`` and ``status.json`` (copied out of the run, untrusted
    content) and ``executor.log`` (capped). The run folder ``out_dir/run`` exists only while
    the notebook runs.
    """
    from .records import ChannelReader, RecordStore

    run_dir = os.path.join(out_dir, "run")
    channel = os.path.join(out_dir, "channel")
    os.makedirs(channel, mode=0o755, exist_ok=True)
    os.chmod(channel, 0o755)
    reader = ChannelReader(os.path.join(channel, "records.fifo"),
                           RecordStore(os.path.join(out_dir, "records"))).start()
    usage: dict = {}
    status, returncode = None, None
    t0 = time.perf_counter()
    try:
        with sandbox.slot(run_dir, channel) as slot:
            work = os.path.join(run_dir, "work")
            os.makedirs(work)
            os.makedirs(os.path.join(run_dir, "home"))
            nb_run = os.path.join(work, os.path.basename(notebook))
            shutil.copy(notebook, nb_run)
            env = kernel_env(run_dir, threads)
            argv = [sys.executable, "-m", "autograder.execute", nb_run, run_dir, "--lab", lab,
                    "--seed", str(seed), "--cell-timeout", str(int(cell_timeout)),
                    "--records", os.path.join(channel, "records.fifo")]
            proc = slot.popen(argv, env, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
            log = _CappedLog(proc.stdout, os.path.join(out_dir, "executor.log"))
            log.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status = {"ended": "timeout", "detail": f"stopped after {timeout:.0f} s of wall-clock time"}
            finally:
                _kill_session(proc)  # anything the notebook left running in the session
                proc.wait()
                returncode = proc.returncode
            log.join(10)
            usage = slot.usage()
            usage["disk_full"] = disk_full(run_dir)
            for name, cap in (("executed.ipynb", MAX_EXECUTED_BYTES), ("status.json", 4096)):
                try:  # out of the tmpfs before it goes; read as untrusted
                    data = read_untrusted(run_dir, name, cap=cap)
                except (OSError, ValueError):
                    continue
                with open(os.path.join(out_dir, name), "wb") as f:
                    f.write(data)
    finally:
        reader.finish()
    seconds = time.perf_counter() - t0
    if status is not None:
        return Execution("timeout", seconds, status["detail"], usage)
    return _how_it_ended(out_dir, usage, returncode, seconds)


def disk_full(run_dir: str, slack: int = 2**20) -> bool:
    """Whether the run filled its size-limited run folder (observed from outside)."""
    try:
        st = os.statvfs(run_dir)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < slack


def _how_it_ended(out_dir: str, usage: dict, returncode, seconds: float) -> Execution:
    oom = usage.get("oom_kills", 0) > 0
    # Tasks refused by the pids cgroup: the submission exhausted them (the executor shares
    # the limit and then fails to start threads); its own doing, like running out of memory.
    forkbomb = ("the submission hit the sandbox's process limit (a fork bomb?) and the run "
                "broke down" if usage.get("pids_refused", 0) > 0 else "")
    try:
        status = json.loads(read_untrusted(out_dir, "status.json", cap=4096))
        ended = str(status.get("ended", "executor_error"))
        if ended not in ("completed", "kernel_died", "executor_error"):
            ended = "executor_error"
        detail = str(status.get("detail", ""))[:500]
        cause = ""
        if ended == "kernel_died":
            cause = "oom" if oom else "pids" if forkbomb else "crash"
        if ended == "executor_error" and forkbomb:
            ended, detail, cause = "kernel_died", f"{forkbomb} ({detail[:200]})", "pids"
        return Execution(ended, seconds, detail, usage, cause)
    except (OSError, ValueError, AttributeError):
        try:
            with open(os.path.join(out_dir, "executor.log"), "rb") as f:
                tail = f.read()[-800:].decode("utf-8", "replace")
        except OSError:
            tail = ""
        tail = "\n".join(line for line in tail.splitlines()  # ipykernel's standard warning
                          if "Kernel is running over TCP without encryption" not in line).strip()
        if oom:  # the submission used more memory than it may: its own doing
            return Execution("kernel_died", seconds, "killed: out of memory (over the sandbox's "
                             "limit)", usage, "oom")
        if usage.get("disk_full"):  # so did filling its disk; the records still arrived
            return Execution("kernel_died", seconds, "the notebook filled its disk space", usage, "disk")
        if forkbomb:
            return Execution("kernel_died", seconds, forkbomb, usage, "pids")
        # No status and no OOM: the executor itself was killed (by the host, or by the
        # submission signalling its parent). Never a silent zero: the grader reports an error.
        how = ("killed (by the host, or by the submission signalling it)"
               if returncode in (-9, 137, -15, 143) else "failed")
        return Execution("executor_error", seconds,
                         f"the executor {how} without writing a status (exit code "
                         f"{returncode}): {tail[-300:]}", usage)
