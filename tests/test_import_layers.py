"""Imports flow one way (DESIGN.md, "Layers that a tool can check"), checked by import-linter.

The contracts live in pyproject.toml (``[tool.importlinter]``): the layers, no cycles between
the modules of any package, no import of the package root from inside it. ``make test`` runs
``lint-imports`` too; this test runs the same contracts through import-linter's Python API, and
shows on a copy of the package that an upward import hidden inside a function, a cycle and an
import of the root each break them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

REPO = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package and pyproject.toml under ``root`` (a fresh process, so
    the import graph is built from ``root``'s files, not the ``deltatune`` already imported)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_contracts_hold():
    from importlinter import configuration
    from importlinter.application import use_cases

    configuration.configure()  # what the lint-imports command does first
    ok = use_cases.lint_imports(config_filename=str(REPO / "pyproject.toml"), no_logo=True, cache_dir=None)
    assert ok, "lint-imports: a contract is broken (run `lint-imports` for the chains)"


# (file, text appended to it, what the report must say)
BREAKS = {
    "upward, inside a function": (
        "deltatune/config.py", "\n\ndef _later():\n    from deltatune.checkpoint import peft_format  # noqa\n",
        "deltatune.config is not allowed to import deltatune.checkpoint"),
    "sideways between siblings": (
        "deltatune/serving/adapters.py", "\n\ndef _later():\n    from deltatune.training import loop  # noqa\n",
        "deltatune.serving is not allowed to import deltatune.training"),
    "a cycle inside a package": (
        "deltatune/training/wrappers.py", "\n\ndef _later():\n    from deltatune.training import loss  # noqa\n",
        "No cycles are allowed in deltatune.training"),
    "the package root": (
        "deltatune/training/data.py", "\n\ndef _later():\n    from deltatune import PeftModel  # noqa\n",
        "deltatune.training.data is not allowed to import deltatune"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_contracts_catch(tmp_path, case):
    shutil.copytree(REPO / "deltatune", tmp_path / "deltatune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path).returncode == 0
    path, text, message = BREAKS[case]
    with open(tmp_path / path, "a", encoding="utf-8") as fh:
        fh.write(text)
    result = _lint(tmp_path)
    assert result.returncode != 0 and message in " ".join(result.stdout.split()), result.stdout[-3000:]
