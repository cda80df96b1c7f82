"""Command line: ``python -m autograder grade LAB SUBMISSIONS --out grades.csv --jobs N``."""
from __future__ import annotations

import argparse
import os
import sys

from . import course


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autograder",
                                 description="Grade LLM Optimization Labs submissions.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="grade SUBMISSIONS/<student>/<LAB>/*.ipynb")
    g.add_argument("lab", help="assignment id, e.g. lab01_kv_cache")
    g.add_argument("submissions", help="folder with <student>/<LAB>/<notebook>.ipynb")
    g.add_argument("--out", default="grades.csv", help="CSV to write (default grades.csv)")
    g.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="submissions graded at once")
    g.add_argument("--workdir", default=course.DEFAULT_WORKDIR,
                   help="grading folder: results, gradebook.db, secret (default .grading/)")
    g.add_argument("--timeout", type=float, default=600, help="wall-clock seconds per submission")
    g.add_argument("--no-gradebook", action="store_true", help="only write the CSV")
    g.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="run notebooks with the grader's own rights (trusted notebooks only)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or table")
    r = sub.add_parser("release", help="build labs/ from solutions/ with nbgrader (make labs)")
    r.add_argument("labs", nargs="*", help="assignment ids (default: all)")
    r.add_argument("--out", default=None, help="release folder (default labs/)")
    d = sub.add_parser("demo", help="grade three sample lab01 submissions and print the gradebook")
    d.add_argument("--jobs", type=int, default=2)
    d.add_argument("--workdir", default=course.DEFAULT_WORKDIR)
    d.add_argument("--unsafe-no-sandbox", action="store_true")
    args = ap.parse_args(argv)

    if args.command == "release":
        from .release import release_labs
        for path in release_labs(args.labs or None, args.out):
            print(f"released {os.path.relpath(path)}")
        return 0
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(jobs=args.jobs, workdir=args.workdir, sandboxed=not args.unsafe_no_sandbox)

    from .grade import format_table, grade_folder

    if not os.path.isdir(args.submissions):
        ap.error(f"{args.submissions} is not a folder; expected <student>/{args.lab}/<notebook>.ipynb inside")
    try:
        course.source_notebook(args.lab)
    except FileNotFoundError as exc:
        ap.error(str(exc))
    from .sandbox import SandboxUnavailable
    try:
        results = grade_folder(args.lab, args.submissions, args.out, jobs=args.jobs,
                               workdir=args.workdir, timeout=args.timeout,
                               gradebook=not args.no_gradebook, sandboxed=not args.unsafe_no_sandbox,
                               progress=not args.quiet)
    except SandboxUnavailable as exc:
        print(f"error: cannot grade untrusted notebooks safely here: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_table(results))
        print(f"wrote {args.out}")
    return 0 if all(r.status != "error" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
