"""The one place that swaps a module inside its parent."""
from __future__ import annotations

from torch import nn


def split_name(name: str) -> tuple[str, str]:
    """``"a.b.c"`` -> ``("a.b", "c")``; a top-level name has parent ``""``."""
    parent, _, child = name.rpartition(".")
    return parent, child


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``root.get_submodule(name)`` is; return the module it replaced."""
    parent_name, child = split_name(name)
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
