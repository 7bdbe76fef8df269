"""The docs never rot: every ```python block of docs/**/*.md and README.md runs, in order, per page.

Each page runs in one fresh namespace, so a block may use names defined by the blocks above it.
A block preceded by the line `<!-- no-run -->` is shown but not run (see docs/contributing.md).
Strategies a page registers are removed afterwards, so pages cannot leak into other tests.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NO_RUN_MARKER = "<!-- no-run -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def code_blocks(text: str) -> list[tuple[int, str, str, bool]]:
    """(first line number, info string, code, runnable) of every fenced block in markdown `text`."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        blocks.append((start + 1, info, "\n".join(body) + "\n", previous != NO_RUN_MARKER))
    return blocks


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The runnable ```python blocks of one page, as (first code line number, code)."""
    found = []
    for line, info, code, runnable in code_blocks(path.read_text(encoding="utf-8")):
        language = info.split()[0].lstrip(".{").lower() if info else ""
        if language in ("python", "py") and runnable:
            found.append((line, code))
    return found


PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture
def clean_registry():
    from kroncompress.strategies import registry

    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=page_id)
def test_page_code_runs(page: Path, clean_registry, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a page that writes files writes them here
    # A real module in sys.modules, so dataclasses and pickling defined on the page work as in a script.
    module = types.ModuleType("docs_page_" + re.sub(r"\W", "_", page.stem))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for line, code in python_blocks(page):
        try:
            exec(compile(code, f"{page_id(page)}:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"{page_id(page)}, block at line {line} raised {type(error).__name__}: {error}")


@pytest.mark.parametrize(
    "markdown, expected",
    [
        ("```python\na = 1\n```\n", [(2, "a = 1\n")]),
        ("<!-- no-run -->\n```python\nboom()\n```\n", []),
        ("```toml\n[x]\n```\n```py\nb = 2\n```\n", [(5, "b = 2\n")]),
        ("- item\n\n    ```python\n    c = 3\n    ```\n", [(4, "c = 3\n")]),
        ("````python\n```\n````\n", [(2, "```\n")]),
        ("```python\nx = 1\n```\n<!-- no-run -->\n\n```python\ny = 2\n```\n", [(2, "x = 1\n")]),
    ],
    ids=["plain", "no-run marker", "py alias after toml", "indented in a list", "longer fence", "marker only skips next"],
)
def test_block_extraction(markdown, expected, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(markdown, encoding="utf-8")
    assert python_blocks(page) == expected


def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    return []


def test_nav_lists_every_page_and_only_existing_ones():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8").replace("!!python/name:", ""))
    listed = set(nav_pages(config["nav"]))
    present = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed - present == set(), "mkdocs.yml nav names pages that do not exist"
    assert present - listed == set(), "docs pages missing from mkdocs.yml nav; add them"


def documented_modules() -> set[str]:
    text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
    return set(re.findall(r"^:::\s+([\w.]+)", text, flags=re.M))


def library_modules() -> set[str]:
    modules = set()
    for path in (ROOT / "kroncompress").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            continue
        if not any(part.startswith("_") for part in parts):
            modules.add(".".join(parts))
    return modules


def test_every_library_module_has_a_reference_entry():
    missing = sorted(library_modules() - documented_modules())
    assert not missing, f"add '::: <module>' entries to a page in docs/reference/ for: {', '.join(missing)}"


def test_readme_links_point_to_existing_files():
    links = re.findall(r"\]\(([^)#\s]+)", (ROOT / "README.md").read_text(encoding="utf-8"))
    local = [link for link in links if "://" not in link]
    assert local, "README.md should link to the docs pages"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
