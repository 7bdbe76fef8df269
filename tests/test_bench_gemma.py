"""benchmarks/bench_gemma.py on a tiny Gemma 3: every cell's recipe plans, the kept blocks match the budget,
BOS opens every block, and a zero-shot and a distilled cell run end to end."""

from __future__ import annotations

import json
import types

import pytest
import torch

import kroncompress as kc
from conftest import build_tiny, import_benchmark



@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_gemma")


@pytest.mark.parametrize("layers, fraction, expected", [
    (18, 1 / 2, [0, 2, 4, 6, 8, 11, 13, 15, 17]),
    (18, 2 / 3, [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17]),
    (4, 1 / 2, [0, 3]),
])
def test_kept_layers_are_evenly_spaced_and_keep_both_ends(bench, layers, fraction, expected):
    assert bench.kept_layers(layers, fraction) == expected


def test_every_cell_recipe_plans_on_a_tiny_gemma(bench):
    model = build_tiny("gemma3", num_hidden_layers=4)
    for cell in bench.cells_for(types.SimpleNamespace(steps=3, only=None)):
        plan = kc.plan(model, kc.load_recipe(bench.cell_recipe(cell, 4)))
        names = {row.name for row in plan.rows}
        assert ("model.embed_tokens" in names) == cell.embedding, cell.key
        assert plan.params_after < plan.params_before, cell.key


def test_the_weight_only_embedding_cells_differ_from_their_data_aware_twins_only_in_the_embedding_init(bench):
    cells = bench.cells_for(types.SimpleNamespace(steps=3, only=None))
    assert len({c.key for c in cells}) == len(cells)
    nkp = [c for c in cells if c.embedding_init == "nkp"]
    assert [c.key for c in nkp] == ["svd|2/3|embedding-nkp|0", "svd|2/3|embedding-nkp|3"]
    for cell in nkp:
        twin = bench.Cell(cell.method, cell.budget, cell.embedding, cell.steps)
        assert twin in cells
        ours, theirs = bench.cell_recipe(cell, 4), bench.cell_recipe(twin, 4)
        assert ours["compress"][0]["options"] == {"ratio": 2.0, "init": "nkp"}
        assert theirs["compress"][0]["options"] == {"ratio": 2.0, "init": "auto"}
        assert ours["compress"][1:] == theirs["compress"][1:] and ours["distill"] == theirs["distill"]


def test_blocks_open_with_bos_and_hold_the_documents_in_order(bench, tmp_path):
    class Tokenizer:
        bos_token_id, eos_token_id = 2, 1

        def __call__(self, text, add_special_tokens=True):  # adds BOS, as Gemma's does
            ids = [10 + int(w) if w.isdigit() else 3 for w in text.split()]
            return {"input_ids": [self.bos_token_id] * add_special_tokens + ids}

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(str(i % 50) for i in range(300))}) + "\n" for _ in range(3)))
    blocks = bench.read_blocks(path, Tokenizer(), 600)
    assert blocks.shape == (3, 256) and (blocks[:, 0] == 2).all()
    stream = blocks[:, 1:].reshape(-1)
    assert stream[:300].tolist() == [10 + i % 50 for i in range(300)] and stream[300].item() == 1


def test_a_cell_runs_zero_shot_and_distilled_and_the_next_reuses_the_calibration(bench, tmp_path):
    teacher = build_tiny("gemma3", num_hidden_layers=4, max_position_embeddings=256).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, teacher.config.vocab_size, (16, 256))
    ids[:, 0] = 2
    texts = {"tokenizer": None, "eval": ids[:4], "calibration": ids[:4], "train": ids}
    args = types.SimpleNamespace(calibration_tokens=1024, output=tmp_path / "gemma.md", model=tmp_path / "tiny")
    row = bench.run_cell(bench.Cell("svd", "1/2", True, 1), teacher, texts, args)
    assert row["params"] < sum(p.numel() for p in teacher.parameters())
    assert row["zero_shot"] > 1 and row["distilled"] > 1 and row["distill_tokens"] == 8 * 256
    assert row["embedding_layout"].startswith("1 x (")  # one Kronecker term at ratio 2
    assert sorted(p.name for p in tmp_path.glob("gemma.calibration-*")) == [
        "gemma.calibration-tiny-1024.json", "gemma.calibration-tiny-1024.safetensors"]
    again = bench.run_cell(bench.Cell("kronecker", "1/2", True, 0), teacher, texts, args)
    assert again["calibrate_s"] == row["calibrate_s"]  # the pass's own time, read back with its statistics
    assert again["zero_shot"] > 1 and "distilled" not in again


def test_the_report_names_the_weight_only_embedding_row_and_the_layouts(bench, tmp_path):
    teacher = {"params": 1000, "block_params": 600, "perplexity": 40.0}
    base = {"budget": "2/3", "embedding": True, "params": 700, "block_params": 400, "zero_shot": 900.0, "calibrate_s": 1.0,
            "compress_s": 2.0, "steps": 3, "distilled": 120.0}
    rows = {"svd|2/3|embedding|3": {**base, "method": "svd", "key": "svd|2/3|embedding|3",
                                     "embedding_layout": "1 x (4, 8) (x) (2, 1)"},
            "svd|2/3|embedding-nkp|3": {**base, "method": "svd", "key": "svd|2/3|embedding-nkp|3", "embedding_init": "nkp",
                                         "zero_shot": 3000.0, "distilled": 200.0, "embedding_layout": "1 x (4, 8) (x) (2, 1)"}}
    args = types.SimpleNamespace(output=tmp_path / "gemma.md", steps=3, eval_tokens=512, calibration_tokens=256)
    bench.write_report(tmp_path / "gemma.md", rows, teacher, args)
    text = (tmp_path / "gemma.md").read_text()
    assert "| svd | 66.7% | compressed (nkp init) | 700 | 3000 |" in text
    assert "| svd | 66.7% | compressed | 700 | 900 |" in text
    assert "auto: 1 x (4, 8) (x) (2, 1); nkp: 1 x (4, 8) (x) (2, 1)" in text
    assert (tmp_path / "gemma.png").stat().st_size > 0
