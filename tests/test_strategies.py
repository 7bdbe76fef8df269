"""Every registered strategy x layout x dtype through compress_module, plus config validation.

Strategies join the grid automatically from kc.list_strategies(); OPTIONS says how to configure each
(a name missing from it is skipped, with the reason shown by pytest -rs).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import kroncompress as kc

OPTIONS = {
    "kronecker": {"ratio": 2},
    "svd": {"ratio": 2},
    "tucker": {"ratio": 2},
    "cp": {"ratio": 2},
    "tt": {"ratio": 2},
}
OUT_FEATURES, IN_FEATURES, VOCAB, DIM = 32, 48, 64, 16
DTYPES = [torch.float32, torch.float64]


def forward_tol(dtype: torch.dtype, n: int) -> float:
    """Relative to the largest output: the factorized and the dense forward differ by rounding only, and a
    length-n dot product in any order is within n eps of the sum of |x_i w_i|, a few times the largest
    |y| for these Gaussian inputs (4x margin; seen: at most 0.11 n eps)."""
    return 4 * n * torch.finfo(dtype).eps
# layout -> (strategy kind, dense class to_dense() must return)
LAYOUTS = {
    "linear": ("linear", nn.Linear),
    "linear_nobias": ("linear", nn.Linear),
    "conv1d": ("conv1d", Conv1D),
    "embedding": ("embedding", nn.Embedding),
}


def make_module(layout: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if layout == "linear":
        module = nn.Linear(IN_FEATURES, OUT_FEATURES)
    elif layout == "linear_nobias":
        module = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    elif layout == "conv1d":
        module = Conv1D(OUT_FEATURES, IN_FEATURES)
        nn.init.normal_(module.bias)  # Conv1D starts with a zero bias; make it visible in the output
    else:
        module = nn.Embedding(VOCAB, DIM)
    return module.to(dtype)


def weight_out_by_in(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def sample_input(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if isinstance(module, nn.Embedding):
        return torch.randint(0, module.num_embeddings, (3, 7), generator=generator)
    in_features = module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features
    return torch.randn(2, 5, in_features, generator=generator, dtype=dtype)


def grid():
    cases = []
    for name in kc.list_strategies():
        kinds = kc.get_strategy(name).kinds
        for layout, (kind, _) in LAYOUTS.items():
            if kind not in kinds:
                continue
            marks = [] if name in OPTIONS else [pytest.mark.skip(reason=f"no OPTIONS entry for strategy {name!r}")]
            for dtype in DTYPES:
                cases.append(pytest.param(name, layout, dtype, marks=marks, id=f"{name}-{layout}-{str(dtype)[6:]}"))
    return cases


def compress(name, layout, dtype):
    module = make_module(layout, dtype)
    strategy = kc.get_strategy(name)(**OPTIONS[name])
    new, plan, error = strategy.compress_module(module)
    return module, strategy, new, plan, error


def test_grid_covers_the_builtin_strategies_and_layouts():
    covered = {(p.values[0], p.values[1]) for p in grid()}
    assert {("kronecker", "linear"), ("kronecker", "conv1d"), ("kronecker", "embedding"), ("svd", "conv1d")} <= covered


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_forward_equals_to_dense_forward(name, layout, dtype):
    module, _, new, _, _ = compress(name, layout, dtype)
    x = sample_input(module, dtype)
    dense = new.to_dense()
    assert type(dense) is LAYOUTS[layout][1]
    assert weight_out_by_in(dense).shape == weight_out_by_in(module).shape
    y = new(x)
    assert y.shape == module(x).shape and y.dtype == dtype
    n = DIM if layout == "embedding" else weight_out_by_in(module).shape[1]
    assert (y - dense(x)).abs().max() <= forward_tol(dtype, n) * y.abs().max()


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_forward_does_not_build_the_dense_weight(name, layout, dtype, monkeypatch):
    module, _, new, _, _ = compress(name, layout, dtype)
    monkeypatch.setattr(new, "dense_weight", lambda: pytest.fail("forward built the dense weight"))
    new(sample_input(module, dtype))


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_backward_reaches_every_parameter(name, layout, dtype):
    module, _, new, _, _ = compress(name, layout, dtype)
    x = sample_input(module, dtype)
    if layout == "embedding":
        x = torch.arange(module.num_embeddings)  # every row, so every factor entry gets a gradient
    new(x).pow(2).sum().backward()
    for param_name, param in new.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_plan_counts_and_reported_error(name, layout, dtype):
    module, strategy, new, plan, error = compress(name, layout, dtype)
    assert plan.strategy == name and plan.kind == LAYOUTS[layout][0]
    assert plan.params_before == sum(p.numel() for p in module.parameters())
    assert plan.params_after == new.num_params == sum(p.numel() for p in new.parameters())
    assert plan.params_after < plan.params_before
    W = weight_out_by_in(module).detach().double()
    expected = ((W - new.dense_weight().detach().double()).norm() / W.norm()).item()
    assert error == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert 0 < error < 1
    if layout != "embedding":
        assert plan.flops_after == new.flops_per_token()


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_build_without_factors_has_the_same_structure(name, layout, dtype):
    """build(plan) with no factors is what loading a saved model uses: same parameter names and shapes."""
    _, strategy, new, plan, _ = compress(name, layout, dtype)
    plan = kc.LayerPlan.from_dict(plan.to_dict())
    empty = strategy.build(plan, device="meta", dtype=dtype)
    shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in empty.state_dict().items()} == shapes
    assert all(v.dtype == dtype for v in empty.state_dict().values())


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_plan_needs_no_weights(name, layout, dtype):
    module, strategy, _, plan_with_weight, _ = compress(name, layout, dtype)
    shape = tuple(weight_out_by_in(module).shape)
    bias = getattr(module, "bias", None) is not None
    plan = strategy.plan(shape, LAYOUTS[layout][0], bias=bias)
    meta = weight_out_by_in(module).detach().to("meta")
    assert strategy.plan(shape, LAYOUTS[layout][0], weight=meta, bias=bias) == plan
    assert plan.params_before == plan_with_weight.params_before


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


@pytest.mark.parametrize("name", [n for n in kc.list_strategies() if "embedding" not in kc.get_strategy(n).kinds and n in OPTIONS])
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
