"""The README and docs/ as a reader meets them: every link resolves (files and #anchors), the README
stays short with the equation map near its top, and nothing points outside the repository."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set:
    with open(path) as fh:
        text = re.sub(r"```.*?```", "", fh.read(), flags=re.S)  # a '#' in a code block is no heading
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def links(path: str) -> list:
    with open(path) as fh:
        text = re.sub(r"```.*?```", "", fh.read(), flags=re.S)
    return LINK.findall(text)


def test_slug_matches_github():
    assert slug("Equation-to-code map") == "equation-to-code-map"
    assert slug("How long `python report.py` takes") == "how-long-python-reportpy-takes"
    assert slug("Pose as input: pose-to-text and pose editing") == "pose-as-input-pose-to-text-and-pose-editing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_link_resolves_inside_the_repository(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not (path == ROOT or path.startswith(ROOT + os.sep)):
            bad.append(f"{target}: outside the repository")
        elif not os.path.exists(path):
            bad.append(f"{target}: no such file")
        elif anchor and (not path.endswith(".md") or anchor not in anchors(path)):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{os.path.relpath(page, ROOT)}: " + "; ".join(bad)


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [os.path.join(ROOT, "README.md")]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in links(page):
            file = target.partition("#")[0]
            path = os.path.normpath(os.path.join(os.path.dirname(page), file))
            if file.endswith(".md") and os.path.exists(path):
                todo.append(path)
    assert set(PAGES) - seen == set(), "pages no link reaches"


def test_readme_is_short_with_the_equation_map_near_the_top():
    with open(os.path.join(ROOT, "README.md")) as fh:
        lines = fh.read().split("\n")
    assert len(lines) < 300
    assert "## Equation-to-code map" in lines[:150]
