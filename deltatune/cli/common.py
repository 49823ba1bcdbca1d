"""What several verbs parse the same way: ``--adapter NAME=DIR`` lists and the base-row name."""
from __future__ import annotations

import os
from pathlib import Path

BASE_ROW = "__base__"  # --use name of a row run on the base model without adapter (peft's name)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``--adapter NAME=DIR`` values -> ``{name: dir}`` in order.

    A bare existing directory (the single-adapter form ``--adapter DIR``) is named ``default``.
    """
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not (sep and name and directory and "/" not in name and os.sep not in name):
            if not Path(spec).expanduser().is_dir():
                raise ValueError(f"--adapter {spec!r}: expected NAME=DIR (e.g. --adapter a=runs/a/adapter)")
            name, directory = "default", spec
        if name == BASE_ROW:
            raise ValueError(f"--adapter {spec!r}: the name {BASE_ROW!r} is reserved for the base model "
                             "without adapter")
        if name in adapters:
            hint = " (a bare --adapter DIR is named 'default')" if name == "default" else ""
            raise ValueError(f"--adapter {spec!r}: duplicate adapter name {name!r}{hint}")
        adapters[name] = directory
    return adapters
