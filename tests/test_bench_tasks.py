"""Smoke test of benchmarks/bench_tasks.py on a tiny stand-in cache: every recipe runs, the report and its
raw cells are written, and the verdict line is there."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from test_tasks import NEGATIVE, POSITIVE, pretrained

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tasks.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_tasks", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_tasks"] = module
    spec.loader.exec_module(module)
    return module


def test_bench_tasks_writes_report_and_cells(tmp_path):
    bench = _load()
    cache = tmp_path / "real"
    (cache / "spam").mkdir(parents=True)
    pretrained(tmp_path, "bert").rename(cache / "minilm")
    rows = [{"text": s, "label": "ham"} for s in POSITIVE] + [{"text": s, "label": "spam"} for s in NEGATIVE]
    for name in ("train", "validation"):
        (cache / "spam" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "tasks.md"
    assert bench.main(["--cache", str(cache), "--output", str(output), "--cells", "minilm/spam", "--max-length", "16",
                       "--finetune-steps", "2", "--distill-steps", "2", "--batch-size", "8", "--calibration-tokens", "64", "--seeds", "0",
                       "--work", str(tmp_path / "work")]) == 0
    text = output.read_text()
    assert "## minilm on spam" in text and "## Verdict on the paper's claim" in text and "## The global budget" in text
    for label in bench.LABELS.values():
        assert label in text
    cells = json.loads(output.with_suffix(".json").read_text())
    assert [r["recipe"] for r in cells[0]["runs"]] == list(bench.RECIPES)
    drop = next(r for r in cells[0]["runs"] if r["recipe"] == "layerdrop-task")
    assert drop["block_params"] * 2 == cells[0]["block_params"]  # every other block of 2 identical blocks


def test_bench_tasks_resumes_from_its_cache(tmp_path, monkeypatch):
    bench = _load()
    test_bench_tasks_writes_report_and_cells(tmp_path)
    first = json.loads((tmp_path / "tasks.json").read_text())
    import kroncompress.tasks

    def fail(*args, **kwargs):
        raise AssertionError("a cached run was run again")

    monkeypatch.setattr(kroncompress.tasks, "run_task_pipeline", fail)
    monkeypatch.setattr(kroncompress.tasks, "finetune", fail)
    cache = tmp_path / "real"
    assert bench.main(["--cache", str(cache), "--output", str(tmp_path / "tasks.md"), "--cells", "minilm/spam",
                       "--max-length", "16", "--finetune-steps", "2", "--distill-steps", "2", "--batch-size", "8",
                       "--calibration-tokens", "64", "--seeds", "0", "--work", str(tmp_path / "work")]) == 0
    again = json.loads((tmp_path / "tasks.json").read_text())
    assert [r["scores"] for r in again[0]["runs"]] == [r["scores"] for r in first[0]["runs"]]
