"""The front pages and docs/: every relative link resolves, the front pages stay short, and
the English and Chinese front pages quote the same commands and numbers."""

import glob
import os
import re

import pytest
from conftest import ROOT

FRONT_PAGES = ("README.md", "README_cn.md")
PAGES = FRONT_PAGES + tuple(os.path.relpath(p, ROOT)
                            for p in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))))
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:,\d{3})*(?:\.\d+)?")


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as handle:
        return handle.read()


def anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", read(page)), re.M)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "").strip().lower()).replace(" ", "-")
            for h in headings}


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    targets = [t for t in LINK.findall(FENCE.sub("", read(page))) if "://" not in t]
    assert targets, page
    for target in targets:
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) \
            if path else os.path.join(ROOT, page)
        assert os.path.exists(resolved), (page, target)
        if anchor:
            assert anchor in anchors(os.path.relpath(resolved, ROOT)), (page, target)


def test_every_docs_page_is_linked_from_the_front_pages():
    for front in FRONT_PAGES:
        linked = {os.path.normpath(t.partition("#")[0]) for t in LINK.findall(read(front))}
        assert {p for p in PAGES if p.startswith("docs/")} <= linked, front


@pytest.mark.parametrize("page", FRONT_PAGES)
def test_a_front_page_is_short_with_a_table_of_contents(page):
    text = read(page)
    assert len(text.splitlines()) <= 300
    contents = [t for t in LINK.findall(text) if t.startswith("#")]
    assert len(contents) >= 6 and all(t[1:] in anchors(page) for t in contents)


def quoted(page):
    """What a front page quotes: its code blocks, its code spans, and the numbers of its prose."""
    text = read(page)
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    spans = SPAN.findall(prose)
    numbers = NUMBER.findall(re.sub(r"<[^>]+>|\([^)]*://[^)]*\)", "", SPAN.sub("", prose)))
    return blocks, set(spans), {n.replace("−", "-") for n in numbers}


def test_the_chinese_front_page_quotes_the_english_ones_commands_and_numbers():
    english, chinese = quoted("README.md"), quoted("README_cn.md")
    assert chinese[0] == english[0], "code blocks differ"
    assert chinese[1] == english[1], ("code spans differ", chinese[1] ^ english[1])
    assert chinese[2] == english[2], ("numbers differ", chinese[2] ^ english[2])
