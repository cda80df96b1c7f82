"""A sandbox per submission: bubblewrap namespaces, an unprivileged uid, cgroup limits.

Why bubblewrap (Debian's ``bwrap``) and not containers: it needs no daemon (CI machines and
hub nodes have none), starts in milliseconds, and gives exactly the isolation grading needs —
new mount, PID, network, IPC and UTS namespaces — from one command line. An instructor who
prefers containers can run the whole grader inside one; the per-submission sandbox stays.

What a submission sees (a whitelist, not a mask):
- read-only: ``/usr`` (with the ``/bin``, ``/lib`` links), the course's virtual environment
  and the interpreter it links to at their original paths, a copy of ``llmopt`` with ONLY the
  support modules the lab declares (``LLMOPT_VISIBLE`` beside its checks, plus their imports:
  never the module under study, never another lab's reference, wherever it lives; any copy
  of the course installed in the environment is covered by the same filtered copy), the
  in-kernel half of ``autograder`` (recorder, executor, public cases — no checks, no
  grader), the course model, the corpus cache, and the records channel (a FIFO);
- read-write: its own run folder — a tmpfs of ``disk_bytes`` (the sanitised notebook, the
  executed copy, its home with the Triton/torch caches), removed after the run — and a
  private ``/tmp`` of ``tmp_bytes``;
- not: ``solutions/``, the hidden checks, the gradebook, the course secret, other students'
  files, the network (an empty network namespace with only ``lo``), host processes.

Limits: the process tree runs as an unprivileged uid of its own (one per parallel slot), in
a memory and a pids cgroup (memory exhaustion and fork bombs stay inside), with rlimits on CPU
time, file size and open files; the grader's wall clock kills the whole session, and
``--die-with-parent`` plus the PID namespace take everything the notebook started with it.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile

from . import course

UID_BASE = 61000
UID_RANGE = 1000  # slots are taken from UID_BASE .. UID_BASE + UID_RANGE - 1
LOCK_DIR = "/run/llmopt-grader"
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_NAME = "llmopt-grader"


class SandboxUnavailable(RuntimeError):
    """The machine lacks what the sandbox needs; the message says what to install or do."""


def _interpreter_root() -> str:
    """The base Python installation the venv links to (it must be visible at its own path)."""
    return os.path.realpath(sys.base_prefix)


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/a', '/a/b'] (the folders bwrap must create above a bind target)."""
    parts = os.path.abspath(path).strip(os.sep).split(os.sep)[:-1]
    return [os.sep + os.sep.join(parts[:i + 1]) for i in range(len(parts))]


class Bubblewrap:
    """Runs the executor in a bubblewrap sandbox; one instance serves a whole grading run.

    ``with sandbox.slot(run_dir) as slot: slot.popen(argv, ...)`` is one run: the slot takes
    a free uid, mounts a size-limited tmpfs on ``run_dir`` (the only writable place besides a
    size-limited ``/tmp``), creates the cgroups, and on the way out kills whatever the run
    left, removes the cgroups and unmounts the tmpfs (so nothing the submission wrote stays
    on the disk). ``channel`` (a folder holding the records FIFO) is mounted read-only.
    """
    name = "bubblewrap"

    def __init__(self, lab: str, workdir: str = course.DEFAULT_WORKDIR, *, slots: int = 1,
                 memory_bytes: int = 6 * 2**30, max_pids: int = 256, cpu_seconds: int = 1800,
                 file_bytes: int = 256 * 2**20, disk_bytes: int = 512 * 2**20,
                 tmp_bytes: int = 256 * 2**20):
        self.lab = lab
        self.memory_bytes, self.max_pids = memory_bytes, max_pids
        self.cpu_seconds, self.file_bytes = cpu_seconds, file_bytes
        self.disk_bytes, self.tmp_bytes = disk_bytes, tmp_bytes
        check_available()
        self._root = tempfile.mkdtemp(prefix=f"sandbox-{lab}-", dir=os.path.abspath(workdir))
        os.chmod(self._root, 0o755)
        self._lib = os.path.join(self._root, "lib", "llmopt")
        self._grader = os.path.join(self._root, "autograder")
        _copy_visible(course.visible_modules(lab), self._lib)
        os.makedirs(os.path.join(self._lib, "assets"), exist_ok=True)
        grader_src = os.path.join(course.REPO, "autograder")
        os.makedirs(os.path.join(self._grader, "cases"))
        for f in ("__init__.py", "record.py", "execute.py"):
            shutil.copy2(os.path.join(grader_src, f), self._grader)
        for f in glob.glob(os.path.join(grader_src, "cases", "*.py")):
            shutil.copy2(f, os.path.join(self._grader, "cases"))
        for d, _, files in os.walk(self._root):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        self.peak_bytes = 0  # the largest memory.max_usage_in_bytes of any run so far
        self._corpus = None
        if course.needs_corpus(lab):  # build the corpus and tokens once, trusted, then share them read-only
            from llmopt import data
            for split in ("train", "val", "test"):
                data.load_tokens(split)
            self._corpus = data.cache_dir()
        self._slots: queue.Queue[int] = queue.Queue()
        self._locks: list[int] = []
        try:
            for uid in _lock_uids(max(1, slots), self._locks):
                self._slots.put(uid)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)
        for fd in self._locks:
            os.close(fd)  # releases the flock: another grader may take the uid
        self._locks = []

    @contextlib.contextmanager
    def slot(self, run_dir: str, channel: str | None = None):
        """One sandboxed run in ``run_dir`` (created here, removed on exit)."""
        uid = self._slots.get()
        os.makedirs(run_dir, exist_ok=True)
        mounted = False
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o",
                            f"size={self.disk_bytes},mode=0700,uid={uid},gid={uid},nosuid,nodev",
                            "llmopt-run", run_dir], check=True, capture_output=True)
            mounted = True
            yield _Slot(self, uid, run_dir, channel)
        finally:
            _kill_uid(uid)  # a process that escaped the session (it cannot: belt and braces)
            _cgroup_remove(uid)
            if mounted:
                if subprocess.run(["umount", run_dir], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", run_dir], capture_output=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            self._slots.put(uid)

    def _bwrap(self, run_dir: str, uid: int, channel: str | None, env: dict) -> list[str]:
        """bwrap's arguments: what the run sees, and its environment (set here, once)."""
        home = os.path.join(run_dir, "home")
        passwd = os.path.join(self._root, f"passwd-{uid}")
        group = os.path.join(self._root, f"group-{uid}")
        with open(passwd, "w") as f:
            f.write(f"root:x:0:0::/root:/bin/sh\nstudent:x:{uid}:{uid}::{home}:/bin/sh\n")
        with open(group, "w") as f:
            f.write(f"root:x:0:\nstudent:x:{uid}:\n")
        os.chmod(passwd, 0o644)
        os.chmod(group, 0o644)
        venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
        lib = os.path.join(course.REPO, "lib", "llmopt")
        binds = [(_interpreter_root(), _interpreter_root()), (venv, venv), (self._lib, lib),
                 (os.path.join(lib, "assets"), os.path.join(lib, "assets")),
                 (self._grader, os.path.join(course.REPO, "autograder"))]
        # an installed copy of the course in the environment (a hub's venv) holds every
        # reference: cover it with the filtered copies
        for installed in _installed_packages(venv):
            src = self._lib if os.path.basename(installed) == "llmopt" else self._grader
            binds.append((src, installed))
        if self._corpus:
            binds.append((self._corpus, self._corpus))
        if channel:
            binds.append((channel, channel))
        b = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session",
             "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
             "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
             "--perms", "0755", "--dir", "/etc", "--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache",
             "--ro-bind", passwd, "/etc/passwd", "--ro-bind", group, "/etc/group",
             "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(self.tmp_bytes),
             "--tmpfs", "/tmp"]
        for extra in ("/etc/ssl", "/etc/localtime", "/etc/fonts"):
            if os.path.exists(extra):
                b += ["--ro-bind", extra, extra]
        # bwrap gives a bind target's new parents the modes of the source's (/root is 0700):
        # create them first, world-traversable
        dests = [dest for _, dest in binds] + [run_dir]
        for path in sorted({p for d in dests for p in _ancestors(d)} - {"/tmp", "/usr", "/etc"}, key=len):
            b += ["--perms", "0755", "--dir", path]
        for src, dest in binds:
            b += ["--ro-bind", src, dest]
        for dev in sorted(glob.glob("/dev/nvidia*")):  # GPU hubs: the devices, nothing else
            b += ["--dev-bind", dev, dev]
        b += ["--bind", run_dir, run_dir, "--chdir", os.path.join(run_dir, "work"), "--clearenv"]
        kernel_env = dict(env, HOME=home, USER="student", PATH=f"{venv}/bin:/usr/bin:/bin",
                          LANG="C.UTF-8", TMPDIR="/tmp",
                          LLMOPT_CACHE=self._corpus or os.path.join(home, ".cache", "llmopt"))
        for key, value in sorted(kernel_env.items()):
            b += ["--setenv", key, value]
        return b

    def _wrap(self, argv: list[str], run_dir: str, uid: int, channel: str | None, env: dict) -> list[str]:
        """The full command line: cgroup entry, bwrap, privilege drop, rlimits, ``argv``."""
        for d, dirs, files in os.walk(run_dir):
            for name in [d] + [os.path.join(d, f) for f in files]:
                os.lchown(name, uid, uid)
        b = self._bwrap(run_dir, uid, channel, env)
        b += ["--", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
              "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
              "prlimit", f"--cpu={self.cpu_seconds}", f"--fsize={self.file_bytes}", "--nofile=1024",
              f"--nproc={self.max_pids}", "--core=0", "--"] + argv
        cg = _cgroup_create(uid, self.memory_bytes, self.max_pids)
        enter = " && ".join(f"echo $$ > {p}/cgroup.procs" for p in cg)
        return ["sh", "-c", f'{enter} && exec "$@"', "sandbox"] + b

    def usage(self, uid: int) -> dict:
        """The run's cgroup accounting: peak bytes, OOM kills, refused tasks."""
        mem, pids = _cgroup_paths(uid)
        info = {"peak_bytes": 0, "oom_kills": 0, "pids_refused": 0}
        try:
            with open(os.path.join(mem, "memory.max_usage_in_bytes")) as f:
                info["peak_bytes"] = int(f.read())
            with open(os.path.join(mem, "memory.oom_control")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        info["oom_kills"] = int(value)
            with open(os.path.join(pids, "pids.events")) as f:
                info["pids_refused"] = int(f.read().split()[-1])
        except (OSError, ValueError, IndexError):
            pass
        self.peak_bytes = max(self.peak_bytes, info["peak_bytes"])
        return info


class _Slot:
    """One run's sandbox: ``popen`` starts the command inside, ``usage`` reads its cgroups."""

    def __init__(self, box: Bubblewrap, uid: int, run_dir: str, channel: str | None):
        self.box, self.uid, self.run_dir, self.channel = box, uid, run_dir, channel

    def popen(self, argv: list[str], env: dict, **kw) -> subprocess.Popen:
        cmd = self.box._wrap(argv, self.run_dir, self.uid, self.channel, env)
        return subprocess.Popen(cmd, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, **kw)

    def usage(self) -> dict:
        return self.box.usage(self.uid)


class NoSandbox:
    """The same interface with no isolation: trusted notebooks only (``--unsafe-no-sandbox``)."""
    name = "none"
    peak_bytes = 0

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def slot(self, run_dir: str, channel: str | None = None):
        os.makedirs(run_dir, exist_ok=True)
        try:
            yield self
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def popen(self, argv: list[str], env: dict, **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, env=dict(os.environ, **env), **kw)

    def usage(self) -> dict:
        return {}


def _copy_visible(modules: list[str], dst: str) -> None:
    """Copy llmopt's ``__init__`` and the ``modules`` (dotted), with their packages' ``__init__``."""
    src = course.LLMOPT
    files = {"__init__.py"}
    for m in modules:
        parts = m.split(".")
        for i in range(1, len(parts)):
            files.add(os.path.join(*parts[:i], "__init__.py"))
        files.add(os.path.relpath(course._module_file(m), src))
    for rel in sorted(files):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))


def _installed_packages(venv: str) -> list[str]:
    """``llmopt``/``autograder`` folders installed (not linked) in the environment's site-packages."""
    found = []
    for sp in glob.glob(os.path.join(venv, "lib", "python3*", "site-packages")):
        for name in ("llmopt", "autograder"):
            path = os.path.join(sp, name)
            if os.path.isdir(path) and not os.path.islink(path):
                found.append(path)
    return found


def _lock_uids(n: int, fds: list[int]) -> list[int]:
    """Take ``n`` slot uids no other grading run on this machine holds (one flock per uid).

    Two graders sharing a uid would kill each other's runs (a slot's release kills every
    process of its uid and cgroup), so each uid is locked for the lifetime of a ``Bubblewrap``.
    """
    os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    uids = []
    for uid in range(UID_BASE, UID_BASE + UID_RANGE):
        fd = os.open(os.path.join(LOCK_DIR, f"uid-{uid}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if _uid_busy(uid):  # processes of a grader that takes no lock (or a crashed one)
            os.close(fd)
            continue
        fds.append(fd)
        uids.append(uid)
        if len(uids) == n:
            return uids
    raise SandboxUnavailable(f"no free sandbox uid in {UID_BASE}..{UID_BASE + UID_RANGE - 1} "
                             f"({len(uids)} of {n}): too many grading runs at once on this machine")


def _uid_busy(uid: int) -> bool:
    for path in _cgroup_paths(uid):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                if f.read().strip():
                    return True
        except OSError:
            pass
    return subprocess.run(["pgrep", "-U", str(uid)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False).returncode == 0


def _cgroup_paths(uid: int) -> list[str]:
    return [os.path.join(CGROUP_ROOT, ctl, CGROUP_NAME, str(uid)) for ctl in ("memory", "pids")]


def _cgroup_create(uid: int, memory_bytes: int, max_pids: int) -> list[str]:
    _cgroup_remove(uid)
    mem, pids = _cgroup_paths(uid)
    os.makedirs(mem, exist_ok=True)
    os.makedirs(pids, exist_ok=True)
    with open(os.path.join(mem, "memory.limit_in_bytes"), "w") as f:
        f.write(str(memory_bytes))
    if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):
        with open(os.path.join(mem, "memory.memsw.limit_in_bytes"), "w") as f:
            f.write(str(memory_bytes))
    try:  # over the limit means killed, never swapped (lab06's stages rely on it)
        with open(os.path.join(mem, "memory.swappiness"), "w") as f:
            f.write("0")
    except OSError:
        pass
    with open(os.path.join(pids, "pids.max"), "w") as f:
        f.write(str(max_pids))
    return [mem, pids]


def _cgroup_remove(uid: int) -> None:
    for path in _cgroup_paths(uid):
        if not os.path.isdir(path):
            continue
        for _ in range(50):
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            import time
            time.sleep(0.05)
        try:
            os.rmdir(path)
        except OSError:
            pass


def _kill_uid(uid: int) -> None:
    subprocess.run(["pkill", "-KILL", "-U", str(uid)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)


_AVAILABLE: bool | None = None


def check_available() -> None:
    """Raise ``SandboxUnavailable`` saying what is missing (bwrap, root, cgroups)."""
    global _AVAILABLE
    if _AVAILABLE:
        return
    missing = [tool for tool in ("bwrap", "setpriv", "prlimit", "pkill") if shutil.which(tool) is None]
    if missing:
        raise SandboxUnavailable(
            f"the sandbox needs {', '.join(missing)}: `apt-get install bubblewrap util-linux procps` "
            "(make sandbox-deps), or grade trusted notebooks only with --unsafe-no-sandbox")
    if os.geteuid() != 0:
        raise SandboxUnavailable("the sandbox drops each submission to its own uid and sets cgroup "
                                 "limits, which needs root: run the grader as root (in a VM or "
                                 "container of its own), or pass --unsafe-no-sandbox for trusted notebooks")
    for ctl in ("memory", "pids"):
        base = os.path.join(CGROUP_ROOT, ctl)
        try:
            os.makedirs(os.path.join(base, CGROUP_NAME), exist_ok=True)
        except OSError as exc:
            raise SandboxUnavailable(f"cannot create a {ctl} cgroup under {base} ({exc.strerror}): the "
                                     "sandbox needs cgroup v1 memory and pids controllers") from None
    probe = subprocess.run(["bwrap", "--unshare-pid", "--unshare-net", "--die-with-parent",
                            "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
                            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                            "--proc", "/proc", "--dev", "/dev", "true"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise SandboxUnavailable(f"bubblewrap cannot create namespaces here: {probe.stderr.strip()}")
    _AVAILABLE = True
