"""The course library students may import on the hub: ``llmopt`` without the references.

    python course/hub/student_lib.py DEST [--published FILE] [--repo REPO]
    python course/hub/student_lib.py --list [--published FILE]   # what students get, no copy

Builds ``DEST/llmopt`` and ``DEST/autograder`` (setup.sh: ``<prefix>/student/lib``, which is
students' ``PYTHONPATH`` on the hub; the hub's venv holds no course package at all).

* ``llmopt``: only the **support** modules below (the model, data, widgets, benchmarks,
  test helpers, assets) plus the reference modules of the labs named in the published list
  (``course/hub/published.txt``: labs past their deadline, or single ``llmopt.<module>``
  lines). Every other module is left out, so a reference module added to ``lib/llmopt`` later
  is hidden until its lab is published.
* ``autograder``: only what ``check()`` needs in a student's kernel (``__init__.py``,
  ``record.py``, ``cases/``: the cases hold inputs, never expected values). No ``checks/``,
  no verifier, no grader.

Only ``.py`` sources are copied (never a ``__pycache__`` of a hidden module); the copy is then
byte-compiled so that students' imports need not write bytecode.
"""
from __future__ import annotations

import argparse
import compileall
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PUBLISHED = os.path.join(HERE, "published.txt")

# llmopt modules every student may import: what the labs' notebooks and the hidden checks'
# cases use besides the module under study. Anything not listed here is hidden by default.
SUPPORT_MODULES = {"__init__", "gpt", "data", "bench", "testing", "train", "launch", "instructions"}
SUPPORT_PACKAGES = {"viz"}        # every .py file under llmopt/viz/
SUPPORT_DATA = {"assets"}         # llmopt/assets/ (the tiny model, the corpus manifest): all files

# The reference modules of each lab: published (importable by students) once the lab is
# listed in published.txt. A lab missing here publishes nothing but its name is accepted.
# Some labs build on an earlier lab's reference (their LLMOPT_VISIBLE names it): lab03 on
# lab02's paged_attention, lab09 on lab08's nf4, hw01 on lab07's gptq and lab08's int8/nf4.
# Publish the earlier lab before releasing the later one (autograder/tests/test_visibility.py
# checks that every declared reference belongs to an earlier lab in this order).
REFERENCES = {
    "lab01_kv_cache": ["kv_cache"],
    "lab02_paged_attention": ["paged_attention"],
    "lab03_serving": ["scheduler"],
    "lab04_flash_attention": ["flash_attention"],
    "lab05_memory_efficient_training": ["checkpointing", "mixed_precision"],
    "lab06_zero_fsdp": ["zero", "parallel"],
    "lab07_gptq": ["gptq"],
    "lab08_int8_nf4": ["int8", "nf4"],
    "lab09_qlora": ["lora"],
    "lab10_moe": ["moe"],
    "hw01_compression": ["sparsity"],
}

# The in-kernel half of the autograder (see autograder/record.py): nothing that judges.
AUTOGRADER_FILES = ["__init__.py", "record.py"]
AUTOGRADER_PACKAGES = ["cases"]

_LAB = re.compile(r"^[A-Za-z0-9_]+$")
_MODULE = re.compile(r"^llmopt\.([A-Za-z_][A-Za-z0-9_]*)$")


def read_published(path: str = PUBLISHED) -> tuple[list[str], list[str]]:
    """(labs, single modules) named in ``path``; ``#`` starts a comment; a missing file is empty."""
    labs, modules = [], []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return [], []
    for n, line in enumerate(lines, 1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        m = _MODULE.match(word)
        if m:
            modules.append(m.group(1))
        elif _LAB.match(word) and (word in REFERENCES or word.startswith(("lab", "hw"))):
            labs.append(word)
        else:
            raise ValueError(f"{path}:{n}: {word!r} is neither a lab id (e.g. lab01_kv_cache) "
                             "nor a module (llmopt.<name>)")
    return labs, modules


def visible_modules(published: str = PUBLISHED) -> set[str]:
    """Top-level ``llmopt`` modules (without .py) students may import."""
    labs, modules = read_published(published)
    visible = set(SUPPORT_MODULES) | set(modules)
    for lab in labs:
        visible |= set(REFERENCES.get(lab, []))
    return visible


def plan(repo: str = REPO, published: str = PUBLISHED) -> tuple[list[str], list[str]]:
    """(files to copy, relative to ``repo``; llmopt modules left out)."""
    lib = os.path.join(repo, "lib", "llmopt")
    visible = visible_modules(published)
    copy, hidden = [], []
    for name in sorted(os.listdir(lib)):
        path = os.path.join(lib, name)
        if os.path.islink(path):
            continue
        if os.path.isdir(path):
            if name in SUPPORT_DATA or name in SUPPORT_PACKAGES:
                for root, dirs, files in os.walk(path):
                    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                    for f in sorted(files):
                        if name in SUPPORT_DATA or f.endswith(".py"):
                            copy.append(os.path.relpath(os.path.join(root, f), repo))
            elif name != "__pycache__":
                hidden.append(name + "/")
        elif name.endswith(".py") and name[:-3] in visible:
            copy.append(os.path.relpath(path, repo))
        elif name.endswith(".py"):
            hidden.append(name[:-3])
    grader = os.path.join(repo, "autograder")
    for f in AUTOGRADER_FILES:
        copy.append(os.path.join("autograder", f))
    for pkg in AUTOGRADER_PACKAGES:
        for f in sorted(os.listdir(os.path.join(grader, pkg))):
            if f.endswith(".py"):
                copy.append(os.path.join("autograder", pkg, f))
    return copy, hidden


def broken_imports(files: list[str], hidden: list[str], repo: str = REPO) -> list[str]:
    """'<file> imports llmopt.<hidden>' for every visible module that needs a hidden one."""
    import ast

    hidden = set(hidden)
    out = []
    for rel in files:
        if not (rel.endswith(".py") and rel.startswith(os.path.join("lib", "llmopt"))):
            continue
        parts = rel.split(os.sep)[2:-1]  # the module's package below llmopt
        with open(os.path.join(repo, rel)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("llmopt.")]
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = parts[:len(parts) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                names = [target[0]] if target else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmopt."):
                names = [node.module.split(".")[1]]
            elif isinstance(node, ast.ImportFrom) and node.module == "llmopt":
                names = [a.name for a in node.names]
            out += [f"{rel} imports llmopt.{n}" for n in names if n in hidden]
    # what students run: the released notebooks, and the checks' cases in their kernels
    pattern = re.compile(r"(?:from|import)\s+llmopt\.(\w+)")
    texts = {rel: open(os.path.join(repo, rel)).read() for rel in files
             if rel.startswith(os.path.join("autograder", "cases"))}
    labs = os.path.join(repo, "labs")
    for lab in sorted(os.listdir(labs)) if os.path.isdir(labs) else []:
        nb = os.path.join(labs, lab, f"{lab}.ipynb")
        if os.path.isfile(nb):
            import json
            with open(nb) as f:
                cells = json.load(f).get("cells", [])
            texts[os.path.relpath(nb, repo)] = "\n".join(
                "".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code")
    for rel, text in texts.items():
        out += [f"{rel} imports llmopt.{n}" for n in pattern.findall(text) if n in hidden]
    return sorted(set(out))


def build(dest: str, repo: str = REPO, published: str = PUBLISHED) -> list[str]:
    """Write the student library into ``dest`` (replaced atomically); returns the hidden modules."""
    files, hidden = plan(repo, published)
    dest = os.path.abspath(dest)
    tmp = dest + ".new"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in files:
        out = os.path.join(tmp, rel[len("lib/"):] if rel.startswith("lib" + os.sep) else rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(os.path.join(repo, rel), out)
    compileall.compile_dir(tmp, quiet=1)
    for root, dirs, names in os.walk(tmp):
        os.chmod(root, 0o755)
        for n in names:
            os.chmod(os.path.join(root, n), 0o644)
    old = dest + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dest):
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return hidden


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", nargs="?")
    ap.add_argument("--published", default=PUBLISHED)
    ap.add_argument("--repo", default=REPO)
    ap.add_argument("--list", action="store_true", help="print what students get; copy nothing")
    args = ap.parse_args(argv)
    if args.list or not args.dest:
        files, hidden = plan(args.repo, args.published)
        for line in broken_imports(files, hidden, args.repo):
            print(f"warning: {line}, which students cannot import")
        mods = sorted({f.split(os.sep)[2][:-3] for f in files
                       if f.startswith(os.path.join("lib", "llmopt")) and f.count(os.sep) == 2})
        print("students get llmopt:", ", ".join(mods), "+ viz, assets; autograder: check() and cases")
        print("hidden:", ", ".join(hidden) or "(nothing)")
        return 0
    hidden = build(args.dest, args.repo, args.published)
    print(f"student library in {args.dest}; hidden from students: {', '.join(hidden) or '(nothing)'}")
    files, _ = plan(args.repo, args.published)
    for line in broken_imports(files, hidden, args.repo):
        print(f"warning: {line}, which students cannot import (publish it, or move what the "
              "support module needs into a support module)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
