"""The code paths of benchmarks/bench_quality.py and bench_speed.py, on a tiny 6-block GPT-2.

Not timing tests: nothing here depends on how fast anything ran. The grid and recipe checks plan on the
packaged demo teacher's config (meta device), so they check the real benchmark's parameter budgets.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import import_benchmark

import kroncompress as kc



@pytest.fixture(scope="module")
def benchmarks():
    """The two scripts as modules (both import the grid from their sibling common.py)."""
    return import_benchmark("bench_quality"), import_benchmark("bench_speed")


@pytest.fixture(scope="module")
def common():
    return import_benchmark("common")


@pytest.fixture(scope="module")
def quality(benchmarks):
    return benchmarks[0]


@pytest.fixture(scope="module")
def speed(benchmarks):
    return benchmarks[1]


@pytest.mark.parametrize("layers, keep, expected", [
    (12, 6, [0, 2, 4, 7, 9, 11]),  # DistilGPT2's choice
    (6, 4, [0, 2, 3, 5]),
    (6, 2, [0, 5]),
    (6, 1, [0]),
    (6, 6, [0, 1, 2, 3, 4, 5]),
])
def test_evenly_spaced_blocks(common, layers, keep, expected):
    assert common.evenly_spaced(layers, keep) == expected


@pytest.mark.parametrize("keep", [0, 7])
def test_evenly_spaced_refuses_impossible_counts(common, keep):
    with pytest.raises(kc.RecipeError, match=f"cannot keep {keep} of 6"):
        common.evenly_spaced(6, keep)


@pytest.fixture(scope="module")
def demo_plans(quality):
    """Planned parameter count of every default grid cell on the demo teacher (meta device)."""
    model, _ = kc.load_model("shakespeare-gpt2", load_tokenizer=False)
    meta = model.to("meta") if not any(p.is_meta for p in model.parameters()) else model
    grid = quality.cells(6, [0, 1], curve=True)
    return grid, {cell.key: kc.plan(meta, kc.load_recipe(quality.cell_recipe(cell, 6))).params_after for cell in grid}


def test_main_table_cells_share_the_kn_gpt2_budget(demo_plans):
    grid, params = demo_plans
    kn = params["kn-gpt2|recipe|weight-only|0"]
    for cell in grid:
        if cell.main:
            assert abs(params[cell.key] - kn) / kn < 0.01, cell.key


def test_main_table_repeats_only_the_headline_cells_over_seeds(demo_plans):
    grid, _ = demo_plans
    repeated = {c.recipe for c in grid if c.seed == 1}
    assert repeated == {"kn-gpt2", "kn-gpt2-mlp", "distilgpt2"}
    assert all(c.main for c in grid if c.seed == 1)
    assert len({c.key for c in grid}) == len(grid)


@pytest.mark.parametrize("recipe, init", [("kn-gpt2", "weight-only"), ("svd-gpt2", "data-aware"),
                                          ("tucker-gpt2", "weight-only"), ("tt-gpt2", "weight-only")])
def test_curve_layouts_order_the_budgets(quality, demo_plans, recipe, init):
    _, params = demo_plans
    at = {layout: params[f"{recipe}|{layout}|{init}|0"] for layout in ("recipe", *quality.CURVE_LAYOUTS)
          if layout != quality.MLP_ONLY}
    # dense embedding + odd blocks > the recipe (embedding + odd blocks) > every block, dense embedding > every block + embedding
    assert at["no embedding"] > at["recipe"] > at["all blocks, no embedding"] > at["all blocks"]


def test_every_strategy_gets_every_layout_and_init(quality, demo_plans):
    grid, params = demo_plans
    keys = {c.key for c in grid}
    for recipe, inits in (("kn-gpt2", ("weight-only", "data-aware")), ("svd-gpt2", ("weight-only", "data-aware")),
                          ("tucker-gpt2", ("weight-only",)), ("tt-gpt2", ("weight-only",))):
        for init in inits:
            for layout in ("recipe", *quality.CURVE_LAYOUTS):
                # kronecker over every MLP is the kn-gpt2-mlp recipe, a main-table row
                key = (f"kn-gpt2-mlp|recipe|{init}|0" if (recipe, layout) == ("kn-gpt2", quality.MLP_ONLY)
                       else f"{recipe}|{layout}|{init}|0")
                assert key in keys, key


def test_mlp_only_cells_share_the_kn_gpt2_mlp_budget(quality, common, demo_plans):
    grid, params = demo_plans
    mlp = params["kn-gpt2-mlp|recipe|weight-only|0"]
    cells = [c for c in grid if c.layout == quality.MLP_ONLY]
    assert {c.recipe for c in cells} == {"svd-gpt2", "tucker-gpt2", "tt-gpt2"} and all(c.main for c in cells)
    for cell in cells:
        assert abs(params[cell.key] - mlp) / mlp < 0.01, cell.key
    recipe = quality.cell_recipe(quality.Cell("svd-gpt2", quality.MLP_ONLY, "data-aware", 0), 6)
    assert [r["targets"] for r in recipe["compress"]] == [common.MLP_TARGETS] and "calibration" not in recipe


def test_layer_drop_cells_set_the_layer_map(quality):
    recipe = quality.cell_recipe(quality.Cell("distilgpt2", "keep 3", "-", 1), 6)
    assert recipe["compress"][0]["options"] == {"keep": [0, 2, 5]} and recipe["distill"]["layer_map"] == [0, 2, 5]
    assert recipe["distill"]["train"]["seed"] == 1 and recipe["distill"]["train"]["lr"] == quality.TRAIN["lr"]


def test_weight_only_cells_drop_the_recipe_calibration(quality):
    weight_only = quality.cell_recipe(quality.Cell("kn-gpt2-mlp", "recipe", "weight-only", 0), 6)
    data_aware = quality.cell_recipe(quality.Cell("kn-gpt2-mlp", "recipe", "data-aware", 0), 6)
    assert "calibration" not in weight_only and "calibration" in data_aware


def _row(recipe, runs, params=100, init="weight-only"):
    return {"recipe": recipe, "init": init, "layout": "recipe", "params": params, "distilled_runs": runs,
            "distilled_mean": sum(runs) / len(runs)}


@pytest.mark.parametrize("kron, drop, expected", [
    ([20.0, 21.0], [24.0, 25.0], "holds here**."),
    ([26.0, 27.0], [24.0, 25.0], "does not hold here**."),
    ([20.0, 24.5], [24.0, 25.0], "not a clear difference"),
    ([20.0], [24.0], "holds here**."),
])
def test_claim_is_worded_from_the_numbers(quality, kron, drop, expected):
    text = quality.claim([_row("kn-gpt2", kron), _row("distilgpt2", drop)])
    assert expected in text


def test_best_at_budget_ranks_layer_dropping(quality):
    rows = [_row("kn-gpt2", [30.0]), _row("kn-gpt2-mlp", [20.0], init="data-aware"), _row("distilgpt2", [25.0])]
    assert quality.best_at_budget(rows) == ("Lowest after distillation at this budget: kn-gpt2-mlp (data-aware), 20.00. "
                                            "Layer dropping ranks 2 of 3.")


def test_quality_benchmark_end_to_end_and_resumes(quality, tiny_folder, tmp_path, monkeypatch):
    folder, text = tiny_folder
    output = tmp_path / "quality.md"
    argv = ["--model", str(folder), "--data", str(text), "--steps", "1", "--seeds", "0", "1", "--jobs", "1",
            "--output", str(output), "--calibration-tokens", "512",
            "--only", r"^(kn-gpt2\|recipe|distilgpt2\|keep 4|tucker-gpt2\|no embedding\|)"]
    rows = quality.main(argv)
    assert {r["key"] for r in rows} == {"kn-gpt2|recipe|weight-only|0", "kn-gpt2|recipe|data-aware|0",
                                        "kn-gpt2|recipe|weight-only|1", "kn-gpt2|recipe|data-aware|1",
                                        "distilgpt2|keep 4|-|0", "distilgpt2|keep 4|-|1",
                                        "tucker-gpt2|no embedding|weight-only|0"}
    for row in rows:
        assert row["steps"] == 1 and row["teacher_params"] > row["params"]
        assert row["zero_shot"] > 1 and row["distilled"] > 1 and row["protocol"]["tokens"] > 0
    assert len({r["teacher"] for r in rows}) == 1  # one protocol, one validation text, whatever the seed
    by_key = {r["key"]: r for r in rows}
    assert by_key["kn-gpt2|recipe|weight-only|0"]["zero_shot"] == by_key["kn-gpt2|recipe|weight-only|1"]["zero_shot"]

    report = output.read_text()
    assert "## At the kn-gpt2 budget" in report and "(2 seeds)" in report and "The claim **" in report
    assert "block 64, stride 32" in report
    assert output.with_suffix(".png").stat().st_size > 10_000
    cached = output.with_name("quality.cells.jsonl").read_text().splitlines()
    assert len(cached) == 7 and all(json.loads(line)["key"] for line in cached)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached cell ran again")

    monkeypatch.setattr(quality, "run_cell", must_not_run)
    again = quality.main(argv)
    assert [r["distilled"] for r in again] == [r["distilled"] for r in rows]
    quality.main([*argv, "--report-only"])
    assert "rewritten from the cached cells" in output.read_text()
    with pytest.raises(SystemExit, match="not in .*quality.cells.jsonl"):
        quality.main([*argv[:-1], r"^tt-gpt2\|recipe", "--report-only"])

    # an earlier report read back into a fresh cache: every cell kept (marked) with --keep-earlier, none rerun
    earlier = tmp_path / "earlier" / "quality.md"
    kept = quality.main([*argv, "--output", str(earlier), "--import-report", str(output), "--import-label", "v0",
                         "--keep-earlier"])
    assert sorted(r["key"] for r in kept) == sorted(r["key"] for r in rows)
    for row in kept:
        original = by_key[row["key"]]
        assert row["earlier_source"] == "v0" and row["zero_shot"] == pytest.approx(original["zero_shot"], abs=0.005)
    means = lambda rs: sorted(round(r["distilled_mean"], 2) for r in quality.group_seeds(rs))  # noqa: E731
    assert means(kept) == pytest.approx(means(rows), abs=0.01)
    assert "(e): 7 of the 7 runs were made by an earlier version of the sources (v0)" in earlier.read_text()
    with pytest.raises(AssertionError, match="a cached cell ran again"):
        quality.main([*argv, "--output", str(earlier)])  # without --keep-earlier they do not count


@pytest.mark.filterwarnings("ignore:compress. no calibration")
def test_matmul_flops_count_every_weight_matrix(speed, tiny_model):
    model = tiny_model("gpt2")
    dense = speed.matmul_flops_per_token(model)
    weights = sum(m.weight.numel() for name, m in model.named_modules() if type(m).__name__ in ("Conv1D", "Linear"))
    assert dense == 2 * weights
    kc.compress(model, kc.load_recipe("svd-gpt2"))
    assert speed.matmul_flops_per_token(model) < dense


def test_speed_benchmark_end_to_end(speed, tiny_folder, tmp_path):
    folder, _ = tiny_folder
    output = tmp_path / "speed.md"
    sections = speed.main(["--model", str(folder), "--no-gpt2-small", "--rounds", "1", "--batch", "2", "--seq-len", "16",
                           "--new-tokens", "4", "--forward-repeats", "1", "--devices", "cpu", "--output", str(output)])
    (title, rows), = sections
    expected = [v for r in speed.DEMO_RECIPES for v in (r, f"{r}, forward_mode dense")[: 2 if r in speed.DENSE_MODE_RECIPES else 1]]
    assert [r["variant"] for r in rows] == ["original", *expected]
    assert all(r["forward"] > 0 and r["generate"] > 0 for r in rows)
    dense_rows = [r for r in rows if r["variant"].endswith("forward_mode dense")]
    twins = {r["variant"]: r for r in rows}
    assert dense_rows and all(r["kernels"] < twins[r["variant"].split(",")[0]]["kernels"] for r in dense_rows)  # one GEMM per layer
    assert all(r["params"] < rows[0]["params"] for r in rows[1:])
    report = output.read_text()
    assert report.count("| original |") == 2 and "forward speed-up" in report  # the speed table and the saved one
    assert report.count(speed.SAVED_START) == 1
    assert output.with_suffix(".png").stat().st_size > 10_000


def test_speed_saved_table_is_measured_and_rewritten_in_place(speed, tiny_folder, tmp_path):
    folder, _ = tiny_folder
    output = tmp_path / "speed.md"
    output.write_text("# Speed\n\n### a table\n\n| x |\n\n![speed-ups](speed.png)\n")
    argv = ["--model", str(folder), "--saved-only", "--rounds", "1", "--saved-new-tokens", "4", "--output", str(output)]
    for _ in range(2):  # the second run replaces the section, never adds one
        speed.main(argv)
        report = output.read_text()
        assert report.count(speed.SAVED_START) == 1 and report.count(speed.SAVED_END) == 1
        assert report.startswith("# Speed\n\n### a table") and report.rstrip().endswith("![speed-ups](speed.png)")
    section = report.split(speed.SAVED_START)[1].split(speed.SAVED_END)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "tokens/s" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| original", "| kn-gpt2, in memory",
                                                 "| kn-gpt2, saved -> AutoModelForCausalLM.from_pretrained",
                                                 "| kn-gpt2, saved -> kc.load_compressed",
                                                 "| kn-gpt2, export --dense -> from_pretrained"]
    # the distillation turned the cache off while it ran; every reloaded model has it back, with the original's attention
    original = rows[0].split(" | ")
    assert all(r.split(" | ")[2:4] == original[2:4] for r in rows), rows
    assert original[2] == "True"


def test_compiled_table_reports_both_paths_against_the_eager_original(speed):
    from argparse import Namespace

    row = {"forward eager": 100.0, "forward compiled": 150.0, "generate eager": 20.0, "generate compiled": 30.0,
           "forward_compile_s": 60.0, "generate_compile_s": 90.0, "diff": 1e-6}
    rows = [{"variant": "original", **row}, {"variant": "kn-gpt2", **row, "forward compiled": 200.0, "generate eager": 10.0}]
    text = "\n".join(speed.compiled_table(rows, Namespace(batch=8, seq_len=128, new_tokens=32, rounds=3)))
    assert "| original | 100 | 150 | 1.50x | 1.50x | 20.0 | 30.0 | 1.50x | 1.50x | 60 / 90 | 1.0e-06 |" in text
    assert "| kn-gpt2 | 100 | 200 | 2.00x | 2.00x | 10.0 | 30.0 | 3.00x | 1.50x |" in text
    assert ("CUDA was not measured" in text) != torch.cuda.is_available()
