"""Smoke test of benchmarks/bench_layers.py: its functions run on tiny sizes and the report is well-formed.

Not a timing test: no assertion here depends on how fast anything ran.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_layers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_layers", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_layers"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_results(bench):
    torch.manual_seed(0)
    decomposition = bench.bench_decomposition(
        blocks=1, repeats=1, shapes=[("tall", (48, 16)), ("wide", (16, 48))]
    )
    forward_runs = [(1, 4, *bench.bench_forward(1, 4, ratios=(2, 4), min_run_time=0.001))]
    multi_term = (1, 4, *bench.bench_multi_term(1, 4, cases=((2, (4, 4)),), min_run_time=0.001))
    return decomposition, forward_runs, multi_term


def table_rows(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


@pytest.mark.parametrize(
    "blocks, expected",
    [
        (12, 49),  # 12 blocks x 4 matrices + the embedding
        (2, 9),
    ],
)
def test_gpt2_small_layout_counts(bench, blocks, expected):
    shapes = bench.gpt2_small_shapes(blocks)
    assert len(shapes) == expected
    assert shapes[-1] == ("wte", (50257, 768))
    assert all(shape[1] % 2 == 0 for _, shape in shapes), "b_shape (1, 2) must divide every matrix"


@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
def test_ratio_layers_hit_the_compression_ratio(bench, ratio):
    dense_params = bench.IN_FEATURES * bench.OUT_FEATURES
    for family, layer in bench.ratio_layers(ratio).items():
        assert (layer.in_features, layer.out_features) == (bench.IN_FEATURES, bench.OUT_FEATURES)
        achieved = dense_params / (layer.a.numel() + layer.b.numel())
        assert achieved == pytest.approx(ratio, rel=0.05), family


def test_decomposition_paths_agree(tiny_results):
    decomposition = tiny_results[0]
    assert decomposition.matrices == 2
    assert decomposition.ours_s > 0 and decomposition.naive_s > 0
    assert decomposition.max_residual_gap < 1e-4


def test_loop_over_terms_matches_kron_matmul(bench):
    torch.manual_seed(0)
    A, B, x = torch.randn(3, 6, 4), torch.randn(3, 2, 5), torch.randn(2, 7, 20)
    expected = x @ __import__("kroncompress").kron_sum(A, B).T
    torch.testing.assert_close(bench.loop_over_terms(x, A, B), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("blocks, says_quick", [(1, True), (12, False)])
def test_report_is_written_and_well_formed(bench, tiny_results, tmp_path, blocks, says_quick):
    decomposition, forward_runs, multi_term = tiny_results
    decomposition = dataclasses.replace(decomposition, blocks=blocks)
    quick = blocks < 12
    output = tmp_path / "results" / "layers.md"
    plot = output.with_suffix(".png")
    bench.write_plot(plot, forward_runs)
    report = bench.build_report(Namespace(quick=quick), bench.machine_lines(), decomposition, forward_runs, multi_term, plot.name)
    bench.write_atomically(output, lambda handle: handle.write(report))

    text = output.read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in output.parent.iterdir()) == ["layers.md", "layers.png"], "temp files left behind"
    for heading in ("## 1.", "## 2.", "## 3.", "threads (torch.get_num_threads())", "torch "):
        assert heading in text
    assert ("quick mode: 1 of 12 blocks" in text) == says_quick
    # Every table is rectangular, and the forward table has one row per (ratio, family).
    blocks = re.split(r"\n(?=#)", text)
    for block in blocks:
        rows = table_rows(block)
        assert len({len(row) for row in rows}) <= 1, block
    forward_rows = [row for row in table_rows(text) if row[0] in ("(1 x 2)", "(1 x 4)", "balanced")]
    assert len(forward_rows) == 4
    assert all(float(row[5]) > 0 for row in forward_rows)  # FLOP ratio column parsed as a number


def test_main_rejects_unknown_flags(bench):
    with pytest.raises(SystemExit):
        bench.main(["--no-such-flag"])
