"""README stays short and everything moved out of it stays reachable (issue 24: 632 lines where a newcomer needs
~150): at most 200 lines, each docs/*.md linked from it once, every relative link and image in README and docs/
resolves, and the section the lead extends with what the tool refuses is there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_every_doc_is_linked_once_from_readme():
    links = LINK.findall(README.read_text())
    docs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert docs, "no docs/*.md"
    for doc in docs:
        assert links.count(doc) == 1, (doc, links.count(doc))


def test_relative_links_and_images_resolve():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), (page.name, target)


def test_refusals_section_is_there():
    text = README.read_text()
    assert re.search(r"^## What ddpm-deploy refuses\n", text, re.M)
    assert "| hostile input | what happens |" in text
