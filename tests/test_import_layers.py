"""Imports flow one way (DESIGN.md): cli -> peft_model/training/serving/advisor -> tuner ->
methods/checkpoint/quant -> registry/targeting/surgery/adapter_set -> config. Checked on the
source, every import statement (module level and inside functions), so a cycle cannot creep back."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "deltatune"

# module (dotted, relative to deltatune) -> package prefixes it must never import
FORBIDDEN = {
    "config": ["deltatune."],
    "adapter_set": ["deltatune."],
    "registry": ["deltatune.methods", "deltatune.peft_model", "deltatune.tuner", "deltatune.checkpoint"],
    "targeting": ["deltatune.methods", "deltatune.peft_model", "deltatune.tuner", "deltatune.checkpoint"],
    "surgery": ["deltatune."],
    "methods": ["deltatune.peft_model", "deltatune.tuner", "deltatune.checkpoint", "deltatune.serving",
                "deltatune.training", "deltatune.quant"],
    "checkpoint": ["deltatune.peft_model", "deltatune.tuner", "deltatune.methods", "deltatune.training",
                   "deltatune.quant"],
    "tuner": ["deltatune.peft_model", "deltatune.training", "deltatune.checkpoint"],
}
# peft's API puts file IO on the config class; these two delegate down to checkpoint/.
ALLOWED = {("config", "deltatune.checkpoint.peft_format")}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _files(key: str) -> list[Path]:
    target = ROOT / key.replace(".", "/")
    return sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]


@pytest.mark.parametrize("key", sorted(FORBIDDEN))
def test_no_upward_imports(key):
    bad = []
    for path in _files(key):
        for name in _imports(path):
            for prefix in FORBIDDEN[key]:
                if (name + ".").startswith(prefix) and (key, name.rpartition(".")[0]) not in ALLOWED \
                        and (key, name) not in ALLOWED and \
                        not name.startswith(f"deltatune.{key}"):
                    bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "\n".join(bad)
