"""Execute one sanitised notebook: the process the sandbox wraps.

    python -m autograder.execute NOTEBOOK OUT_DIR --lab LAB --seed SEED [--cell-timeout S]

Runs every cell with nbclient in a fresh kernel (errors do not stop later cells), with
``AUTOGRADER_RESULTS=OUT_DIR/records`` so that ``check`` calls record there, and writes
``OUT_DIR/executed.ipynb`` after every cell, so whatever was reached survives a kernel
that dies or a wall clock that runs out. Exit code 0 even when the student's code fails:
the notebook and the records say what happened; ``OUT_DIR/status.json`` says how it ended.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("notebook")
    ap.add_argument("out_dir")
    ap.add_argument("--lab", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--cell-timeout", type=int, default=300)
    args = ap.parse_args(argv)

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    records = os.path.join(args.out_dir, "records")
    os.makedirs(records, exist_ok=True)
    os.environ.update({
        "AUTOGRADER_RESULTS": records,
        "AUTOGRADER_LAB": args.lab,
        "AUTOGRADER_SEED": str(args.seed),
        "NBGRADER_EXECUTION": "autograde",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    })
    with open(args.notebook) as f:
        nb = nbformat.reads(f.read(), as_version=4)
    executed_path = os.path.join(args.out_dir, "executed.ipynb")

    def save(**_):
        with open(executed_path + ".tmp", "w") as f:
            f.write(nbformat.writes(nb, version=4))
        os.replace(executed_path + ".tmp", executed_path)

    client = NotebookClient(
        nb, kernel_name="python3", timeout=args.cell_timeout, allow_errors=True,
        interrupt_on_timeout=True,
        error_on_timeout={"ename": "CellTimeoutError", "evalue": "",
                          "traceback": [f"CellTimeoutError: the cell ran longer than "
                                        f"{args.cell_timeout} s"]},
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(args.notebook))}},
        extra_arguments=["--HistoryManager.hist_file=:memory:"],
        on_cell_executed=save,
    )
    status = {"ended": "completed"}
    t0 = time.perf_counter()
    try:
        client.execute()
    except DeadKernelError as exc:
        status = {"ended": "kernel_died", "detail": str(exc)[:500]}
    except Exception as exc:  # nbclient's own failures: report, do not hide
        status = {"ended": "executor_error", "detail": f"{type(exc).__name__}: {exc}"[:500]}
    status["seconds"] = round(time.perf_counter() - t0, 2)
    save()
    with open(os.path.join(args.out_dir, "status.json"), "w") as f:
        json.dump(status, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
