"""The formgrader's Autograde on the hub: the course's sandboxed grader, run through sudo.

nbgrader's ``autograde`` runs in the instructor's own server, which is not root; the
autograder's sandbox needs root. ``SandboxedApplyVerdicts`` (configured in place of
``autograder.nbgrader_plugins.ApplyVerdicts`` by this folder's ``nbgrader_config.py``) has the
root helper ``llmopt-grade-submission`` grade the submission in the sandbox; the helper writes
the result into the instructor's grading folder, where ``ApplyVerdicts`` reads it and writes
the verdicts into the notebook and the gradebook as usual. Run as root (``python -m autograder grade`` on a grading machine), it is plain
``ApplyVerdicts``.
"""
import os
import subprocess

from autograder.grade import load_result
from autograder.nbgrader_plugins import ApplyVerdicts

HELPER = os.path.join(os.environ.get("LLMOPT_HUB_PREFIX", "/opt/llmopt-hub"), "bin",
                      "llmopt-grade-submission")


class SandboxedApplyVerdicts(ApplyVerdicts):
    """``ApplyVerdicts`` whose grading runs as root in the sandbox, through sudo."""

    def grade(self, lab, student, path):
        if os.geteuid() == 0 or not self.sandboxed:
            return super().grade(lab, student, path)
        # Real paths: the helper refuses a grading folder reached through a symlink.
        proc = subprocess.run(["sudo", "-n", HELPER, lab, student, os.path.realpath(path),
                               os.path.realpath(self.workdir)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"the sandboxed grader failed for {student}/{lab} (exit "
                               f"{proc.returncode}):\n{proc.stderr[-3000:]}")
        result = load_result(self.workdir, student, lab, path)  # what the helper wrote back
        if result is None:
            raise RuntimeError(f"the sandboxed grader left no result for {student}/{lab} in {self.workdir}")
        return result
