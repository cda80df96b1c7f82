"""Execute one sanitised notebook: the process the sandbox wraps.

    python -m autograder.execute NOTEBOOK OUT_DIR --lab LAB --seed SEED --records FIFO [--cell-timeout S]

Runs every cell with nbclient in a fresh kernel (errors do not stop later cells), with
``AUTOGRADER_RECORDS=FIFO`` so that ``check`` calls send their records down the grader's
channel (``autograder.records``), and writes
``OUT_DIR/executed.ipynb`` after every cell, so whatever was reached survives a kernel
that dies or a wall clock that runs out. Exit code 0 even when the student's code fails:
the notebook and the records say what happened; ``OUT_DIR/status.json`` says how it ended.

Outputs are capped (``OutputCap``): past ``MAX_CELL_OUTPUT`` bytes in a cell or
``MAX_NOTEBOOK_OUTPUT`` in the notebook, further outputs are dropped and one note says so,
so a flood of print/stderr/HTML output cannot exhaust the executor's memory or the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

MAX_CELL_OUTPUT = 2 * 2**20       # bytes of outputs kept per cell
MAX_NOTEBOOK_OUTPUT = 16 * 2**20  # bytes of outputs kept per notebook


def _size(out) -> int:
    """Approximate size in bytes of one output (its text or data payloads)."""
    n = 0
    for key in ("text", "evalue", "traceback", "data"):
        value = out.get(key) if hasattr(out, "get") else None
        if value is None:
            continue
        if isinstance(value, dict):
            n += sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in value.values())
        elif isinstance(value, list):
            n += sum(len(str(v)) for v in value)
        else:
            n += len(str(value))
    return n + 64


def capped_client(base):
    """A ``NotebookClient`` subclass that stops recording outputs past the caps."""

    class OutputCap(base):
        def __init__(self, *a, cell_cap=MAX_CELL_OUTPUT, notebook_cap=MAX_NOTEBOOK_OUTPUT, **kw):
            super().__init__(*a, **kw)
            self._cell_cap, self._nb_cap = cell_cap, notebook_cap
            self._cell_bytes: dict[int, int] = {}
            self._nb_bytes = 0
            self._truncated: set[int] = set()

        def output(self, outs, msg, display_id, cell_index):
            if cell_index in self._truncated:
                return None
            before = len(outs)
            out = super().output(outs, msg, display_id, cell_index)
            if out is None or len(outs) <= before:
                return out
            size = _size(out)
            used = self._cell_bytes.get(cell_index, 0) + size
            if used > self._cell_cap or self._nb_bytes + size > self._nb_cap:
                del outs[before:]
                room = min(self._cell_cap - self._cell_bytes.get(cell_index, 0),
                           self._nb_cap - self._nb_bytes) - 64
                if out.get("output_type") == "stream" and room > 0:  # keep what fits of a stream
                    out["text"] = str(out.get("text", ""))[:room]
                    outs.append(out)
                    self._nb_bytes += room
                self._truncated.add(cell_index)
                from nbformat.v4 import new_output
                outs.append(new_output("stream", name="stdout", text=(
                    "\n[autograder: output truncated here — over "
                    f"{self._cell_cap:,} bytes in this cell or {self._nb_cap:,} bytes "
                    "in the notebook]\n")))
                return None
            self._cell_bytes[cell_index] = used
            self._nb_bytes += size
            return out

        def _update_display_id(self, display_id, msg):
            # an update replaces an output in place: refuse ones over the per-cell cap
            data = (msg.get("content") or {}).get("data") or {}
            if sum(len(str(v)) for v in data.values()) > self._cell_cap:
                return None
            return super()._update_display_id(display_id, msg)

    return OutputCap


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("notebook")
    ap.add_argument("out_dir")
    ap.add_argument("--lab", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--records", required=True, help="the grader's records FIFO")
    ap.add_argument("--cell-timeout", type=int, default=300)
    args = ap.parse_args(argv)

    # jsonschema's optional IRI checker builds a grammar on import (~2.5 s per run);
    # nothing here validates notebooks, so leave it out.
    sys.modules.setdefault("rfc3987_syntax", None)
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    os.environ.update({
        "AUTOGRADER_RECORDS": args.records,
        "AUTOGRADER_LAB": args.lab,
        "AUTOGRADER_SEED": str(args.seed),
        "NBGRADER_EXECUTION": "autograde",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    })
    with open(args.notebook) as f:  # the grader's sanitised copy: no schema validation needed
        from nbformat.v4.rwbase import rejoin_lines
        nb = rejoin_lines(nbformat.from_dict(json.load(f)))
    executed_path = os.path.join(args.out_dir, "executed.ipynb")

    def save(**_):
        try:  # the notebook may have filled its disk: keep running; the grader sees the disk
            with open(executed_path + ".tmp", "w") as f:
                json.dump(nb, f)
            os.replace(executed_path + ".tmp", executed_path)
        except OSError:
            pass

    client = capped_client(NotebookClient)(
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
    try:
        with open(os.path.join(args.out_dir, "status.json"), "w") as f:
            json.dump(status, f)
    except OSError:  # a full disk: the grader sees it from outside (runner.disk_full)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
