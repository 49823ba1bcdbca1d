"""MkDocs hook: let pages show images that live outside docs/ (benchmarks/results/*.png).

A page links such a figure by its path in the repository, ``../benchmarks/results/x.png``, which is
also what GitHub resolves when it renders docs/*.md. MkDocs only knows files under docs/, so this
hook registers each figure under exactly that relative source path (resolved from docs/, it points
at the real file) and copies it to ``repo/benchmarks/results/x.png`` in the built site. Links to
anything else outside docs/ stay unknown, and ``mkdocs build --strict`` fails on them.
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

# Folders (relative to the repository root) whose images pages may show.
FIGURE_DIRS = ("benchmarks/results",)
SUFFIXES = {".png", ".svg", ".jpg"}


def on_files(files: Files, config) -> Files:
    docs_dir = Path(config["docs_dir"])
    root = docs_dir.parent
    for folder in FIGURE_DIRS:
        for path in sorted((root / folder).glob("*")):
            if path.suffix.lower() not in SUFFIXES:
                continue
            rel = path.relative_to(root).as_posix()
            files.append(File("../" + rel, src_dir=str(docs_dir), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"], dest_uri="repo/" + rel,
                              inclusion=InclusionLevel.INCLUDED))  # else ".*" (dot-files) excludes "../"
    return files
