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


# -- optional extras: the core runs without matplotlib, scikit-learn and scipy ---------------------------

def test_without_matplotlib_the_plot_is_skipped_with_one_note(tmp_path, monkeypatch, caplog):
    import sys

    from kroncompress.pipeline.report import plot_history

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with caplog.at_level("WARNING", logger="kroncompress.pipeline"):
        assert plot_history(tmp_path / "perplexity.png", [0, 1], [9.0, 5.0], 4.0, label="s", ylabel="ppl",
                            title="t") is None
    assert not (tmp_path / "perplexity.png").exists()
    notes = [record.getMessage() for record in caplog.records]
    assert len(notes) == 1 and "perplexity.png" in notes[0] and "kroncompress[plot]" in notes[0], notes


def test_with_matplotlib_the_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from kroncompress.pipeline.report import plot_history

    assert plot_history(tmp_path / "p.png", [0, 1], [9.0, 5.0], 4.0, label="s", ylabel="ppl", title="t") == "p.png"
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_metrics_need_neither_scikit_learn_nor_scipy(monkeypatch):
    import sys

    for name in ("sklearn", "sklearn.metrics", "scipy", "scipy.stats"):
        monkeypatch.setitem(sys.modules, name, None)
    from kroncompress.tasks.metrics import compute_metrics

    scores = compute_metrics(["accuracy", "f1", "matthews"], [1, 0, 1, 1], [1, 1, 0, 1])
    assert scores["accuracy"] == 0.5 and scores["f1"] == pytest.approx(2 / 3)
    assert compute_metrics(["spearman"], [0.1, 0.2, 0.3], [1.0, 3.0, 2.0])["spearman"] == pytest.approx(0.5)


def test_core_requirements_leave_plotting_and_task_metric_libraries_to_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for name in ("matplotlib", "scikit-learn", "scipy"):
        assert name not in core, f"{name} is a core requirement again; it belongs in an extra"
    assert any(r.startswith("matplotlib") for r in project["optional-dependencies"]["plot"])
    dev = " ".join(project["optional-dependencies"]["dev"])
    assert all(name in dev for name in ("matplotlib", "scikit-learn", "scipy", "peft")), "make setup installs everything"
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert any(r.startswith("filelock") for r in project["dependencies"])
