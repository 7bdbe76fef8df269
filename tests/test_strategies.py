"""Strategy configuration and planning: explicit shapes, ratios met or refused, bad options and shapes named.

What every strategy must do on every layout, dtype and architecture (forward, backward, plan, compress, save,
load, from_pretrained, distil) is the contract matrix in tests/test_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kroncompress as kc

OPTIONS = {"kronecker": {"ratio": 2}, "svd": {"ratio": 2}, "tucker": {"ratio": 2}, "cp": {"ratio": 2}, "tt": {"ratio": 2}}
OUT_FEATURES, IN_FEATURES, VOCAB, DIM = 32, 48, 64, 16


def test_kronecker_exact_weight_is_recovered_with_explicit_shapes():
    A, B = torch.randn(2, 8, 24, dtype=torch.float64), torch.randn(2, 4, 2, dtype=torch.float64)
    module = nn.Linear(IN_FEATURES, OUT_FEATURES, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(kc.kron_sum(A, B))
    new, plan, error = kc.get_strategy("kronecker")(b_shape=[4, 2], rank=2).compress_module(module)
    assert plan.spec == {"a_shape": [8, 24], "b_shape": [4, 2], "rank": 2}
    assert error < 1e-12
    assert plan.params_after == 2 * (8 * 24 + 4 * 2) + OUT_FEATURES


def test_embedding_padding_idx_is_kept():
    module = nn.Embedding(VOCAB, DIM, padding_idx=3)
    new, _, _ = kc.get_strategy("kronecker")(ratio=2).compress_module(module)
    assert new.padding_idx == 3 and new.to_dense().padding_idx == 3


@pytest.mark.parametrize("name", [n for n in OPTIONS if "embedding" not in kc.get_strategy(n).kinds])
def test_strategy_refuses_an_embedding_it_cannot_compress(name):
    with pytest.raises(ValueError, match="embedding"):
        kc.get_strategy(name)(**OPTIONS[name]).compress_module(nn.Embedding(VOCAB, DIM))


# --- bad options and shapes -----------------------------------------------------------------------
BAD_OPTIONS = [
    # (strategy, options, fragments the message must contain)
    ("kronecker", {"ratio": 1}, ["'kronecker'", "'ratio'", "> 1"]),
    ("kronecker", {"ratio": 0.5}, ["'ratio'", "> 1"]),
    ("kronecker", {}, ["ratio", "b_shape"]),
    ("kronecker", {"ratio": 2, "b_shape": [1, 2]}, ["exactly one"]),
    ("kronecker", {"ratoi": 2}, ["'ratoi'", "did you mean 'ratio'"]),
    ("kronecker", {"b_shape": [1, 2], "rank": 0}, ["'rank'", "positive"]),
    ("kronecker", {"b_shape": [1, 2], "rank": "auto"}, ["'rank'", "needs ratio"]),
    ("kronecker", {"b_shape": [0, 2]}, ["'b_shape'", "positive"]),
    ("kronecker", {"b_shape": [1, 2, 3]}, ["'b_shape'", "[rows, cols]"]),
    ("svd", {"ratio": 1}, ["'svd'", "'ratio'", "> 1"]),
    ("svd", {"rank": 0}, ["'svd'", "'rank'", "positive"]),
    ("svd", {}, ["rank", "ratio"]),
    ("svd", {"rnak": 4}, ["'rnak'", "did you mean 'rank'"]),
]


@pytest.mark.parametrize("name,options,fragments", BAD_OPTIONS)
def test_bad_options_name_the_field_and_fix(name, options, fragments):
    with pytest.raises(ValueError) as info:
        kc.get_strategy(name)(**options)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


BAD_SHAPES = [
    # (strategy, options, weight shape (out, in), fragments)
    ("kronecker", {"b_shape": [5, 2]}, (32, 48), ["32", "5", "product is 32"]),
    ("kronecker", {"a_shape": [8, 7]}, (32, 48), ["48", "7", "product is 48"]),
    ("kronecker", {"b_shape": [1, 48]}, (32, 48), ["outer product", "'svd'", "allow_degenerate"]),
    ("kronecker", {"a_shape": [32, 1], "b_shape": [1, 48], "allow_degenerate": False}, (32, 48), ["outer product"]),
    ("kronecker", {"b_shape": [2, 2], "rank": 5}, (4, 4), ["'rank'", "min(m1*n1, m2*n2) = 4"]),
    ("svd", {"rank": 40}, (32, 48), ["'rank'", "32 x 48", "1..32"]),
    ("svd", {"ratio": 100}, (8, 8), ["'ratio'", "8 x 8", "1..8"]),
]


@pytest.mark.parametrize("name,options,shape,fragments", BAD_SHAPES)
def test_shapes_that_do_not_fit_name_the_dimensions(name, options, shape, fragments):
    strategy = kc.get_strategy(name)(**options)
    with pytest.raises(ValueError) as info:
        strategy.compress_module(nn.Linear(shape[1], shape[0]))
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


def test_degenerate_explicit_shapes_allowed_on_request():
    module = nn.Linear(IN_FEATURES, OUT_FEATURES)
    new, plan, _ = kc.get_strategy("kronecker")(b_shape=[1, 48], allow_degenerate=True).compress_module(module)
    assert plan.spec["a_shape"] == [32, 1]


NON_2D_PLANS = [
    ("kronecker", {"b_shape": [1, 2]}, {"a_shape": [4, 3], "b_shape": [1, 2], "rank": 1}),
    ("svd", {"rank": 1}, {"rank": 1}),
]


@pytest.mark.parametrize("name,options,spec", NON_2D_PLANS)
def test_non_2d_weight_is_refused(name, options, spec):
    plan = kc.LayerPlan(name, "linear", (4, 6), spec, params_before=24, params_after=0)
    with pytest.raises(ValueError, match=r"2-D.*\(4, 2, 3\)"):
        kc.get_strategy(name)(**options).decompose(torch.ones(4, 2, 3), plan)


# -- a ratio is met or refused, never silently exceeded ----------------------------------------------

RATIO_SHAPES = [(768, 3072), (1024, 1024)]
RATIOS = [1.1, 1.3333, 2, 3, 4, 8]
# The ratio-solved strategies: (name, extra options). kronecker with rank: auto adds terms to meet any ratio.
RATIO_STRATEGIES = [("svd", {}), ("kronecker", {"rank": "auto"}), ("tucker", {}), ("cp", {}), ("tt", {})]


@pytest.mark.parametrize("shape", RATIO_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name, extra", RATIO_STRATEGIES, ids=lambda v: v if isinstance(v, str) else "")
def test_a_ratio_is_met_within_the_strategies_grid(name, extra, ratio, shape):
    from kroncompress.strategies.base import RATIO_BAND

    planned = kc.get_strategy(name)(ratio=ratio, **extra).plan(shape, "linear", bias=False)
    budget = shape[0] * shape[1] / ratio
    # below: never more than the band the refusal allows; above: at most the Kronecker shape search's 1%
    # feasibility tolerance (kronecker_shapes), the tensor and SVD solvers stay within the budget
    assert budget * (1 - RATIO_BAND) <= planned.params_after <= budget * 1.01 + 1, planned.note


@pytest.mark.parametrize("ratio, shape, met", [
    (1.1, (768, 3072), False), (1.3333, (768, 3072), False), (1.3333, (768, 768), False),
    (2, (768, 3072), True), (4, (768, 3072), True), (3, (1024, 1024), False), (4, (1024, 1024), True),
])
def test_kronecker_with_one_term_refuses_a_ratio_it_cannot_meet(ratio, shape, met):
    from kroncompress.strategies import OptionError

    strategy = kc.get_strategy("kronecker")(ratio=ratio)  # rank 1, the default
    if met:
        planned = strategy.plan(shape, "linear", bias=False)
        assert planned.params_after >= shape[0] * shape[1] / ratio * 0.95
        return
    with pytest.raises(OptionError, match="rank: auto") as caught:
        strategy.plan(shape, "linear", bias=False)
    assert caught.value.field == "ratio" and "cannot be met" in caught.value.problem


def test_layerdrop_has_no_ratio_to_exceed():
    import dataclasses

    assert "ratio" not in {f.name for f in dataclasses.fields(kc.get_strategy("layerdrop").Config)}


@pytest.mark.parametrize("value", [float("inf"), float("nan"), True, "2"])
@pytest.mark.parametrize("name", ["svd", "kronecker", "tucker", "cp", "tt"])
def test_a_ratio_must_be_a_finite_number(name, value):
    from kroncompress.recipe import Recipe, RecipeError

    with pytest.raises(RecipeError, match=r"compress\[0\]\.options\.ratio: (must be a finite number|expected)"):
        Recipe.from_dict({"version": 1, "name": "x", "compress": [
            {"targets": ["role:mlp"], "strategy": name, "options": {"ratio": value}}]})


@pytest.mark.parametrize("name, options, field", [
    ("svd", {"ratio": 1e9}, "ratio"), ("kronecker", {"ratio": 1e9}, "ratio"), ("tucker", {"ratio": 1e9}, "ratio"),
    ("cp", {"ratio": 1e9}, "ratio"), ("tt", {"ratio": 1e9}, "ratio"), ("kronecker", {"b_shape": [3, 2]}, "b_shape"),
    ("kronecker", {"a_shape": [5, None]}, "a_shape"), ("tucker", {"ratio": 2, "out_shape": [7, 9]}, "out_shape"),
])
def test_options_a_module_cannot_satisfy_name_the_module_and_the_recipe_field(name, options, field):
    from conftest import build_tiny
    from kroncompress.recipe import Recipe, RecipeError

    recipe = Recipe.from_dict({"version": 1, "name": "x", "compress": [
        {"targets": ["transformer.h.0.mlp.c_fc"], "strategy": "svd", "options": {"rank": 2}},
        {"targets": ["role:mlp"], "strategy": name, "options": options}]})
    with pytest.raises(RecipeError, match=rf"compress\[1\]\.options\.{field}: module transformer\.h\.\d\.mlp\.c_"):
        kc.plan(build_tiny("gpt2", device="meta"), recipe)


@pytest.mark.parametrize("value", [None, 3, ["svd"]])
def test_get_strategy_of_a_non_name_lists_the_strategies(value):
    with pytest.raises(ValueError, match="must be a string.*known: cp, kronecker"):
        kc.get_strategy(value)
