"""Grade one collected submission in the autograder's sandbox, as root, for an instructor.

Installed by ``course/hub/setup.sh`` as ``<prefix>/bin/llmopt-grade-submission`` (root-owned)
and allowed to the ``llmopt-instructors`` Unix group by ``/etc/sudoers.d/llmopt-hub``:

    sudo -n <prefix>/bin/llmopt-grade-submission LAB STUDENT NOTEBOOK WORKDIR

The sandbox (``autograder.sandbox.Bubblewrap``: namespaces, a throw-away uid, cgroup limits)
needs root, and instructors' servers do not run as root: the formgrader's Autograde button
(``hub_grading.SandboxedApplyVerdicts``) calls this helper through sudo. It runs the course as
the hub's administrator installed it (``<prefix>/course``, root-only: an instructor cannot
change the code that runs as root, a student cannot read it).

Root touches nothing the instructor controls. Every file of the instructor's is read and
written **as the instructor** (effective uid, gid and groups of the sudo caller), so a symlink
planted in WORKDIR (``results`` -> /etc, ``secret`` -> a root file) leads only where the
instructor may go anyway:

1. as the instructor: refuse a WORKDIR path that goes through a symlink or that the instructor
   does not own; read the notebook (inside WORKDIR), its ``timestamp.txt`` and the course
   secret ``WORKDIR/secret`` (never through a symlink);
2. as root: grade a copy of them in a private folder (``<prefix>/grading/<random>``, mode 700)
   with the course's ``grade_submission`` in the sandbox;
3. as the instructor: write the result folder into ``WORKDIR/results/<student>/<lab>/``
   (regular files only, nothing that the submission left as a symlink or device), and the
   secret if it was new; then print the result as JSON (``out_dir`` in WORKDIR).
"""
import json
import os
import pwd
import re
import secrets
import shutil
import stat
import sys
import tempfile

PREFIX = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COURSE = os.path.join(PREFIX, "course")
SCRATCH = os.path.join(PREFIX, "grading")  # root's private grading folders
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}$")
MAX_NOTEBOOK = 64 * 2**20
MAX_FILE = 256 * 2**20       # one file of the result folder copied back
MAX_RESULT = 1024 * 2**20    # the whole result folder copied back
MAX_DEPTH = 32
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    pass


def fail(msg: str) -> None:
    print(f"llmopt-grade-submission: {msg}", file=sys.stderr)
    sys.exit(2)


class Caller:
    """The instructor who ran sudo; ``with caller:`` runs file work with their identity."""

    def __init__(self, uid: int):
        pw = pwd.getpwuid(uid)
        self.uid, self.gid, self.name = uid, pw.pw_gid, pw.pw_name
        self.groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        self._root_groups = os.getgroups()

    def __enter__(self):
        os.setgroups(self.groups)
        os.setegid(self.gid)
        os.seteuid(self.uid)
        return self

    def __exit__(self, *exc):
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(self._root_groups)
        return False


def no_symlink_on_path(path: str) -> None:
    """Refuse ``path`` if any of its components is a symlink (or it is not absolute)."""
    if not os.path.isabs(path) or os.path.normpath(path) != path.rstrip(os.sep) or path == os.sep:
        raise Refused(f"{path!r} is not a plain absolute path")
    cur = os.sep
    for part in path.strip(os.sep).split(os.sep):
        cur = os.path.join(cur, part)
        if stat.S_ISLNK(os.lstat(cur).st_mode):
            raise Refused(f"{cur} is a symlink: give the grading folder's real path")


def read_file(path: str, cap: int, *, dir_fd=None) -> bytes:
    """A regular file's bytes (no symlink in its last component, at most ``cap`` bytes)."""
    fd = os.open(path, _READ, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{path} is not a regular file")
        if st.st_size > cap:
            raise Refused(f"{path} has {st.st_size} bytes, over {cap}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(cap + 1)[:cap]
    finally:
        os.close(fd)


def write_new(path: str, data: bytes, mode: int = 0o644, *, dir_fd=None) -> None:
    fd = os.open(path, _CREATE, mode, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def take_submission(caller: Caller, notebook: str, workdir: str) -> dict:
    """As the instructor: check WORKDIR and read what grading needs from it."""
    with caller:
        st = os.stat(workdir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != caller.uid:
            raise Refused(f"{workdir} is not a folder of the calling user")
        real = os.path.realpath(notebook)
        if os.path.commonpath([workdir, real]) != workdir or not real.endswith(".ipynb"):
            raise Refused(f"{notebook} is not a notebook inside {workdir}")
        try:
            nb = read_file(notebook, MAX_NOTEBOOK)
        except OSError as exc:
            raise Refused(f"cannot read {notebook}: {exc.strerror}") from None
        try:
            timestamp = read_file(os.path.join(os.path.dirname(notebook), "timestamp.txt"), 200)
        except (OSError, Refused):
            timestamp = None  # the grader notes a missing timestamp itself
        try:
            secret = read_file(os.path.join(workdir, "secret"), 4096)
        except FileNotFoundError:
            secret = None
        except OSError as exc:
            raise Refused(f"{workdir}/secret: {exc.strerror} (a symlink?)") from None
    return {"notebook": nb, "name": os.path.basename(notebook), "timestamp": timestamp, "secret": secret}


def private_folder() -> str:
    """A fresh root-only folder under <prefix>/grading."""
    os.makedirs(SCRATCH, mode=0o700, exist_ok=True)
    st = os.lstat(SCRATCH)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise Refused(f"{SCRATCH} must be a root-owned folder")
    os.chmod(SCRATCH, 0o700)
    return tempfile.mkdtemp(prefix="grade-", dir=SCRATCH)


def copy_back(src: str, caller: Caller, dest: str) -> None:
    """Copy the result folder ``src`` (root's) to ``dest`` (the instructor's), as the instructor.

    The source is walked by file descriptor without following symlinks (the submission
    wrote part of it); only folders and regular files travel, within size caps.
    """
    budget = [MAX_RESULT]
    with caller:
        if os.path.lexists(dest):
            shutil.rmtree(dest)  # the instructor's own earlier result (refuses a symlink)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.mkdir(dest, 0o755)
    top = os.open(src, _DIR)
    try:
        _copy_dir(top, dest, caller, budget, 0)
    finally:
        os.close(top)


def _copy_dir(dfd: int, dest: str, caller: Caller, budget: list, depth: int) -> None:
    if depth > MAX_DEPTH:
        return
    for name in sorted(os.listdir(dfd)):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        out = os.path.join(dest, name)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR, dir_fd=dfd)
            try:
                with caller:
                    os.mkdir(out, 0o755)
                _copy_dir(fd, out, caller, budget, depth + 1)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode) and st.st_size <= min(MAX_FILE, budget[0]):
            fd = os.open(name, _READ, dir_fd=dfd)  # root reads root's copy...
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                with caller:  # ...the instructor writes the instructor's
                    ofd = os.open(out, _CREATE, 0o644)
                    with os.fdopen(ofd, "wb") as f:
                        left = st.st_size
                        while left > 0:
                            chunk = os.read(fd, min(left, 1 << 20))
                            if not chunk:
                                break
                            f.write(chunk)
                            left -= len(chunk)
                budget[0] -= st.st_size
            finally:
                os.close(fd)
        # symlinks, devices, FIFOs, sockets, oversized files: left behind


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        fail("usage: llmopt-grade-submission LAB STUDENT NOTEBOOK WORKDIR")
    lab, student, notebook, workdir = argv
    if os.geteuid() != 0:
        fail("run through sudo (the sandbox needs root)")
    if not NAME.match(lab) or not NAME.match(student):
        fail(f"bad lab or student name: {lab!r}, {student!r}")
    caller_uid = os.environ.get("SUDO_UID")
    if caller_uid is None or not caller_uid.isdigit() or int(caller_uid) == 0:
        fail("run through sudo by an instructor")
    caller = Caller(int(caller_uid))
    workdir = workdir.rstrip(os.sep) or os.sep
    try:
        with caller:
            no_symlink_on_path(workdir)
        sub = take_submission(caller, notebook, workdir)
    except (Refused, OSError) as exc:
        fail(str(exc))

    private = private_folder()
    try:
        # What grading needs, in root's private folder: the secret (kept per grading folder, so
        # that a regrade draws the same inputs), the notebook and its timestamp.
        secret = sub["secret"] or secrets.token_hex(32).encode()
        write_new(os.path.join(private, "secret"), secret, 0o600)
        nb_dir = os.path.join(private, "submitted", student, lab)
        os.makedirs(nb_dir)
        nb_path = os.path.join(nb_dir, sub["name"])
        write_new(nb_path, sub["notebook"])
        if sub["timestamp"] is not None:
            write_new(os.path.join(nb_dir, "timestamp.txt"), sub["timestamp"])

        # The grader runs helpers of its own (``python -m autograder.verify``): they must find
        # the installed course too, and never the caller's working folder (``-m`` puts the
        # current folder first on sys.path: an instructor's course root has an autograder/).
        os.chdir(COURSE)
        os.environ["PYTHONPATH"] = os.pathsep.join([COURSE, os.path.join(COURSE, "lib")])
        os.environ.pop("PYTHONHOME", None)
        sys.path[:0] = [COURSE, os.path.join(COURSE, "lib")]
        from autograder.grade import grade_submission
        from autograder.sandbox import Bubblewrap

        sandbox = Bubblewrap(lab, private)
        try:
            result = grade_submission(lab, student, nb_path, workdir=private, sandbox=sandbox)
        finally:
            sandbox.close()

        src = os.path.join(private, "results", student, lab)
        dest = os.path.join(workdir, "results", student, lab)
        try:
            if os.path.isdir(src):
                copy_back(src, caller, dest)
            if sub["secret"] is None:
                try:
                    with caller:
                        write_new(os.path.join(workdir, "secret"), secret, 0o600)
                except FileExistsError:
                    pass  # made meanwhile by a parallel grading: theirs counts from now on
        except (Refused, OSError) as exc:
            fail(f"cannot write the result into {workdir} as {caller.name}: {exc}")
        result.out_dir = dest
        if isinstance(getattr(result, "message", None), str):
            result.message = result.message.replace(private, workdir)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    import dataclasses
    print(json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
