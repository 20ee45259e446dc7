"""The dependency bounds in pyproject.toml are the ones CI tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    # an extra that names other extras of this project (test = [..., "hf-curvedit[lm-eval,demo]"]) has no bound
    return [r for r in reqs if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "min-versions.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_lower_bound_is_pinned_by_the_lowest_versions_job():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue  # CI can only install the torch build on its disk (see the comment in pyproject.toml)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{req}: give it exactly one tested lower bound (>=)"
        assert pins.get(name) == lower[0], f"{req}: .ci/min-versions.txt must pin {name}=={lower[0]}"
        assert req.specifier.contains(pins[name]), f"{req} does not admit its own pin"


def test_no_pin_without_a_requirement():
    names = {canonicalize_name(r.name) for r in _requirements()}
    assert set(_pins()) <= names


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 2, "README.md gives the default suite's command and the slow suite's"
    assert "pip install" in test_commands[0] and "RUN_SLOW=1" in test_commands[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in test_commands:
        assert command in ci, f".ci/run must run README.md's test command as written: {command}"
    assert ci.index(test_commands[0]) < ci.index(test_commands[1]), "CI runs the default suite first"
