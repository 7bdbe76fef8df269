"""benchmarks/bench_init_gemma.py on a tiny Gemma 3 folder: every cell's recipe plans the MLP matrices only, a
weight-only and a data-aware cell run and report their errors, and the data-aware one has the lower output error."""

from __future__ import annotations

import argparse

import pytest
import torch

import kroncompress as kc
from conftest import build_tiny, import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_init_gemma")


@pytest.mark.parametrize("name", ["svd", "nkp", "whitened", "als", "als-8x8-r32"])
def test_every_cell_halves_only_the_mlp_matrices(bench, name):
    model = build_tiny("gemma3", num_hidden_layers=2, hidden_size=64, intermediate_size=128, head_dim=16)
    plan = kc.plan(model, kc.load_recipe(bench.cell_recipe(name)))
    assert sorted({row.name.rsplit(".", 1)[-1] for row in plan.rows}) == ["down_proj", "gate_proj", "up_proj"]
    assert len(plan.rows) == 6
    kept = sum(r.plan.params_after for r in plan.rows) / sum(r.plan.params_before for r in plan.rows)
    if name == "als-8x8-r32":  # fixed shapes: half of Gemma 3 270M's (2048 x 640) matrices, not of the tiny ones
        assert 32 * (2048 // 8 * 640 // 8 + 64) / (2048 * 640) == pytest.approx(0.5016, abs=1e-4)
    else:
        assert 0.45 < kept < 0.55, kept


def test_a_weight_only_and_a_data_aware_cell_run_and_the_data_aware_one_fits_the_outputs_better(bench, tmp_path):
    folder = tmp_path / "tiny"
    build_tiny("gemma3", num_hidden_layers=2, hidden_size=64, intermediate_size=128, head_dim=16,
               max_position_embeddings=256).save_pretrained(folder)
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (8, 256))
    ids[:, 0] = 2
    texts = {"tokenizer": None, "eval": ids[:2], "calibration": ids[2:6]}
    args = argparse.Namespace(output=tmp_path / "gemma.md", model=folder, calibration_tokens=1024)
    plain, whitened = (bench.run_cell(name, folder, texts, args) for name in ("svd", "whitened"))
    for row in (plain, whitened):
        assert row["matrices"] == 6 and row["params_after"] < row["params_before"]
        assert 0 < row["werr"] < 1 and 0 < row["oerr"] < 1 and row["perplexity"] > 1
    assert whitened["oerr"] < plain["oerr"] and whitened["werr"] >= plain["werr"]  # the two optima (Eckart-Young)
    text = bench.report({"svd": plain, "whitened": whitened}, 50.0, argparse.Namespace(
        output=tmp_path / "init.md", calibration_tokens=1024, eval_tokens=512))
    assert "| plain truncated SVD | 6 |" in text and text.count("not run") == 3
    assert f"| {plain['compress_s']:.0f} ({torch.get_num_threads()}) |" in text  # the thread count it ran with
