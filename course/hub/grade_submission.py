"""Grade one collected submission in the autograder's sandbox, as root, for an instructor.

Installed by ``course/hub/setup.sh`` as ``<prefix>/bin/llmopt-grade-submission`` (root-owned)
and allowed to the ``llmopt-instructors`` Unix group by ``/etc/sudoers.d/llmopt-hub``:

    sudo -n <prefix>/bin/llmopt-grade-submission LAB STUDENT NOTEBOOK WORKDIR

The sandbox (``autograder.sandbox.Bubblewrap``: namespaces, a throw-away uid, cgroup limits)
needs root, and instructors' servers do not run as root: the formgrader's Autograde button
(``hub_grading.SandboxedApplyVerdicts``) calls this helper through sudo. It runs the course as
the hub's administrator installed it (``<prefix>/course``, root-owned: an instructor cannot
change the code that runs as root), reads only the submission and the instructor's grading
folder, writes the result there (``results/<student>/<lab>/``) and hands it back to the
instructor (ownership), then prints the result as JSON.
"""
import json
import os
import pwd
import re
import sys

PREFIX = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COURSE = os.path.join(PREFIX, "course")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}$")


def fail(msg: str) -> None:
    print(f"llmopt-grade-submission: {msg}", file=sys.stderr)
    sys.exit(2)


def chown_tree(path: str, uid: int, gid: int) -> None:
    """Give ``path`` and everything under it to uid:gid, never following symlinks."""
    os.lchown(path, uid, gid)
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        fail("usage: llmopt-grade-submission LAB STUDENT NOTEBOOK WORKDIR")
    lab, student, notebook, workdir = argv
    if os.geteuid() != 0:
        fail("run through sudo (the sandbox needs root)")
    if not NAME.match(lab) or not NAME.match(student):
        fail(f"bad lab or student name: {lab!r}, {student!r}")
    caller = os.environ.get("SUDO_UID")
    if caller is None:
        fail("run through sudo by an instructor")
    uid = int(caller)
    gid = pwd.getpwuid(uid).pw_gid
    workdir = os.path.realpath(workdir)
    notebook = os.path.realpath(notebook)
    st = os.stat(workdir)
    if st.st_uid != uid:
        fail(f"{workdir} does not belong to the calling user")
    if os.path.commonpath([workdir, notebook]) != workdir or not notebook.endswith(".ipynb"):
        fail(f"{notebook} is not a notebook inside {workdir}")

    sys.path[:0] = [COURSE, os.path.join(COURSE, "lib")]
    from autograder.grade import grade_submission
    from autograder.sandbox import Bubblewrap

    sandbox = Bubblewrap(lab, workdir)
    try:
        result = grade_submission(lab, student, notebook, workdir=workdir, sandbox=sandbox)
    finally:
        sandbox.close()
        for path in (os.path.join(workdir, "results"), os.path.join(workdir, "secret")):
            if os.path.lexists(path):
                chown_tree(path, uid, gid)
    import dataclasses
    print(json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
