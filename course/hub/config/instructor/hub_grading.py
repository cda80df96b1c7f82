"""The formgrader's Autograde on the hub: the course's sandboxed grader, run through sudo.

nbgrader's ``autograde`` runs in the instructor's own server, which is not root; the
autograder's sandbox needs root. ``SandboxedApplyVerdicts`` (configured in place of
``autograder.nbgrader_plugins.ApplyVerdicts`` by this folder's ``nbgrader_config.py``) has the
root helper ``llmopt-grade-submission`` grade the submission in the sandbox, then hands its
result to ``ApplyVerdicts``, which writes the verdicts into the notebook and the gradebook as
usual. Run as root (``python -m autograder grade`` on a grading machine), it is plain
``ApplyVerdicts``.
"""
import dataclasses
import json
import os
import subprocess

from autograder.grade import PRECOMPUTED, SubmissionResult
from autograder.nbgrader_plugins import ApplyVerdicts

HELPER = os.path.join(os.environ.get("LLMOPT_HUB_PREFIX", "/opt/llmopt-hub"), "bin",
                      "llmopt-grade-submission")


class SandboxedApplyVerdicts(ApplyVerdicts):
    """``ApplyVerdicts`` whose grading runs as root in the sandbox, through sudo."""

    def preprocess(self, nb, resources):
        student = resources["nbgrader"]["student"]
        lab = resources["nbgrader"]["assignment"]
        if os.geteuid() == 0 or (student, lab) in PRECOMPUTED or not self.sandboxed:
            return super().preprocess(nb, resources)
        path = os.path.join(resources["metadata"]["path"], f"{resources['nbgrader']['notebook']}.ipynb")
        # Real paths: the helper refuses a grading folder reached through a symlink.
        proc = subprocess.run(["sudo", "-n", HELPER, lab, student, os.path.realpath(path),
                               os.path.realpath(self.workdir)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"the sandboxed grader failed for {student}/{lab} (exit "
                               f"{proc.returncode}):\n{proc.stderr[-3000:]}")
        fields = {f.name for f in dataclasses.fields(SubmissionResult)}
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        PRECOMPUTED[(student, lab)] = SubmissionResult(**{k: v for k, v in data.items() if k in fields})
        try:
            return super().preprocess(nb, resources)
        finally:
            PRECOMPUTED.pop((student, lab), None)
