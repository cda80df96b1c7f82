"""environment.yml and pyproject.toml pin the same packages."""
import os
import re
import tomllib

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)


def pyproject_deps() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return {d.replace(" ", "") for d in tomllib.load(f)["project"]["dependencies"]}


def environment_pip_deps() -> set[str]:
    deps, in_pip = set(), False
    with open(os.path.join(ROOT, "environment.yml")) as f:
        for line in f:
            if re.match(r"^\s+- pip:\s*$", line):
                in_pip = True
                continue
            m = re.match(r"^\s{6,}- (.+?)\s*$", line)
            if in_pip and m and m.group(1) != "-e .":
                deps.add(m.group(1).replace(" ", ""))
    return deps


def test_environment_yml_matches_pyproject():
    py, env = pyproject_deps(), environment_pip_deps()
    assert py == env, (f"only in pyproject.toml: {sorted(py - env)}; "
                       f"only in environment.yml: {sorted(env - py)}")


def test_torch_is_pinned():
    assert "torch==2.13.0" in pyproject_deps()


def test_makefile_installs_torch_pinned_in_the_same_step():
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    assert re.search(r"pip install .*torch==2\.13\.0 .*-e \.", text), \
        "torch must be pinned in the same pip command that installs the project"
