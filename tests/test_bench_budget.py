"""benchmarks/bench_budget.py on a tiny 6-block GPT-2: a run extended checkpoint by checkpoint is the same run
as one taken to the last checkpoint at once (the curve is one run's prefix), and the report reads the cache."""

from __future__ import annotations

import json

import pytest

from conftest import import_benchmark



@pytest.fixture(scope="module")
def budget():
    return import_benchmark("bench_budget")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return tiny_folder


def _argv(tiny, tmp_path, name, *extra):
    folder, text = tiny
    return ["--model", str(folder), "--data", str(text), "--seeds", "0", "--calibration-tokens", "512",
            "--only", r"^(kn-gpt2-mlp|distilgpt2)\|", "--threads", "1",
            "--output", str(tmp_path / name / "budget.md"), "--runs", str(tmp_path / name / "runs"), *extra]


def test_extended_run_equals_one_straight_run(budget, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "TRAIN", {**budget.TRAIN, "batch_size": 2})  # a few blocks per step: the tiny corpus lasts several steps
    straight = budget.main(_argv(tiny, tmp_path, "straight", "--steps", "2", "5"))
    budget.main(_argv(tiny, tmp_path, "segments", "--steps", "2", "5", "--until", "2"))
    cache = tmp_path / "segments" / "budget.cells.jsonl"
    assert {json.loads(line)["step"] for line in cache.read_text().splitlines()} == {0, 2}
    segments = budget.main(_argv(tiny, tmp_path, "segments", "--steps", "2", "5"))
    by_key = lambda rows: {r["key"]: r["perplexity"] for r in rows}  # noqa: E731
    assert set(by_key(straight)) == set(by_key(segments)) and len(straight) == 6
    for key, value in by_key(straight).items():
        assert by_key(segments)[key] == pytest.approx(value, rel=1e-5), key
    report = (tmp_path / "segments" / "budget.md").read_text()
    assert "## Do the lines cross?" in report and "step 5" in report
    assert (tmp_path / "segments" / "budget.png").stat().st_size > 10_000


@pytest.mark.parametrize("a, b, expected", [
    ({40: [10.0, 11.0], 160: [8.0, 8.5]}, {40: [12.0], 160: [7.0]}, "cross between steps 40 and 160"),
    ({40: [10.0], 160: [8.0]}, {40: [12.0], 160: [9.0]}, "no crossing; a lower at every measured step"),
    ({40: [10.0, 13.0], 160: [8.0]}, {40: [12.0], 160: [7.0]}, "seed ranges overlap at step 40"),
])
def test_crossings_are_worded_from_the_numbers(budget, a, b, expected):
    assert expected in "\n".join(budget.crossings({"a": a, "b": b}))
