"""Strategy registry: decorator registration, duplicates, did-you-mean, and the entry-point group."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import kroncompress as kc
from kroncompress.strategies import registry
from kroncompress.strategies.svd import SVDStrategy


@pytest.fixture
def isolated_registry(monkeypatch):
    """A private copy of the registry (and a fresh entry-point flag), restored after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    return registry


@dataclass
class HalfRankConfig(kc.StrategyConfig):
    divisor: int = 2


class HalfRank(SVDStrategy):
    """A third-party strategy: truncated SVD at rank min(m, n) // divisor."""

    Config = HalfRankConfig

    def rank_for(self, shape):
        return max(1, min(shape) // self.config.divisor)


class FakeEntryPoint:
    def __init__(self, name, target, value="thirdparty.module:Strategy"):
        self.name, self.value, self.target, self.loads = name, value, target, 0

    def load(self):
        self.loads += 1
        if isinstance(self.target, Exception):
            raise self.target
        return self.target


def fake_entry_points(*points):
    def entry_points(group):
        assert group == "kroncompress.strategies"
        return list(points)

    return entry_points


def test_decorator_registers_a_third_party_strategy(isolated_registry):
    registered = kc.register_strategy("halfrank")(HalfRank)
    assert registered is HalfRank and HalfRank.name == "halfrank"
    assert kc.get_strategy("halfrank") is HalfRank
    assert "halfrank" in kc.list_strategies()
    new, plan, _ = kc.get_strategy("halfrank")(divisor=4).compress_module(nn.Linear(16, 8))
    assert plan.strategy == "halfrank" and plan.spec == {"rank": 2}
    assert new.num_params == plan.params_after == 2 * (16 + 8) + 8


def test_builtins_are_registered():
    assert {"kronecker", "svd"} <= set(kc.list_strategies())
    assert kc.list_strategies() == sorted(kc.list_strategies())


@pytest.mark.parametrize("name", ["kronecker", "svd"])
def test_duplicate_names_are_refused(isolated_registry, name):
    with pytest.raises(ValueError, match=f"{name!r} is already registered"):
        kc.register_strategy(name)(HalfRank)
    kc.register_strategy(name)(kc.get_strategy(name))  # re-registering the same class is harmless


@pytest.mark.parametrize("not_a_strategy", [object, nn.Linear, lambda: None])
def test_only_strategy_subclasses_register(isolated_registry, not_a_strategy):
    with pytest.raises(TypeError, match="subclass of kroncompress.Strategy"):
        kc.register_strategy("bogus")(not_a_strategy)
    assert "bogus" not in registry._REGISTRY


@pytest.mark.parametrize("typo,suggestion", [("kroneker", "kronecker"), ("svdd", "svd"), ("Kronecker", "kronecker")])
def test_unknown_strategy_suggests_the_closest_name(isolated_registry, typo, suggestion):
    with pytest.raises(ValueError) as info:
        kc.get_strategy(typo)
    message = str(info.value)
    assert f"unknown strategy {typo!r}" in message and f"did you mean {suggestion!r}" in message
    assert "kronecker" in message and "svd" in message  # the known names


def test_entry_point_group_is_consulted(isolated_registry, monkeypatch):
    plugin = FakeEntryPoint("plugin", HalfRank)
    monkeypatch.setattr(registry, "entry_points", fake_entry_points(plugin))
    assert kc.get_strategy("plugin") is HalfRank
    assert "plugin" in kc.list_strategies()
    kc.get_strategy("plugin")
    assert plugin.loads == 1  # loaded once, then cached


def test_entry_points_are_loaded_by_list_strategies(isolated_registry, monkeypatch):
    monkeypatch.setattr(registry, "entry_points", fake_entry_points(FakeEntryPoint("plugin", HalfRank)))
    assert "plugin" in kc.list_strategies()


def test_entry_point_does_not_replace_a_builtin(isolated_registry, monkeypatch):
    shadow = FakeEntryPoint("svd", HalfRank)
    monkeypatch.setattr(registry, "entry_points", fake_entry_points(shadow))
    assert kc.get_strategy("svd") is SVDStrategy and "svd" in kc.list_strategies()
    assert shadow.loads == 0


@pytest.mark.parametrize("target,error,fragments", [
    (ImportError("No module named 'thirdparty'"), ValueError, ["'broken'", "thirdparty.module:Strategy", "No module named"]),
    (object, TypeError, ["'broken'", "subclass of kroncompress.Strategy"]),
])
def test_broken_entry_point_names_itself(isolated_registry, monkeypatch, target, error, fragments):
    monkeypatch.setattr(registry, "entry_points", fake_entry_points(FakeEntryPoint("broken", target)))
    with pytest.raises(error) as info:
        kc.get_strategy("broken")
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


def test_strategy_takes_a_config_or_options_not_both():
    config = kc.get_strategy("svd").Config(rank=2)
    assert kc.get_strategy("svd")(config).options() == {"rank": 2, "ratio": None, "init": "auto", "forward_mode": "factored"}
    with pytest.raises(TypeError, match="not both"):
        kc.get_strategy("svd")(config, rank=3)


def test_layer_plan_round_trips_through_a_dict():
    plan = kc.get_strategy("kronecker")(ratio=2).plan((32, 48), "conv1d", weight=torch.randn(32, 48))
    assert kc.LayerPlan.from_dict(plan.to_dict()) == plan
