"""benchmarks/bench_compress_time.py's pure parts: the recipes it times and the guard check it reports."""

from __future__ import annotations

import re

import pytest
from conftest import import_benchmark

bench = import_benchmark("bench_compress_time")


@pytest.mark.parametrize("mlp_only, name, matched", [
    (False, "model.layers.3.self_attn.q_proj", True), (False, "model.layers.3.mlp.down_proj", True),
    (True, "model.layers.3.self_attn.q_proj", False), (True, "model.layers.3.mlp.down_proj", True),
    (True, "model.layers.13.mlp.gate_proj", False),
])
def test_recipe_targets(mlp_only, name, matched):
    target = bench.recipe("kronecker", {"ratio": 2}, "0-3", mlp_only)["compress"][0]["targets"][0]
    assert bool(re.fullmatch(target.removeprefix("re:"), name)) == matched


def test_guard_check_counts_the_matrices_where_auto_ends_worse():
    single = {"oerr_by_module": {"a": 0.30, "b": 0.20, "c": 0.10}, "oerr": 0.2, "seconds": 10.0}
    auto = {"oerr_by_module": {"a": 0.25, "b": 0.20, "c": 0.12}, "oerr": 0.19, "seconds": 30.0}
    line = bench.guard_check(single, auto)
    assert "in 1 of 3 matrices, lower in 1" in line and "c 0.1200 vs 0.1000" in line
