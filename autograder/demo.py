"""``make demo``: grade three sample submissions of lab01 and print the gradebook.

alice hands in the full solution, bob the untouched release, carol a solution with one
planted bug (her ``KVCache.update`` never stores the values). Expected: full marks, zero,
partial credit — with feedback that names carol's failing checks.
"""
from __future__ import annotations

import json
import os
import shutil
import time

from . import course
from .grade import format_table, grade_folder
from .release import sample_submission

LAB = "lab01_kv_cache"
PLANTED_BUG = {"KVCache_impl": ("        self.v[layer, :, :, t0:t1] = v\n", "")}


def write_demo_submissions(folder: str) -> None:
    release_nb = os.path.join(course.REPO, "labs", LAB, f"{LAB}.ipynb")
    if not os.path.exists(release_nb):
        raise SystemExit(f"{release_nb} is missing: run `make labs` first")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    subs = {"alice": sample_submission(LAB, release_nb),
            "bob": sample_submission(LAB, release_nb, solved=False),
            "carol": sample_submission(LAB, release_nb, replace=PLANTED_BUG)}
    for student, nb in subs.items():
        os.makedirs(os.path.join(folder, student, LAB))
        with open(os.path.join(folder, student, LAB, f"{LAB}.ipynb"), "w") as f:
            json.dump(nb, f, indent=1)


def run_demo(jobs: int = 2, workdir: str = course.DEFAULT_WORKDIR, sandboxed: bool = True) -> int:
    folder = os.path.join(workdir, "demo-submissions")
    write_demo_submissions(folder)
    out_csv = os.path.join(workdir, "demo-grades.csv")
    t0 = time.perf_counter()
    results = grade_folder(LAB, folder, out_csv, jobs=jobs, workdir=workdir, sandboxed=sandboxed)
    print()
    print(format_table(results))
    print(f"\n{len(results)} submissions graded in {time.perf_counter() - t0:.0f} s with {jobs} "
          f"workers; CSV: {os.path.relpath(out_csv)}; gradebook: "
          f"{os.path.relpath(os.path.join(workdir, 'gradebook.db'))}")
    for r in results:
        if r.status == "graded" and r.score < r.max_score:
            print(f"\nfeedback for {r.student}:")
            for cell in r.cells.values():
                if cell["score"] < cell["max"]:
                    print("  " + cell["message"].replace("\n", "\n  "))
    return 0 if all(r.status == "graded" for r in results) else 1
