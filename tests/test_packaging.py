"""The wheel ships every package: each folder with an __init__.py under kroncompress/, cli/ and recipes/ is
listed in pyproject.toml (setuptools installs only what is listed)."""

from __future__ import annotations


from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _listed_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"])


def _package_folders() -> set[str]:
    found = set()
    for top, name in (("kroncompress", "kroncompress"), ("cli", "kroncompress.cli"), ("recipes", "kroncompress.recipes")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            if "__pycache__" not in parts:
                found.add(".".join((name, *parts)))
    return found


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="runs from a source checkout")
def test_every_package_folder_is_listed_for_the_wheel():
    missing = _package_folders() - _listed_packages()
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}: the wheel would not ship them"


def test_every_listed_package_exists():
    stale = _listed_packages() - _package_folders()
    assert not stale, f"pyproject.toml lists packages that have no folder: {sorted(stale)}"
