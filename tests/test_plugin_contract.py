"""The strategy contract as a plugin author meets it: a minimal third-party strategy, written against the
documented base class only, goes through plan, calibrate, compress, save, load and the CLI `plan`."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

import kroncompress as kc
from kroncompress.calibration import CalibrationStats, InputStatistic, calibration_targets
from kroncompress.cli.main import cli
from kroncompress.strategies import registry
from kroncompress.strategies.base import dense_flops, linear_params
from conftest import build_inputs, build_tiny


@pytest.fixture
def plugin(monkeypatch):
    """Register the plugin in a private copy of the registry (as `@kc.register_strategy` in a package does)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [])

    @dataclass
    class HeadsConfig(kc.StrategyConfig):
        keep: int = 4  # singular values kept

        def __post_init__(self):
            if not isinstance(self.keep, int) or self.keep < 1:
                raise kc.OptionError("heads", "keep", f"must be a positive int, got {self.keep!r}")

    @kc.register_strategy("heads")
    class Heads(kc.Strategy):
        """Keeps the top singular values; with statistics, records that it got them."""

        Config = HeadsConfig
        uses_calibration = True
        seen_stats: list = []
        planned_stats: list = []

        def plan(self, shape, kind="linear", weight=None, bias=True, stats=None):
            Heads.planned_stats.append(stats is not None)
            self.check_kind(kind)
            m, n = shape
            k = self.config.keep
            return kc.LayerPlan(self.name, kind, tuple(shape), {"rank": k}, linear_params(shape, kind, bias),
                                k * (m + n) + (m if bias else 0), dense_flops(shape, kind), 2 * k * (m + n))

        def decompose(self, weight, plan, stats=None):
            Heads.seen_stats.append(stats is not None)
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            k = plan.spec["rank"]
            return {"u": U[:, :k] * S[:k], "v": Vh[:k]}

        def build(self, plan, factors=None, bias=None, device=None, dtype=None):
            if factors is not None:
                return kc.LowRankLinear.from_factors(factors["u"], factors["v"], bias, plan.kind)
            m, n = plan.shape
            has_bias = plan.params_after > plan.spec["rank"] * (m + n)
            return kc.LowRankLinear(n, m, plan.spec["rank"], has_bias, plan.kind, device, dtype)

    return Heads


def _recipe(**options):
    return kc.Recipe.from_dict({"version": 1, "name": "plugin", "compress": [
        {"targets": ["role:mlp"], "strategy": "heads", "options": options}]})


def test_a_plugin_goes_through_plan_compress_save_load(plugin, tmp_path):
    model = build_tiny("gpt2")
    inputs = build_inputs("gpt2")
    planned = kc.plan(model, _recipe(keep=8))
    assert {row.strategy for row in planned.rows} == {"heads"} and len(planned.rows) == 4
    report = kc.compress(model, planned)  # the plan itself, not the recipe again
    assert report.params_after == planned.params_after
    assert plugin.seen_stats == [False] * 4
    with torch.no_grad():
        expected = model(**inputs).logits
    kc.save_compressed(model, tmp_path / "out")
    loaded = kc.load_compressed(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_a_plugin_that_declares_calibration_receives_statistics(plugin):
    model = build_tiny("gpt2")
    planned = kc.plan(model, _recipe())
    names = calibration_targets(model, planned)
    assert names == [row.name for row in planned.rows]
    inputs = []
    for name in names:  # identity statistics: what decompose receives does not matter, only that it does
        n = model.get_submodule(name).weight.shape[0]  # Conv1D: (in, out)
        inputs.append(InputStatistic(torch.eye(n, dtype=torch.float64), tokens=1, modules=[name]))
    report = kc.compress(model, planned, calibration=CalibrationStats(inputs))
    assert plugin.seen_stats == [True] * 4
    assert all(row.output_error is not None for row in report.rows)


def test_a_plugin_without_calibration_is_passed_stats_none(plugin):
    class WeightOnly(plugin):
        uses_calibration = False

    kc.register_strategy("weight-only")(WeightOnly)
    model = build_tiny("gpt2")
    recipe = kc.Recipe.from_dict({"version": 1, "name": "x", "compress": [
        {"targets": ["role:mlp"], "strategy": "weight-only", "options": {}}]})
    stats = CalibrationStats([InputStatistic(torch.eye(model.get_submodule(name).weight.shape[0], dtype=torch.float64),
                                             tokens=1, modules=[name]) for name in calibration_targets(model, kc.plan(model, _recipe()))])
    plugin.planned_stats.clear()
    kc.compress(model, recipe, calibration=stats)
    assert plugin.planned_stats == [False] * 4 and plugin.seen_stats == [False] * 4  # always passed, None here


MISSPELLED = {  # `statistics` is not the contract's name
    "plan": lambda self, shape, kind="linear", weight=None, bias=True, statistics=None: None,
    "decompose": lambda self, weight, plan, statistics=None: None,
}


@pytest.mark.parametrize("method", sorted(MISSPELLED))
def test_a_plugin_whose_method_has_no_stats_parameter_is_refused_at_registration(plugin, method):
    misspelled_cls = type("Misspelled", (plugin,), {method: MISSPELLED[method]})
    with pytest.raises(TypeError, match=rf"Misspelled.{method}\(\) has no `stats` parameter.*add `stats=None`"):
        kc.register_strategy("misspelled")(misspelled_cls)
    assert "misspelled" not in registry._REGISTRY


def test_a_plugin_option_error_names_its_recipe_field(plugin):
    with pytest.raises(kc.RecipeError, match=r"compress\[0\]\.options\.keep: must be a positive int"):
        _recipe(keep=0)


def test_structural_strategies_are_siblings_of_the_factorising_ones():
    from kroncompress.strategies.base import BaseStrategy

    layerdrop = kc.get_strategy("layerdrop")
    assert issubclass(layerdrop, kc.StructuralStrategy) and not issubclass(layerdrop, kc.Strategy)
    assert not any(hasattr(layerdrop, method) for method in ("plan", "decompose", "build", "compress_module"))
    for name in kc.list_strategies():
        cls = kc.get_strategy(name)
        assert issubclass(cls, BaseStrategy) and issubclass(cls, kc.Strategy) != issubclass(cls, kc.StructuralStrategy)


def test_a_structural_plugin_registers_and_a_strategy_of_neither_kind_does_not(plugin):
    class KeepFirst(kc.StructuralStrategy):
        def plan_layers(self, layer_params):
            return kc.LayerPlan(self.name, "layers", (len(layer_params), 1), {"keep": [0], "num_layers": len(layer_params)},
                                sum(layer_params), layer_params[0])

        def apply(self, model, layers_name, plan):
            from kroncompress.strategies.layerdrop import drop_layers

            drop_layers(model, layers_name, plan.spec["keep"])

    kc.register_strategy("keep-first")(KeepFirst)
    model = build_tiny("gpt2")
    recipe = kc.Recipe.from_dict({"version": 1, "name": "x", "compress": [
        {"targets": ["role:layers"], "strategy": "keep-first", "options": {}}]})
    report = kc.compress(model, recipe)
    assert len(model.transformer.h) == 1 and model.config.n_layer == 1 and report.params_after < report.params_before
    from kroncompress.strategies.base import BaseStrategy

    with pytest.raises(TypeError, match="Strategy or kroncompress.StructuralStrategy"):
        kc.register_strategy("neither")(type("Neither", (BaseStrategy,), {}))


def test_cli_plan_lists_the_plugin(plugin, tmp_path):
    folder = tmp_path / "tiny"
    build_tiny("gpt2").save_pretrained(folder)
    recipe = tmp_path / "plugin.yaml"
    recipe.write_text("version: 1\nname: plugin\ncompress:\n  - {targets: ['role:mlp'], strategy: heads, options: {keep: 8}}\n")
    result = CliRunner().invoke(cli, ["plan", str(folder), "--recipe", str(recipe), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [m["strategy"] for m in data["modules"]] == ["heads"] * 4
    assert data["modules"][0]["spec"] == {"rank": 8}
