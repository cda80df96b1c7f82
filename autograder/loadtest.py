"""``make loadtest``: grade many lab01 submissions with a bounded pool, twice, and a sample serially.

    python -m autograder.loadtest --n 200 --jobs 2 [--serial-sample K] [--out bench/results/loadtest.json]

Builds ``--n`` submissions of lab01 — correct (the full solution), wrong (planted bugs and
the untouched release) and hostile (monkeypatched comparisons, an input transformer, a
snooper, ``os._exit``, a segfault, an output flood, forged metadata, a fork bomb, memory
exhaustion, an unreadable file) — and grades them:

1. with ``--jobs`` workers into a fresh grading folder (gradebook included);
2. again, into another fresh folder;
3. ``--serial-sample`` of them (every kind represented) with one worker.

It asserts that every submission gets the same status, score and per-cell scores in all
runs (the seeds come from a fixed ``AUTOGRADER_SECRET``), and that the expected outcome of
each kind holds (full marks, partial, zero, not_gradable), and writes throughput
(submissions per minute), the grader's peak RSS and the sandboxes' peak cgroup memory to
``bench/results/loadtest.json``. Not part of ``make test``: it takes long.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import time

from . import course
from .demo import LAB, PLANTED_BUG
from .release import sample_submission

SECRET = "loadtest-fixed-secret-do-not-use-for-a-course"
# forgets the 1/sqrt(d) scaling
BUG_ATTENTION = {"cached_attention_impl": (" / math.sqrt(d)", "")}

HOSTILE = {
    "patcher": ("kv_cache_bytes_impl", "import torch, numpy as np\ntorch.allclose = lambda *a, **k: True\n"
                "np.allclose = lambda *a, **k: True\nimport llmopt.testing\n"
                "llmopt.testing.assert_close = lambda *a, **k: None\n"),
    "transformer": ("KVCache_impl", "get_ipython().input_transformers_cleanup.append(lambda l: ['pass\\n'])\n"),
    "snoop": ("kv_cache_bytes_impl", "import os\nfor p in ('/work', '/root', os.path.expanduser('~/../..')):\n"
              "    try: print(p, os.listdir(p)[:5])\n    except OSError as e: print(p, type(e).__name__)\n"
              "try:\n    import llmopt.kv_cache\nexcept ImportError as e: print('no reference:', e)\n"),
    "osexit": ("check_kv_cache_bytes", "import os\nos._exit(1)\n"),
    "segfault": ("check_kv_cache_bytes", "import ctypes\nctypes.string_at(0)\n"),
    "flood": ("check_generate", "import sys\nfor _ in range(6):\n    sys.stdout.write('o' * 2**20)\n"
              "from IPython.display import HTML, display\ndisplay(HTML('<script>alert(1)</script>'))\n"),
    "forkbomb": ("check_kv_cache_bytes", "import os, time\nkids = []\ntry:\n    while True:\n"
                 "        pid = os.fork()\n        if pid == 0:\n            time.sleep(600); os._exit(0)\n"
                 "        kids.append(pid)\nexcept OSError:\n    print('fork refused after', len(kids))\n"),
    "oom": ("check_kv_cache_bytes", "hog = []\nwhile True:\n    hog.append(b'x' * 2**28)\n"),
}
# kind -> what the grade must be (None: any score, checked only for determinism)
EXPECT = {"correct": ("graded", 15.0), "bug_cache": ("graded", None), "bug_attention": ("graded", None),
          "release": ("graded", 0.0), "invalid": ("not_gradable", 0.0), "patcher": ("graded", None),
          "transformer": ("graded", None), "snoop": ("graded", 0.0), "osexit": ("graded", 2.0),
          "segfault": ("graded", 2.0), "flood": ("graded", 15.0), "forkbomb": ("graded", None),
          "oom": ("graded", 2.0), "forged": ("graded", 0.0)}
# per 40 submissions: 20 correct, 10 wrong, 10 hostile
MIX = (["correct"] * 20 + ["bug_cache"] * 4 + ["bug_attention"] * 3 + ["release"] * 3 +
       ["patcher", "transformer", "snoop", "osexit", "segfault", "flood", "forkbomb", "oom",
        "forged", "invalid"])


def _insert_after(nb: dict, grade_id: str, source: str) -> dict:
    nb = json.loads(json.dumps(nb))
    i = next(i for i, c in enumerate(nb["cells"])
             if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id)
    nb["cells"].insert(i + 1, {"cell_type": "code", "metadata": {}, "source": source,
                               "outputs": [], "execution_count": None, "id": f"extra-{i}"})
    return nb


def build(folder: str, n: int) -> dict[str, str]:
    """Write ``n`` submissions into ``folder``; returns {student: kind}."""
    release = os.path.join(course.REPO, "labs", LAB, f"{LAB}.ipynb")
    full = sample_submission(LAB, release)
    notebooks = {"correct": full,
                 "bug_cache": sample_submission(LAB, release, replace=PLANTED_BUG),
                 "release": sample_submission(LAB, release, solved=False)}
    try:
        notebooks["bug_attention"] = sample_submission(LAB, release, replace=BUG_ATTENTION)
    except ValueError:  # the solution changed: fall back to the cache bug
        notebooks["bug_attention"] = notebooks["bug_cache"]
    for kind, (after, code) in HOSTILE.items():
        base = notebooks["release"] if kind == "snoop" else full
        notebooks[kind] = _insert_after(base, after, code)
    forged = json.loads(json.dumps(notebooks["release"]))
    for c in forged["cells"]:
        meta = c.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade"):
            meta["points"] = 100
        if c["cell_type"] == "code":
            c["outputs"] = [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                             "data": {"text/plain": "100.0"}}]
    notebooks["forged"] = forged
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    kinds = {}
    for i in range(n):
        kind = MIX[i % len(MIX)]
        student = f"s{i:03d}-{kind}"
        d = os.path.join(folder, student, LAB)
        os.makedirs(d)
        with open(os.path.join(d, f"{LAB}.ipynb"), "w") as f:
            if kind == "invalid":
                f.write('{"cells": [ {"cell_type": "code", "source": "x = ')
            else:
                json.dump(notebooks[kind], f)
        kinds[student] = kind
    return kinds


def _run(name: str, folder: str, workdir: str, jobs: int, timeout: float) -> dict:
    from .grade import grade_folder, write_gradebook

    if os.path.isdir(workdir):
        shutil.rmtree(workdir)
    # grade_folder(gradebook=True) in two timed halves: the sandboxed pool, then the
    # gradebook (one `nbgrader autograde` per graded submission, in this process)
    t0 = time.perf_counter()
    results = grade_folder(LAB, folder, os.path.join(workdir, "grades.csv"), jobs=jobs, workdir=workdir,
                           timeout=timeout, progress=sys.stderr.isatty(), gradebook=False)
    t1 = time.perf_counter()
    failed = write_gradebook(LAB, results, workdir)
    seconds = time.perf_counter() - t0
    for r in results:
        if r.student in failed:
            r.status, r.message = "error", f"gradebook write failed: {failed[r.student][-200:]}"
    graded = [r for r in results if r.status == "graded"]
    run = {"name": name, "jobs": jobs, "submissions": len(results), "seconds": round(seconds, 1),
           "per_minute": round(len(results) / seconds * 60, 2),
           "pool_seconds": round(t1 - t0, 1), "gradebook_seconds": round(seconds - (t1 - t0), 1),
           "pool_per_minute": round(len(results) / (t1 - t0) * 60, 2),
           "mean_run_seconds": round(sum(r.seconds for r in graded) / max(1, len(graded)), 1),
           "sandbox_peak_bytes": max((r.peak_bytes for r in results), default=0),
           "statuses": {s: sum(r.status == s for r in results) for s in ("graded", "not_gradable", "error")}}
    grades = {r.student: {"status": r.status, "score": r.score,
                          "cells": {k: v["score"] for k, v in sorted(r.cells.items())},
                          "message": r.message} for r in results}
    print(f"{name}: {len(results)} in {seconds:.0f} s = {run['per_minute']} /min "
          f"({run['statuses']})", flush=True)
    return {"run": run, "grades": grades}


def _compare(a: dict, b: dict, students) -> list[str]:
    diffs = []
    for s in students:
        x, y = a[s], b[s]
        if (x["status"], x["score"], x["cells"]) != (y["status"], y["score"], y["cells"]):
            diffs.append(f"{s}: {x['status']} {x['score']} {x['cells']} != {y['status']} {y['score']} {y['cells']}")
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autograder.loadtest")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--serial-sample", type=int, default=None,
                    help="grade only this many (every kind represented) serially (default: all n)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--workdir", default=os.path.join(course.REPO, ".grading", "loadtest"))
    ap.add_argument("--out", default=os.path.join(course.REPO, "bench", "results", "loadtest.json"))
    args = ap.parse_args(argv)

    os.environ["AUTOGRADER_SECRET"] = SECRET  # the same inputs in every run
    folder = os.path.join(args.workdir, "submissions")
    kinds = build(folder, args.n)
    first = _run("pool run 1", folder, os.path.join(args.workdir, "run1"), args.jobs, args.timeout)
    second = _run("pool run 2", folder, os.path.join(args.workdir, "run2"), args.jobs, args.timeout)
    k = args.n if args.serial_sample is None else min(args.n, args.serial_sample)
    sample, seen = [], set()
    for s, kind in kinds.items():  # one of each kind first, then in order
        if kind not in seen:
            sample.append(s)
            seen.add(kind)
    sample = (sample + [s for s in kinds if s not in sample])[:k]
    serial_folder = os.path.join(args.workdir, "serial-submissions")
    if os.path.isdir(serial_folder):
        shutil.rmtree(serial_folder)
    for s in sample:
        shutil.copytree(os.path.join(folder, s), os.path.join(serial_folder, s))
    serial = _run("serial", serial_folder, os.path.join(args.workdir, "serial"), 1, args.timeout)

    diffs = _compare(first["grades"], second["grades"], kinds) + \
        _compare(first["grades"], serial["grades"], sample)
    wrong = []
    for s, kind in kinds.items():
        status, score = EXPECT[kind]
        g = first["grades"][s]
        if g["status"] != status or (score is not None and g["score"] != score):
            wrong.append(f"{s}: expected {status} {score}, got {g['status']} {g['score']}: {g['message'][:200]}")
    report = {
        "date": datetime.date.today().isoformat(), "lab": LAB, "n": args.n, "jobs": args.jobs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "mix": {kind: sum(v == kind for v in kinds.values()) for kind in EXPECT},
        "runs": [first["run"], second["run"], serial["run"]],
        "serial_sample": sample if k < args.n else "all",
        "grader_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "sandbox_peak_bytes": max(r["run"]["sandbox_peak_bytes"] for r in (first, second, serial)),
        "identical_grades": not diffs, "differences": diffs,
        "unexpected_outcomes": wrong,
        "scores_run1": {s: g["score"] for s, g in first["grades"].items()},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "scores_run1"}, indent=1))
    return 0 if not diffs and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
