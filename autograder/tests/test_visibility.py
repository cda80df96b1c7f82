"""What each lab's sandbox shows of ``llmopt`` (fast, no sandbox run).

A lab declares the support modules its notebook needs (``LLMOPT_VISIBLE`` beside its
checks); the sandbox copies those and their imports and nothing else. These tests prove,
for every lab, that nothing visible defines a function or class the lab asks the student to
write — wherever in llmopt it would live — and that the declaration covers what the
notebook imports.
"""
import ast
import json
import os
import re

import pytest

from autograder import course
from autograder.notebook import cell_source, nbgrader_meta

LABS = course.labs()


def asked_names(lab):
    """Top-level functions and classes the lab's answer cells define."""
    with open(course.source_notebook(lab)) as f:
        nb = json.load(f)
    names = set()
    for cell in nb["cells"]:
        if nbgrader_meta(cell).get("solution") and cell["cell_type"] == "code":
            tree = ast.parse(re.sub(r"(?m)^\s*[%!].*$", "", cell_source(cell)))
            names |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names


def defined_names(module):
    with open(course._module_file(module)) as f:
        tree = ast.parse(f.read())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("lab", LABS)
def test_no_visible_module_defines_what_the_lab_asks_for(lab):
    asked = asked_names(lab)
    assert asked, lab
    for module in course.visible_modules(lab):
        clash = asked & defined_names(module)
        assert not clash, f"{lab}'s sandbox shows llmopt.{module}, which defines {sorted(clash)}"


@pytest.mark.parametrize("lab", LABS)
def test_the_notebook_imports_only_visible_modules(lab):
    with open(course.source_notebook(lab)) as f:
        code = "\n".join(cell_source(c) for c in json.load(f)["cells"] if c["cell_type"] == "code")
    imported = set(re.findall(r"(?m)^\s*from llmopt\.([\w.]+) import", code))
    imported |= set(re.findall(r"(?m)^\s*import llmopt\.([\w.]+)", code))
    hidden = imported - set(course.visible_modules(lab))
    assert not hidden, f"{lab}'s notebook imports llmopt.{sorted(hidden)}, hidden from its sandbox"


def test_an_undeclared_new_module_is_hidden_everywhere(tmp_path, monkeypatch):
    for lab in LABS:  # a lab's reference is visible only to a later lab that declares it
        declared = set(course.lab_checks(lab).LLMOPT_VISIBLE)
        for module in ("paged_attention", "moe", "scheduler", "lora", "sparsity"):
            assert module not in course.visible_modules(lab) or module in declared, (lab, module)


def test_the_sandbox_copy_holds_only_visible_modules(tmp_path):
    from autograder.sandbox import _copy_visible

    lab = "lab07_gptq"
    _copy_visible(course.visible_modules(lab), str(tmp_path / "llmopt"))
    files = {os.path.relpath(os.path.join(d, f), tmp_path / "llmopt")
             for d, _, fs in os.walk(tmp_path / "llmopt") for f in fs}
    assert "gptq.py" not in files and "kv_cache.py" not in files and "zero.py" not in files
    assert "__init__.py" in files and "gpt.py" in files
    assert not any("__pycache__" in f for f in files)


def test_every_declared_module_exists_on_the_hub_as_support_or_an_earlier_labs_reference():
    """What a lab's notebook imports (LLMOPT_VISIBLE) must be importable by its students on the
    hub: a support module, or the reference of a lab that comes before it (published first)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "student_lib", os.path.join(course.REPO, "course", "hub", "student_lib.py"))
    student_lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(student_lib)
    owner = {m: lab for lab, mods in student_lib.REFERENCES.items() for m in mods}
    order = list(student_lib.REFERENCES)
    for lab in LABS:
        for module in course.lab_checks(lab).LLMOPT_VISIBLE:
            top = module.split(".")[0]
            if top in student_lib.SUPPORT_MODULES or top in student_lib.SUPPORT_PACKAGES:
                continue
            assert top in owner, f"{lab} declares llmopt.{module}: neither support nor any lab's reference"
            assert order.index(owner[top]) < order.index(lab), \
                f"{lab} declares llmopt.{module}, the reference of {owner[top]}, which does not come before it"
