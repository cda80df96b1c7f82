"""Attacks on the course hub, each with the outcome it must have (run as root: make test-browser).

No browser here: each attack is what a hub user can do from a terminal in JupyterLab, so the
tests run it as that Unix user (``runuser``) with the environment the hub gives that user's
server (the real ``course/hub/jupyterhub_config.py`` and its ``pre_spawn_hook``), against the
installed hub (``course/hub/setup.sh --users``: ``/opt/llmopt-hub``), a scratch exchange made
by ``course/hub/make-exchange.sh`` (as the ``hub`` fixture's) and a scratch copy of the course
for the instructor (``copy-course.sh``). nbgrader runs from its command line as each user;
grading goes through the root helper with sudo, as the formgrader's Autograde does.

Students:   reference modules (import, files, bytecode), solutions and checks (every copy of
            the course), the exchange (rename the course, plant a release, list or forge
            submissions, symlinks in a submission), the grading helper.
Instructor: the root grading helper (symlinked ``results``/``secret``, symlinked workdir,
            a notebook that is a symlink to a root-only file).
A submission:   a notebook that loads the reference (module or bytecode) in the sandbox.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HUB = os.path.join(REPO, "course", "hub")
PREFIX = os.environ.get("LLMOPT_HUB_PREFIX", "/opt/llmopt-hub")
VENV = os.path.join(PREFIX, "venv")
HELPER = os.path.join(PREFIX, "bin", "llmopt-grade-submission")
COURSE = "llm-optimization-labs"
LAB = "lab01_kv_cache"
STUDENTS = ("student1", "student2")
sys.path.insert(0, HUB)
import student_lib  # noqa: E402  (course/hub/student_lib.py: what students may import)

REFERENCES = sorted({m for mods in student_lib.REFERENCES.values() for m in mods
                     if os.path.exists(os.path.join(REPO, "lib", "llmopt", f"{m}.py"))})
SUPPORT = ["llmopt", "llmopt.gpt", "llmopt.data", "llmopt.bench", "llmopt.testing",
           "llmopt.viz.kv_cache", "llmopt.viz.quant", "autograder", "autograder.record",
           f"autograder.cases.{LAB}"]
TRUSTED_GRADER = ["autograder.checks", f"autograder.checks.{LAB}", "autograder.verify",
                  "autograder.grade", "autograder.sandbox"]
T0 = time.time()


# --- running things as hub users ------------------------------------------------------------

def spawn_env(user: str, site: dict) -> dict:
    """The environment the hub's config gives ``user``'s server (and so its kernels, terminals)."""
    from traitlets.config import Config

    c = Config()
    config = os.path.join(HUB, "jupyterhub_config.py")
    keys = {"LLMOPT_HUB_PREFIX": PREFIX, "LLMOPT_HUB_STATE": os.path.join(site["tmp"], "state"),
            "LLMOPT_HUB_EXCHANGE": site["exchange"], "LLMOPT_HUB_INSTRUCTORS": "instructor",
            "LLMOPT_HUB_USERDIR": os.path.join(site["users"], "{username}"),
            "LLMOPT_HUB_STUDENTS": ",".join(STUDENTS)}
    saved = {k: os.environ.get(k) for k in list(keys) + ["LLMOPT_COURSE_ROOT"]}
    os.environ.update(keys)
    os.environ.pop("LLMOPT_COURSE_ROOT", None)
    try:
        with open(config) as f:
            exec(compile(f.read(), config, "exec"), {"get_config": lambda: c, "__file__": config})
        group = "instructors" if user == "instructor" else "students"
        spawner = SimpleNamespace(user=SimpleNamespace(name=user, groups=[SimpleNamespace(name=group)]),
                                  environment=dict(c.Spawner.environment), notebook_dir=None)
        c.Spawner.pre_spawn_hook(spawner)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    pw = pwd.getpwnam(user)
    env = {k: str(v) for k, v in spawner.environment.items()}
    env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user, SHELL="/bin/bash", LANG="C.UTF-8")
    return env


def run_as(site: dict, user: str, argv: list[str], cwd: str | None = None, timeout: float = 600,
           env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**site["env"][user], **(env or {})}
    cmd = ["runuser", "-u", user, "--", "env", "-i"] + [f"{k}={v}" for k, v in env.items()] + argv
    return subprocess.run(cmd, cwd=cwd or os.path.join(site["users"], user), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def py_as(site: dict, user: str, code: str, **kw) -> subprocess.CompletedProcess:
    return run_as(site, user, [os.path.join(VENV, "bin", "python"), "-c", code], **kw)


def json_as(site: dict, user: str, code: str) -> dict:
    """Run ``code`` (which prints one JSON line last) as ``user``; its parsed output."""
    proc = py_as(site, user, code)
    assert proc.returncode == 0, f"{user}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nbgrader(site: dict, user: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cwd = site["course_root"] if user == "instructor" else os.path.join(site["users"], user)
    return run_as(site, user, [os.path.join(VENV, "bin", "nbgrader"), *args], cwd=cwd, timeout=timeout)


# --- the site: users, a scratch exchange and course ---------------------------------------------

def make_exchange(path: str) -> None:
    """The exchange as the hub's setup makes it (and the ``hub`` fixture of conftest.py)."""
    subprocess.run(["bash", os.path.join(HUB, "make-exchange.sh"), path, "instructor", COURSE], check=True)


@pytest.fixture(scope="module")
def site():
    if os.getuid() != 0:
        pytest.skip("runs commands as the hub's Unix users: run as root")
    for path in (os.path.join(VENV, "bin", "python"), HELPER):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: run `make browser-deps` (course/hub/setup.sh --users)")
    for user in ("instructor",) + STUDENTS:
        if subprocess.run(["id", "-u", user], capture_output=True).returncode != 0:
            pytest.fail(f"the demo user {user} does not exist: run course/hub/setup.sh --users")
    tmp = tempfile.mkdtemp(prefix="llmopt-attacks-", dir="/tmp")
    os.chmod(tmp, 0o755)
    users = os.path.join(tmp, "users")
    exchange = os.path.join(tmp, "exchange")
    os.makedirs(users)
    os.chmod(users, 0o755)
    make_exchange(exchange)
    for user in ("instructor",) + STUDENTS:
        d = os.path.join(users, user)
        os.makedirs(d)
        subprocess.run(["chown", "-R", f"{user}:", d], check=True)
        os.chmod(d, 0o700)
    course_root = os.path.join(users, "instructor", COURSE)
    subprocess.run(["bash", os.path.join(HUB, "copy-course.sh"), course_root, "instructor"], check=True)
    s = {"tmp": tmp, "users": users, "exchange": exchange, "course_root": course_root,
         "inbound": os.path.join(exchange, COURSE, "inbound")}
    s["env"] = {u: spawn_env(u, s) for u in ("instructor",) + STUDENTS}
    try:
        yield s
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cheat_source(name: str) -> str:
    """A solution cell that takes ``name`` from the reference module, wherever it can find it."""
    return f'''import glob as _glob, importlib as _il, importlib.machinery as _m, os as _os, sys as _sys
def _reference():
    try:
        return _il.import_module("llmopt.kv_cache")
    except ImportError:
        pass
    roots = list(_sys.path) + _glob.glob(_os.path.join(_sys.prefix, "lib", "python3*", "site-packages"))
    roots += ["{PREFIX}/course/lib", "{PREFIX}/student/lib", "{REPO}/lib"]
    for root in roots:
        for p in (_glob.glob(_os.path.join(root, "llmopt", "kv_cache.py"))
                  + _glob.glob(_os.path.join(root, "llmopt", "__pycache__", "kv_cache.*.pyc"))):
            try:
                cls = _m.SourcelessFileLoader if p.endswith(".pyc") else _m.SourceFileLoader
                loader = cls("_ref_kv_cache", p)
                mod = type(_sys)("_ref_kv_cache")
                mod.__file__ = p
                loader.exec_module(mod)
                return mod
            except Exception:
                pass
    raise ImportError("no reference of kv_cache found")
{name} = _reference().{name}
'''


CHEAT = {"kv_cache_bytes_impl": "kv_cache_bytes", "KVCache_impl": "KVCache", "generate_impl": "generate"}
HONEST = "cached_attention_impl"  # student1 answers this part itself: the grader's control
STUDENT2_MARK = "# STUDENT2-OWN-WORK"


def _solution_answer(grade_id: str) -> str:
    with open(os.path.join(REPO, "solutions", LAB, f"{LAB}.ipynb")) as f:
        nb = json.load(f)
    for cell in nb["cells"]:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            return "\n".join(line for line in src.splitlines() if "### " not in line) + "\n"
    raise KeyError(grade_id)


def _notebook_with(answers: dict[str, str]) -> dict:
    with open(os.path.join(REPO, "labs", LAB, f"{LAB}.ipynb")) as f:
        nb = json.load(f)
    for cell in nb["cells"]:
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if gid in answers:
            cell["source"] = answers[gid]
    return nb


@pytest.fixture(scope="module")
def submitted(site):
    """The instructor releases lab01; student1 submits a notebook that loads the reference,
    student2 its own work (nbgrader's release, fetch and submit, as each user)."""
    proc = nbgrader(site, "instructor", "release_assignment", LAB, "--force")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    answers = {"student1": {**{gid: _cheat_source(name) for gid, name in CHEAT.items()},
                            HONEST: _solution_answer(HONEST)},
               "student2": {"kv_cache_bytes_impl": STUDENT2_MARK + "\nraise NotImplementedError()\n"}}
    for user in STUDENTS:
        proc = nbgrader(site, user, "fetch_assignment", LAB)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        path = os.path.join(site["users"], user, LAB, f"{LAB}.ipynb")
        nb = json.dumps(_notebook_with(answers[user]))
        code = f"open({path!r}, 'w').write({nb!r})"
        assert py_as(site, user, code).returncode == 0
        proc = nbgrader(site, user, "submit", LAB)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    names = {}
    for name in os.listdir(site["inbound"]):
        names[name.split("+")[0]] = name
    assert set(names) == set(STUDENTS), names
    return names


def collect(site: dict) -> tuple[subprocess.CompletedProcess, dict]:
    """A fresh ``nbgrader collect`` as the instructor: (process, {student: {file: text}})."""
    sub = os.path.join(site["course_root"], ".grading", "submitted")
    shutil.rmtree(sub, ignore_errors=True)
    proc = nbgrader(site, "instructor", "collect", LAB)
    got = {}
    if os.path.isdir(sub):
        for student in os.listdir(sub):
            d = os.path.join(sub, student, LAB)
            files = {}
            for root, _, names in os.walk(d):
                for n in names:
                    p = os.path.join(root, n)
                    with open(p, errors="replace") as f:
                        files[os.path.relpath(p, d)] = f.read()
            got[student] = files
    return proc, got


def plant(site: dict, user: str, code: str) -> None:
    proc = py_as(site, user, code)
    assert proc.returncode == 0, f"{user} could not plant: {proc.stderr[-2000:]}"


def stamp(hours: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S.000000 UTC", time.gmtime(T0 + 3600 * hours))


def solution_text() -> str:
    with open(os.path.join(REPO, "solutions", LAB, f"{LAB}.ipynb")) as f:
        return f.read()


SOLUTION_MARK = "### BEGIN SOLUTION"


# === students and the reference implementations =============================================

def test_student_imports_support_modules_but_no_reference(site):
    """Attack: ``import llmopt.gptq`` (every reference) from a student's kernel or terminal."""
    code = ("import importlib, json\nout = {}\n"
            f"for m in {[f'llmopt.{m}' for m in REFERENCES] + SUPPORT + TRUSTED_GRADER!r}:\n"
            "    try:\n        importlib.import_module(m); out[m] = 'imported'\n"
            "    except Exception as e:\n        out[m] = type(e).__name__\n"
            "from autograder import check\ncheck('kv_cache_bytes', print)\nprint(json.dumps(out))")
    proc = py_as(site, "student1", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "[check 'kv_cache_bytes' runs when the notebook is graded]" in proc.stdout
    leaked = [m for m in REFERENCES if out[f"llmopt.{m}"] == "imported"]
    assert not leaked, f"a student imports the references {leaked}"
    trusted = [m for m in TRUSTED_GRADER if out[m] == "imported"]
    assert not trusted, f"a student imports the grader's trusted modules {trusted}"
    missing = {m: out[m] for m in SUPPORT if out[m] != "imported"}
    assert not missing, f"a student cannot import the support modules {missing}"


def test_student_finds_no_reference_solution_or_check_file(site):
    """Attack: read the reference's source or bytecode (the venv's site-packages, its
    __pycache__, any copy of the course), a solution notebook or a hidden check, anywhere a
    hub user may look."""
    names = sorted({f"{m}.py" for m in REFERENCES} | {"checks", "solutions"})
    roots = [PREFIX, REPO, "/srv", "/home", site["tmp"]]
    code = f"""import json, os
names = {names!r}; refs = {REFERENCES!r}; found = []
for top in {roots!r}:
    for root, dirs, files in os.walk(top):
        for d in list(dirs):
            if d in ("solutions", "checks") and os.access(os.path.join(root, d), os.R_OK | os.X_OK):
                inner = os.listdir(os.path.join(root, d))
                if any(n.endswith((".ipynb", ".py")) for n in inner):
                    found.append(os.path.join(root, d))
        for f in files:
            stem, parts = f.split(".")[0], root.split(os.sep)
            in_llmopt = parts[-1] == "llmopt" or parts[-2:] == ["llmopt", "__pycache__"]
            if in_llmopt and f.endswith((".py", ".pyc")) and stem in refs \\
                    and os.access(os.path.join(root, f), os.R_OK):
                found.append(os.path.join(root, f))
print(json.dumps(found))"""
    found = json_as(site, "student1", code)
    assert found == [], f"a student reads references, solutions or checks:\n" + "\n".join(found[:40])


def test_student_cannot_read_any_course_copy(site):
    """Attack: open the solution notebook and the hidden checks of each copy of the course
    (the grader's <prefix>/course, an instructor's course root, the administrator's checkout)."""
    targets = []
    for root in (os.path.join(PREFIX, "course"), site["course_root"], REPO,
                 os.path.join(pwd.getpwnam("instructor").pw_dir, COURSE)):
        for rel in (f"solutions/{LAB}/{LAB}.ipynb", f"autograder/checks/{LAB}.py"):
            if os.path.exists(os.path.join(root, rel)):
                targets.append(os.path.join(root, rel))
    assert any(t.startswith(os.path.join(PREFIX, "course")) for t in targets), \
        "setup.sh installed no grader's course copy"
    code = f"""import json
out = {{}}
for p in {targets!r}:
    try:
        open(p).read(1); out[p] = "read"
    except OSError as e:
        out[p] = type(e).__name__
print(json.dumps(out))"""
    out = json_as(site, "student2", code)
    readable = [p for p, r in out.items() if r == "read"]
    assert not readable, "a student reads:\n" + "\n".join(readable)
    for d in (os.path.join(PREFIX, "course"), os.path.join(PREFIX, "grading"),
              os.path.join(site["tmp"], "state"), os.path.join(REPO, ".hub")):  # hub states
        if os.path.exists(d):
            st = os.stat(d)
            assert st.st_uid == 0 and st.st_mode & 0o077 == 0, f"{d}: mode {oct(st.st_mode)}"


def test_grader_venv_holds_no_course_package():
    """Attack (through the sandbox): a submission reads the reference from the venv that the
    grading sandbox mounts. The hub's venv must hold no llmopt and no autograder."""
    site_packages = [p for p in os.listdir(os.path.join(VENV, "lib")) if p.startswith("python")]
    leftovers = []
    for sp in site_packages:
        base = os.path.join(VENV, "lib", sp, "site-packages")
        for name in os.listdir(base):
            if name.split(".")[0] in ("llmopt", "autograder") or name.startswith("llm_optimization_labs"):
                leftovers.append(os.path.join(base, name))
            if name.endswith(".pth"):
                with open(os.path.join(base, name)) as f:
                    text = f.read()
                if "llmopt" in text or PREFIX + "/course" in text or REPO in text:
                    leftovers.append(os.path.join(base, name))
    assert not leftovers, f"the hub's venv holds the course: {leftovers}"


def test_published_list_decides_what_students_import(tmp_path):
    """Only support modules by default; a lab's references once published; a new module is
    hidden until its lab is published; a typo in the list is an error, not a silent leak."""
    files, hidden = student_lib.plan(REPO, str(tmp_path / "none.txt"))
    assert set(REFERENCES) <= set(hidden)
    assert not any(f.startswith(os.path.join("autograder", "checks")) for f in files)
    pub = tmp_path / "published.txt"
    pub.write_text("# past the deadline\nlab01_kv_cache\n")
    files, hidden = student_lib.plan(REPO, str(pub))
    assert os.path.join("lib", "llmopt", "kv_cache.py") in files and "kv_cache" not in hidden
    assert "gptq" in hidden
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "lib"), repo / "lib", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copytree(os.path.join(REPO, "autograder"), repo / "autograder",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "lib" / "llmopt" / "speculative.py").write_text("def answer(): return 42\n")
    files, hidden = student_lib.plan(str(repo), str(pub))
    assert "speculative" in hidden
    pub.write_text("lab01_kv_cache\nllmopt/kv_cache.py\n")
    with pytest.raises(ValueError):
        student_lib.plan(REPO, str(pub))
    # the installed student library holds only what the repository's list allows
    installed = os.path.join(PREFIX, "student", "lib")
    visible = student_lib.visible_modules()
    have = sorted(os.path.relpath(os.path.join(r, f), installed) for r, _, fs in os.walk(installed)
                  for f in fs if f.endswith((".py", ".pyc")))
    assert any(h == os.path.join("llmopt", "gpt.py") for h in have), "no student library installed"
    extra = [h for h in have if h.startswith("llmopt" + os.sep) and h.split(os.sep)[1] not in ("viz", "assets")
             and os.path.basename(h).split(".")[0] not in visible]
    extra += [h for h in have if h.startswith("autograder" + os.sep)
              and h.split(os.sep)[1] not in ("__init__.py", "record.py", "cases", "__pycache__")]
    extra += [h for h in have if h.startswith(os.path.join("autograder", "__pycache__"))
              and os.path.basename(h).split(".")[0] not in ("__init__", "record")]
    assert not extra, f"the student library holds {extra}"


# === the exchange ==============================================================================

def test_exchange_modes(site):
    """The exchange root is sticky (1777); the course folder and its subfolders are the
    instructor's, with nbgrader's modes (inbound sticky too)."""
    exchanges = [site["exchange"]]
    if os.path.isdir("/srv/nbgrader/exchange"):
        exchanges.append("/srv/nbgrader/exchange")  # the demo's, made by setup.sh --users
    for ex in exchanges:
        st = os.stat(ex)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o1777), f"{ex}: {oct(st.st_mode)}"
        want = {"": 0o755, "outbound": 0o755, "inbound": 0o3733, "feedback": 0o711}
        for sub, mode in want.items():
            p = os.path.join(ex, COURSE, sub)
            st = os.stat(p)
            assert pwd.getpwuid(st.st_uid).pw_name == "instructor", p
            assert stat.S_IMODE(st.st_mode) == mode, f"{p}: {oct(st.st_mode)}, want {oct(mode)}"


def test_student_cannot_take_the_course_name_before_the_first_release(site):
    """Attack: before the instructor's first release, a student makes the course folder of a
    fresh exchange (and so owns outbound: every later release is the student's to plant)."""
    ex = os.path.join(site["tmp"], "fresh-exchange")
    make_exchange(ex)
    code = f"""import os
try:
    os.makedirs("{ex}/{COURSE}/outbound/{LAB}"); print("done")
except OSError as e:
    print(type(e).__name__)"""
    proc = py_as(site, "student2", code)
    assert proc.stdout.strip() == "PermissionError", proc.stdout + proc.stderr
    owner = pwd.getpwuid(os.stat(os.path.join(ex, COURSE)).st_uid).pw_name
    assert owner == "instructor", f"the course folder belongs to {owner}"


def test_student_cannot_replace_the_course_or_plant_a_release(site, submitted):
    """Attack (after a release): rename the course folder of the exchange and put one's own
    in its place with a planted release; or write into outbound; or list the inbound folder."""
    ex = site["exchange"]
    code = f"""import json, os
out = {{}}
def attempt(name, fn):
    try:
        fn(); out[name] = "done"
    except OSError as e:
        out[name] = type(e).__name__
attempt("rename course", lambda: os.rename("{ex}/{COURSE}", "{ex}/stolen"))
attempt("plant course", lambda: os.makedirs("{ex}/{COURSE}/outbound/{LAB}"))
attempt("plant release", lambda: os.mkdir("{ex}/{COURSE}/outbound/lab99_planted"))
attempt("list inbound", lambda: os.listdir("{ex}/{COURSE}/inbound"))
attempt("rmdir feedback", lambda: os.rmdir("{ex}/{COURSE}/feedback"))
print(json.dumps(out))"""
    try:
        out = json_as(site, "student1", code)
    finally:  # put the course back if the attack worked
        if os.path.isdir(os.path.join(ex, "stolen")):
            shutil.rmtree(os.path.join(ex, COURSE), ignore_errors=True)
            os.rename(os.path.join(ex, "stolen"), os.path.join(ex, COURSE))
    assert set(out.values()) <= {"PermissionError", "FileExistsError"}, out
    assert pwd.getpwuid(os.stat(os.path.join(ex, COURSE)).st_uid).pw_name == "instructor"


def test_collect_refuses_a_submission_in_another_students_name(site, submitted):
    """Attack: student2 writes into inbound a submission named as student1's (a later one)."""
    forged = os.path.join(site["inbound"], f"student1+{LAB}+{stamp(1)}")
    nb = json.dumps(_notebook_with({"kv_cache_bytes_impl": "# FORGED BY STUDENT2\n"}))
    plant(site, "student2", f"import os\nos.mkdir({forged!r})\n"
                            f"open({forged!r} + '/{LAB}.ipynb', 'w').write({nb!r})\n"
                            f"open({forged!r} + '/timestamp.txt', 'w').write({stamp(1)!r})")
    try:
        proc, got = collect(site)
    finally:
        shutil.rmtree(forged)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FORGED BY STUDENT2" not in got["student1"].get(f"{LAB}.ipynb", ""), \
        "the forged submission was collected as student1's"
    assert "_reference()" in got["student1"][f"{LAB}.ipynb"], "student1's own submission was not collected"
    assert "Refusing" in proc.stderr and "belongs to student2" in proc.stderr, proc.stderr[-2000:]


def test_collect_refuses_a_symlink_to_the_solutions(site, submitted):
    """Attack: student1's inbound entry is a symlink to the instructor's solution folder."""
    link = os.path.join(site["inbound"], f"student1+{LAB}+{stamp(2)}")
    target = os.path.join(site["course_root"], "solutions", LAB)
    plant(site, "student1", f"import os\nos.symlink({target!r}, {link!r})")
    try:
        proc, got = collect(site)
    finally:
        os.unlink(link)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(SOLUTION_MARK in text for text in got.get("student1", {}).values()), \
        "the instructor's solution was collected as student1's submission"
    assert "_reference()" in got["student1"][f"{LAB}.ipynb"]


def test_collect_copies_no_symlink_inside_a_submission(site, submitted):
    """Attack: student1's (own, later) submission holds its notebook as a symlink to the
    instructor's solution notebook; student2's a symlink to student1's submitted notebook."""
    s1 = os.path.join(site["inbound"], f"student1+{LAB}+{stamp(3)}")
    s2 = os.path.join(site["inbound"], f"student2+{LAB}+{stamp(3)}")
    solution = os.path.join(site["course_root"], "solutions", LAB, f"{LAB}.ipynb")
    theirs = os.path.join(site["inbound"], submitted["student1"], f"{LAB}.ipynb")
    for user, d, target in (("student1", s1, solution), ("student2", s2, theirs)):
        plant(site, user, f"import os\nos.mkdir({d!r})\nos.symlink({target!r}, {d!r} + '/{LAB}.ipynb')\n"
                          f"os.symlink('/etc/hostname', {d!r} + '/hostname')\n"
                          f"open({d!r} + '/timestamp.txt', 'w').write({stamp(3)!r})")
    try:
        proc, got = collect(site)
    finally:
        shutil.rmtree(s1)
        shutil.rmtree(s2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(SOLUTION_MARK in t for t in got.get("student1", {}).values()), \
        "the instructor's solution was collected through a symlink"
    assert not any("_reference()" in t for t in got.get("student2", {}).values()), \
        "student1's notebook was collected as student2's"
    assert not any("hostname" in files for files in got.values()), "a symlink to /etc/hostname was collected"
    assert "symlink" in proc.stderr


def test_student_cannot_write_into_another_students_submission(site, submitted):
    """Attack: student2, who learned the name of student1's submission, deletes student1's
    notebook from it and puts its own in its place (nbgrader leaves the folder 0777)."""
    theirs = os.path.join(site["inbound"], submitted["student1"])
    code = f"""import json, os
out = {{}}
for name, fn in (("unlink", lambda: os.unlink("{theirs}/{LAB}.ipynb")),
                 ("create", lambda: open("{theirs}/planted.ipynb", "w").write("x")),
                 ("rename", lambda: os.rename("{theirs}", "{theirs}-moved"))):
    try:
        fn(); out[name] = "done"
    except OSError as e:
        out[name] = type(e).__name__
print(json.dumps(out))"""
    out = json_as(site, "student2", code)
    assert set(out.values()) == {"PermissionError"}, out
    assert stat.S_IMODE(os.stat(theirs).st_mode) == 0o755


def test_collect_survives_a_malformed_entry(site, submitted):
    """Attack: an inbound entry whose name does not parse stops the whole collection."""
    bad = os.path.join(site["inbound"], f"student1+{LAB}+not-a-time")
    plant(site, "student1", f"import os\nos.mkdir({bad!r})")
    try:
        proc, got = collect(site)
    finally:
        os.rmdir(bad)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(got) == set(STUDENTS)
    assert STUDENT2_MARK in got["student2"][f"{LAB}.ipynb"]


# === grading =================================================================================

def helper(site: dict, user: str, *args: str, timeout: float = 900, cwd: str | None = None):
    return run_as(site, user, ["sudo", "-n", HELPER, *args], timeout=timeout, cwd=cwd)


def test_student_cannot_run_the_grading_helper(site):
    proc = helper(site, "student1", LAB, "student1", "/tmp/x.ipynb", "/tmp")
    assert proc.returncode != 0
    assert "password is required" in proc.stderr or "not allowed" in proc.stderr, proc.stderr


def test_submission_that_loads_the_reference_scores_nothing(site, submitted):
    """Attack: student1's notebook imports llmopt.kv_cache, or loads its source or bytecode
    from any path it can think of, inside the grading sandbox (the hub's grader, as the
    formgrader's Autograde runs it).
    And (instructor): the helper runs from a folder holding an ``autograder`` package of the
    instructor's: ``python -m autograder.verify`` (the grader's verifier, as root) must not
    import it (``-m`` puts the current folder first on sys.path)."""
    proc, got = collect(site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = os.path.join(site["course_root"], ".grading")
    nb = os.path.join(workdir, "submitted", "student1", LAB, f"{LAB}.ipynb")
    evil = os.path.join(site["users"], "instructor", "evil")
    pwned = os.path.join(site["tmp"], "pwned-by-root")  # site["tmp"]: only root may write there
    payload = f"import os\ntry:\n    open({pwned!r}, 'w').write(str(os.getuid()))\nexcept OSError:\n    pass\n"
    plant(site, "instructor", f"import os\nos.makedirs({evil!r} + '/autograder')\n"
                              f"open({evil!r} + '/autograder/__init__.py', 'w').write({payload!r})\n"
                              f"open({evil!r} + '/autograder/verify.py', 'w').write({payload!r})")
    proc = helper(site, "instructor", LAB, "student1", nb, workdir, cwd=evil)
    assert not os.path.exists(pwned), "root imported the instructor's autograder package"
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "graded", result["message"]
    scores = {gid: c["score"] for gid, c in result["cells"].items()}
    control = "check_" + HONEST.removesuffix("_impl")
    assert scores[control] == result["cells"][control]["max"] > 0, \
        f"the grader did not score student1's honest answer: {result['cells'][control]['message']}"
    cheats = {gid: s for gid, s in scores.items() if gid != control}
    assert not any(cheats.values()), f"the reference reached the sandbox: {scores}"
    for gid in cheats:
        assert "could not be judged" not in result["cells"][gid]["message"], result["cells"][gid]["message"]
    # the result is in the instructor's grading folder, the instructor's (nbgrader reads it)
    out = result["out_dir"]
    assert out.startswith(workdir + os.sep), out
    for root, dirs, files in os.walk(os.path.join(workdir, "results")):
        for n in dirs + files:
            st = os.lstat(os.path.join(root, n))
            assert pwd.getpwuid(st.st_uid).pw_name == "instructor", os.path.join(root, n)


@pytest.fixture
def rootzone(site):
    """A root-owned folder with a root-owned file: a stand-in for /etc."""
    d = os.path.join(site["tmp"], "rootzone")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    keep = os.path.join(d, "keep")
    with open(keep, "w") as f:
        f.write("root's\n")
    os.chmod(keep, 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tree_owners(path: str) -> dict:
    out = {}
    for root, dirs, files in os.walk(path):
        for n in [""] + dirs + files:
            p = os.path.join(root, n) if n else root
            out[p] = os.lstat(p).st_uid
    return out


def test_helper_follows_no_symlink_in_the_workdir(site, rootzone):
    """Attack (instructor): ``results`` and ``secret`` of the grading folder are symlinks into
    a root-owned folder (think /etc); the root helper writes and chowns through them."""
    wd = os.path.join(site["users"], "instructor", "wd-attack")
    nb = os.path.join(wd, "sub.ipynb")
    keep = os.path.join(rootzone, "keep")
    plant(site, "instructor", f"import os\nos.mkdir({wd!r})\nos.symlink({rootzone!r}, {wd!r} + '/results')\n"
                              f"os.symlink({keep!r}, {wd!r} + '/secret')\n"
                              f"open({nb!r}, 'w').write('not a notebook')")
    before = _tree_owners(rootzone)
    try:
        proc = helper(site, "instructor", LAB, "student1", nb, wd, timeout=300)
        after = _tree_owners(rootzone)
        with open(keep) as f:
            kept = f.read()
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    assert after == before, f"the helper changed a root-owned tree:\n{before}\n{after}\n{proc.stderr[-2000:]}"
    assert kept == "root's\n"


def test_helper_refuses_a_symlinked_workdir_and_root_only_notebooks(site):
    """Attack (instructor): the workdir path goes through a symlink; the notebook is a
    symlink to a file only root may read (the grader's solution notebook)."""
    home = os.path.join(site["users"], "instructor")
    real, link = os.path.join(home, "wd-real"), os.path.join(home, "wd-link")
    secret_nb = os.path.join(PREFIX, "course", "solutions", LAB, f"{LAB}.ipynb")
    plant(site, "instructor", f"import os\nos.mkdir({real!r})\nos.symlink({real!r}, {link!r})\n"
                              f"os.symlink({secret_nb!r}, {real!r} + '/sub.ipynb')")
    try:
        via_link = helper(site, "instructor", LAB, "student1", os.path.join(link, "sub.ipynb"), link, timeout=300)
        root_only = helper(site, "instructor", LAB, "student1", os.path.join(real, "sub.ipynb"), real, timeout=300)
        leftovers = sorted(os.listdir(real))
    finally:
        shutil.rmtree(real, ignore_errors=True)
        os.unlink(link)
    assert via_link.returncode != 0 and "symlink" in via_link.stderr, via_link.stderr[-2000:]
    assert root_only.returncode != 0, root_only.stdout[-2000:]
    assert SOLUTION_MARK not in root_only.stdout + root_only.stderr
    assert leftovers == ["sub.ipynb"], leftovers


def test_collector_copies_only_the_students_regular_files(tmp_path):
    """The collector itself (in-process, as root): an entry swapped for a symlink after the
    owner check is refused; inside an entry, symlinks, FIFOs (a FIFO would hang nbgrader's
    copytree) and files of someone else are left out."""
    sys.path.insert(0, os.path.join(HUB, "config", "instructor"))
    import hub_collect
    from nbgrader.coursedir import CourseDirectory

    pw = pwd.getpwnam("student1")
    collector = hub_collect.SafeExchangeCollect(coursedir=CourseDirectory())
    entry = tmp_path / f"student1+{LAB}+{stamp(0)}"
    (entry / "sub").mkdir(parents=True)
    (entry / f"{LAB}.ipynb").write_text("mine")
    (entry / "sub" / "notes.txt").write_text("mine too")
    (entry / "theirs.txt").write_text("root's")
    os.mkfifo(entry / "pipe")
    os.symlink("/etc/hostname", entry / "hostname")
    for p in [entry, entry / "sub", entry / f"{LAB}.ipynb", entry / "sub" / "notes.txt", entry / "pipe"]:
        os.lchown(p, pw.pw_uid, pw.pw_gid)
    dest = tmp_path / "out"
    collector.do_copy(str(entry), str(dest))
    got = sorted(os.path.relpath(os.path.join(r, f), dest) for r, _, fs in os.walk(dest) for f in fs)
    assert got == [f"{LAB}.ipynb", os.path.join("sub", "notes.txt")], got
    # an entry that is (now) a symlink to a folder of the student's: refused, nothing copied
    link = tmp_path / f"student1+{LAB}+{stamp(1)}"
    os.symlink(entry, link)
    collector.do_copy(str(link), str(tmp_path / "out2"))
    assert not os.path.exists(tmp_path / "out2")
