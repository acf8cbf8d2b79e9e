"""The README stays a short entry point that starts with the two commands, and every page in
docs/ is reachable from the mkdocs nav (the site itself is built by scripts/docs.sh)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"

COMMANDS = ["pip install . && python -m turboquant demo", "bash scripts/test.sh"]
MAX_README_LINES = 300


def _nav_pages(text: str) -> list[str]:
    """The .md files named in mkdocs.yml's nav (the block under `nav:`, up to the next
    top-level key), read without a YAML parser."""
    m = re.search(r"^nav:\s*\n((?:[ \t]+.*\n|\s*\n)*)", text, re.MULTILINE)
    assert m, "mkdocs.yml has no nav"
    return re.findall(r"([\w./-]+\.md)\s*$", m.group(1), re.MULTILINE)


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/")


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    body = [ln for ln in lines if ln.strip() and not ln.startswith("# ")]
    assert body[0].startswith("```"), "the first block after the README's title: the commands"
    commands = [ln.split("  #")[0].strip() for ln in body[1:3]]
    assert commands == COMMANDS, commands


def test_every_docs_page_is_in_the_nav():
    nav = _nav_pages(MKDOCS.read_text())
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert len(set(nav)) == len(nav), f"a page is listed twice in the nav: {nav}"
    missing = set(pages) - set(nav)
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {sorted(missing)}"
    dangling = set(nav) - set(pages)
    assert not dangling, f"nav entries without a page: {sorted(dangling)}"


def test_readme_links_to_docs_exist():
    text = README.read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / target).is_file(), f"README links to a missing page: {target}"


def test_nav_parser_reads_nested_sections():
    text = "site_name: x\nnav:\n  - Home: index.md\n  - A:\n      - B: b/c.md\n\ntheme: m\n"
    nav = _nav_pages(text)
    assert nav == ["index.md", "b/c.md"]
