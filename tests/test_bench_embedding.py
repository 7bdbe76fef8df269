"""benchmarks/bench_embedding_init.py: the cells differ only in the embedding's init, and the report is well-formed."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_embedding_init", BENCH / "bench_embedding_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


@pytest.mark.parametrize("layout, rules", [("kn-gpt2", 2), ("embedding only", 1)])
def test_arms_differ_only_in_the_embeddings_init(bench, layout, rules):
    nkp, aware = (bench.cell_recipe(layout, init, 0) for init in bench.INITS)
    assert len(nkp["compress"]) == rules
    assert nkp["compress"][0]["options"] == {"b_shape": [1, 2], "init": "nkp"}
    assert aware["compress"][0]["options"] == {"b_shape": [1, 2], "init": "auto"}
    assert nkp["compress"][1:] == aware["compress"][1:] and nkp["distill"] == aware["distill"]


def test_report_table_has_one_row_per_arm_with_the_seed_range(bench):
    base = {"params": 10, "teacher_params": 20, "teacher": 74.5, "steps": 40, "wte_error": 0.7, "wte_output_error": 0.6,
            "protocol": {"block_size": 256, "stride": 128, "tokens": 1000}, "seconds": 1.0}
    rows = [{**base, "layout": "kn-gpt2", "init": init, "seed": seed, "zero_shot": 300.0, "distilled": 100.0 + seed}
            for init in bench.INITS for seed in (0, 1)]
    text = bench.report(rows, argparse.Namespace(steps=40, seeds=[0, 1], tokens=16384))
    assert text.count("| kn-gpt2 |") == 2 and "100.00-101.00 (2 seeds)" in text and "| 100.50 |" in text
