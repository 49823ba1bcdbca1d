"""Relative links in README.md and docs/*.md point at files that exist.

`mkdocs build --strict` (part of `make test`) checks the pages of the site, but README.md is not one
of them: GitHub renders it, and its links into docs/ break silently when a page is renamed.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def relative_links(path: Path) -> list[str]:
    """Targets of markdown links and images in ``path`` that name a file in this repository."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    targets = [m.group(1).split("#", 1)[0] for m in LINK.finditer(text)]
    return [t for t in targets if t and not re.match(r"^[a-z]+:", t)]


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files {missing}"


def test_readme_links_into_the_docs():
    assert any(t.startswith("docs/") and t.endswith(".md") for t in relative_links(ROOT / "README.md"))


def test_relative_links_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](nope.md#x) ![img](../missing.png) [web](https://example.com)\n"
                    "```\n[in code](ignored.md)\n```\n")
    links = relative_links(page)
    assert links == ["page.md", "nope.md", "../missing.png"]
    assert [t for t in links if not (page.parent / t).exists()] == ["nope.md", "../missing.png"]
