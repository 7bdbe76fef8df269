"""A recipe's `budget` section through plan, calibration, compress and a save/load round trip (tiny models)."""

from __future__ import annotations

import pytest
import torch

import kroncompress as kc
from conftest import assert_reloads
from kroncompress.sensitivity import measure_sensitivity

GROUP = {"gpt2": ["role:attention", "role:mlp"], "llama": ["role:attention", "role:mlp"]}


def _recipe(arch, budget, strategy="svd", options=None):
    return kc.Recipe.from_dict({"version": 1, "name": "budgeted", "budget": budget,
                                "compress": [{"targets": GROUP[arch], "strategy": strategy,
                                              "options": options or {"ratio": 2}}]})


def _group_params(model, plan):
    modules = dict(model.named_modules())
    return sum(sum(p.numel() for n, p in modules[name].named_parameters() if n != "bias")
               for name in plan.allocation["group"])


def _stats(model, names, sensitivity=True):
    blocks = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = kc.collect_statistics(model, blocks, names)
    if sensitivity:
        stats.sensitivity = measure_sensitivity(model, blocks, names)
    return stats


@pytest.mark.parametrize("arch", sorted(GROUP))
@pytest.mark.parametrize("keep", [0.8, 0.5])
def test_plan_keeps_the_budget_and_says_why(arch, keep, tiny_model):
    model = tiny_model(arch)
    plan = kc.plan(model, _recipe(arch, {"keep": keep}))
    record = plan.allocation
    assert record["params"] <= record["budget"] == int(keep * record["dense_params"])
    assert record["params"] >= 0.9 * record["budget"]  # the fill uses what the hull steps left
    planned = {row.name: row for row in plan.rows}
    for name, entry in record["modules"].items():
        if entry["choice"] == "dense":
            assert name not in planned
        else:
            saved = planned[name].plan.params_before - planned[name].plan.params_after  # the bias is kept either way
            assert saved == entry["dense_params"] - entry["params"]
            assert "budget:" in planned[name].note
    assert plan.to_dict()["allocation"]["budget"] == record["budget"]
    assert record["basis"].startswith("weight error")


def test_compress_reallocates_on_statistics_and_round_trips(tiny_model, tmp_path):
    model = tiny_model("gpt2")
    preview = kc.plan(model, _recipe("gpt2", {"keep": 0.5}))
    stats = _stats(model, preview.allocation["group"])
    report = kc.compress(model, preview, calibration=stats)
    assert report.rows and all(row.output_error is not None for row in report.rows)
    replanned = kc.plan(tiny_model("gpt2"), _recipe("gpt2", {"keep": 0.5}), stats)
    assert replanned.allocation["basis"].startswith("output error") and replanned.allocation["sensitivity"] == "measured"
    assert _group_params(model, replanned) <= replanned.allocation["budget"]
    assert_reloads(model, tmp_path / "out")


def test_a_very_sensitive_module_stays_dense(tiny_model):
    model = tiny_model("gpt2")
    names = kc.plan(model, _recipe("gpt2", {"keep": 0.6})).allocation["group"]
    stats = _stats(model, names, sensitivity=False)
    stats.sensitivity = {name: 1.0 for name in names}
    stats.sensitivity[names[0]] = 1e12
    plan = kc.plan(model, _recipe("gpt2", {"keep": 0.6}), stats)
    assert plan.allocation["modules"][names[0]]["choice"] == "dense"
    assert names[0] not in {row.name for row in plan.rows}


def test_uniform_sensitivity_and_statistics_without_it_are_labelled(tiny_model):
    model = tiny_model("gpt2")
    names = kc.plan(model, _recipe("gpt2", {"keep": 0.5})).allocation["group"]
    stats = _stats(model, names, sensitivity=False)
    assert kc.plan(model, _recipe("gpt2", {"keep": 0.5}), stats).allocation["sensitivity"].startswith("uniform (the statistics")
    uniform = _recipe("gpt2", {"keep": 0.5, "sensitivity": "uniform"})
    assert kc.plan(model, uniform, stats).allocation["sensitivity"] == "uniform"


def test_kronecker_and_svd_compete_under_one_budget(tiny_model):
    model = tiny_model("gpt2")
    plan = kc.plan(model, _recipe("gpt2", {"keep": 0.5, "strategies": ["svd", "kronecker"]}))
    assert plan.allocation["strategies"] == ["svd", "kronecker"]
    assert {row.strategy for row in plan.rows} <= {"svd", "kronecker"}
    assert plan.allocation["params"] <= plan.allocation["budget"]


def test_meta_model_gets_a_uniform_preview(tiny_model):
    model = tiny_model("gpt2", device="meta")
    plan = kc.plan(model, _recipe("gpt2", {"keep": 0.5}))
    assert plan.allocation["basis"].startswith("weight shapes only")
    assert len({entry["kept"] for entry in plan.allocation["modules"].values()}) <= 3  # one ratio, rounded per shape


@pytest.mark.parametrize("budget,match", [
    ({"params": 10**9}, "no less than"),
    ({"keep": 1.5}, "budget.keep"),
    ({"keep": 0.5, "strategies": ["tucker"]}, "budget.strategies"),
])
def test_bad_budgets_name_the_field(budget, match, tiny_model):
    with pytest.raises(ValueError, match=match):
        kc.plan(tiny_model("gpt2"), _recipe("gpt2", budget))


def test_sensitivity_survives_the_statistics_file(tiny_model, tmp_path):
    model = tiny_model("gpt2")
    names = kc.plan(model, _recipe("gpt2", {"keep": 0.5})).allocation["group"]
    stats = _stats(model, names)
    loaded = kc.CalibrationStats.load(stats.save(tmp_path / "stats.safetensors"))
    assert loaded.sensitivity == pytest.approx(stats.sensitivity)
    assert kc.plan(model, _recipe("gpt2", {"keep": 0.5}), loaded).allocation["sensitivity"] == "measured"
