"""MkDocs hook: index notation in a docstring must not fail `mkdocs build --strict`.

Markdown reads ``W[i][j]`` or ``x[:, :r][0]`` in a docstring as a reference link, and
mkdocs-autorefs then warns that it found no target ``j`` / ``0``; under --strict that warning
would fail `make test` over prose. This hook lowers that one warning to INFO when it comes from a
docstring (autorefs names the ``.py`` file). Broken links in the pages themselves, and
cross-references written in pages, still fail the build.
"""
from __future__ import annotations

import logging
import re

_FROM_DOCSTRING = re.compile(r"from \S+\.py:\d+: .*Could not find cross-reference target")


class _DocstringRefs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and _FROM_DOCSTRING.search(record.getMessage()):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def on_startup(command, dirty) -> None:
    logger = logging.getLogger("mkdocs.plugins.mkdocs_autorefs._internal.plugin")
    if not any(isinstance(f, _DocstringRefs) for f in logger.filters):
        logger.addFilter(_DocstringRefs())
