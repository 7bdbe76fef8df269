"""Tucker / CP / tensor-train strategies and layers: exact recovery, budgets, errors (forward, gradients and the
rest of the contract: tests/test_contract.py)."""

from __future__ import annotations

import math

import pytest
import tensorly as tl
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import kroncompress as kc
from kroncompress.linalg.tensorized import balanced_factors, tt_matmul, tt_matmul_flops

# name -> (explicit options small enough to be fast, the weight shape they fit)
EXPLICIT = {
    "tucker": ({"out_shape": [4, 6], "in_shape": [5, 6], "ranks": [2, 3, 3, 4]}, (24, 30)),
    "cp": ({"out_shape": [4, 6], "in_shape": [5, 6], "rank": 3, "n_iter_max": 200, "tol": 1e-14}, (24, 30)),
    "tt": ({"out_shape": [2, 3, 4], "in_shape": [2, 3, 5], "ranks": [3, 4]}, (24, 30)),
}
STRATEGIES = sorted(EXPLICIT)
LAYOUTS = ["linear", "conv1d"]
DTYPES = [torch.float32, torch.float64]


def forward_tol(dtype: torch.dtype, n: int) -> float:
    """Two evaluations of x W^T in different orders (factors vs dense) differ by rounding: a length-n dot
    product in any order is within n eps of the sum of |x_i w_i|, which for Gaussian x and W is a few times
    the largest |y| (4x margin)."""
    return 4 * n * torch.finfo(dtype).eps
def recovery_tol(name: str, weight: torch.Tensor) -> float:
    """The relative reconstruction error allowed for an exactly representable `weight`, from its dtype's eps
    and the problem's conditioning.

    Tucker (HOSVD + HOOI) and TT (TT-SVD) take the leading singular vectors of the tensor's unfoldings from a
    Gram eigensolve, which squares their condition number kappa = s_1 / s_r (r: the rank kept): the subspace,
    hence the fit, is accurate to about eps kappa^2 (10x margin for the short sums). CP's ALS stops when its
    reconstruction error stops decreasing, and tensorly computes that error as sqrt(|T|^2 + |R|^2 - 2<T, R>),
    whose cancellation hides everything below about sqrt(eps): the fit is only guaranteed to a few sqrt(eps)
    (float32: 1.4e-3; seen: 4e-6 on AMD, 1.1e-4 on Intel). Both stay far below what a wrong model or a missed
    component gives (> 1e-2).
    """
    eps = torch.finfo(weight.dtype).eps
    if name == "cp":
        return 4 * math.sqrt(eps)
    return 10 * eps * max(unfolding_conditions(name, weight.double())) ** 2


def unfolding_conditions(name: str, weight: torch.Tensor) -> list[float]:
    """s_1 / s_r of each unfolding the decomposition truncates to rank r (Tucker: the mode unfoldings of the
    (out..., in...) tensor; TT: the sequential unfoldings of the (o_k i_k) tensor)."""
    options = EXPLICIT[name][0]
    out_shape, in_shape = options["out_shape"], options["in_shape"]
    d = len(out_shape)
    tensor = weight.reshape(*out_shape, *in_shape)
    if name == "tucker":
        unfoldings = [(tensor.movedim(k, 0).reshape(tensor.shape[k], -1), r) for k, r in enumerate(options["ranks"])]
    else:
        order = [axis for k in range(d) for axis in (k, d + k)]
        paired = tensor.permute(*order).reshape(*[o * i for o, i in zip(out_shape, in_shape)])
        unfoldings = [(paired.reshape(math.prod(paired.shape[: k + 1]), -1), r) for k, r in enumerate(options["ranks"])]
    conditions = []
    for matrix, rank in unfoldings:
        values = torch.linalg.svdvals(matrix)
        conditions.append(float(values[0] / values[rank - 1]))
    return conditions


def make_plan(name, kind="linear", bias=True, **override):
    options, shape = EXPLICIT[name]
    strategy = kc.get_strategy(name)(**{**options, **override})
    return strategy, strategy.plan(shape, kind, bias=bias)


def random_layer(name, layout, dtype, bias=True):
    torch.manual_seed(0)
    strategy, plan = make_plan(name, layout, bias)
    layer = strategy.build(plan, dtype=dtype)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return strategy, plan, layer


def dense_module(weight, layout):
    out_features, in_features = weight.shape
    module = Conv1D(out_features, in_features) if layout == "conv1d" else nn.Linear(in_features, out_features)
    module = module.to(weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight.T if layout == "conv1d" else weight)
        module.bias.normal_()
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_exactly_representable_weight_is_recovered(name, layout, dtype):
    strategy, plan, source = random_layer(name, layout, torch.float64)
    weight = source.dense_weight().detach().to(dtype)
    module = dense_module(weight, layout)
    backend = tl.get_backend()
    new, new_plan, _ = strategy.compress_module(module)  # its error is in float32; measure in `dtype` here
    assert tl.get_backend() == backend  # no global backend change leaks out
    assert new_plan.spec == plan.spec and new.layout == layout
    assert all(p.dtype == dtype for p in new.parameters())
    error = float((new.dense_weight().detach() - weight).norm() / weight.norm())
    assert error < recovery_tol(name, weight), error
    x = torch.randn(5, weight.shape[1], dtype=dtype)
    expected = module(x)
    # |(W' - W) x| <= |W' - W|_F |x| (Cauchy-Schwarz), plus the rounding of two forwards of length n
    rounding = forward_tol(dtype, weight.shape[1]) * float(expected.abs().max())
    bound = error * float(weight.norm()) * float(x.norm(dim=1).max()) + rounding
    assert float((new(x) - expected).abs().max()) <= bound


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("options", [{}, {"ratio": 3}], ids=["explicit", "ratio"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_planned_params_equal_module_params(name, options, bias):
    base, shape = EXPLICIT[name]
    if options:
        base = {k: v for k, v in base.items() if k not in ("rank", "ranks")}
    if name == "cp":
        base = {**base, "n_iter_max": 3}  # a random weight: convergence is not what this test checks
    strategy = kc.get_strategy(name)(**{**base, **options})
    plan = strategy.plan(shape, "linear", bias=bias)
    weight = torch.randn(*shape)
    built = strategy.build(plan, strategy.decompose(weight, plan), torch.zeros(shape[0]) if bias else None)
    empty = strategy.build(plan)  # the loading path: structure from the plan alone
    assert built.num_params == empty.num_params == plan.params_after
    assert built.spec() == empty.spec() == plan.spec
    assert built.flops_per_token() == plan.flops_after
    empty.load_state_dict(built.state_dict())
    x = torch.randn(3, shape[1])
    assert torch.equal(empty(x), built(x))


@pytest.mark.parametrize("ratio", [2, 4, 8])
@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (768, 768)])
@pytest.mark.parametrize("name", STRATEGIES)
def test_ratio_lands_within_one_percent_below_budget(name, shape, ratio):
    plan = kc.get_strategy(name)(ratio=ratio).plan(shape, "conv1d", weight=None, bias=False)
    budget = shape[0] * shape[1] / ratio
    assert 0.99 * budget <= plan.params_after <= budget, (plan.spec, plan.params_after / budget)
    dims = plan.spec["out_shape"] + plan.spec["in_shape"]
    assert math.prod(plan.spec["out_shape"]) == shape[0] and math.prod(plan.spec["in_shape"]) == shape[1]
    assert max(dims) <= 64  # balanced tensorization, not a trivial (1, m) split


BAD = [
    ("tucker", {}, "'ranks'"),
    ("tucker", {"ranks": [2, 2, 2, 2], "ratio": 2}, "'ranks'"),
    ("cp", {"ratio": 0.5}, "'ratio'"),
    ("cp", {"rank": 0}, "'rank'"),
    ("cp", {"rank": 2, "rnak": 3}, "'rnak'"),
    ("tt", {"ratio": 2, "order": 1}, "'order'"),
    ("tucker", {"ratio": 2, "out_shape": [5, 5]}, "'out_shape'"),
    ("tucker", {"ratio": 2, "in_shape": [5, 7]}, "'in_shape'"),
    ("tucker", {"ratio": 2, "out_shape": [4, 6], "in_shape": [2, 3, 5]}, "'in_shape'"),
    ("tucker", {"ranks": [2, 3, 3]}, "'ranks'"),
    ("tucker", {"ranks": [5, 3, 3, 4], "out_shape": [4, 6], "in_shape": [5, 6]}, "'ranks'"),
    ("tucker", {"ranks": [1, 1, 1, 4], "out_shape": [4, 6], "in_shape": [5, 6]}, "'ranks'"),
    ("tt", {"ranks": [7, 4], "out_shape": [2, 3, 4], "in_shape": [2, 3, 5]}, "'ranks'"),
    ("cp", {"ratio": 10_000}, "'ratio'"),
    ("cp", {"ratio": 2, "n_iter_max": 0}, "'n_iter_max'"),
]


@pytest.mark.parametrize("name,options,field", BAD)
def test_bad_options_name_the_field(name, options, field):
    with pytest.raises(ValueError, match=field) as info:
        kc.get_strategy(name)(**options).plan((24, 30))
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("k,order,expected", [(3072, 2, (48, 64)), (3072, 3, (12, 16, 16)), (768, 2, (24, 32)),
                                               (768, 3, (8, 8, 12)), (7, 2, (1, 7)), (1, 2, (1, 1))])
def test_balanced_factors(k, order, expected):
    assert balanced_factors(k, order) == expected


@pytest.mark.parametrize("right_to_left", [True, False])
def test_tt_both_sweep_directions_agree(right_to_left):
    _, _, layer = random_layer("tt", "linear", torch.float64)
    x = torch.randn(4, layer.in_features, dtype=torch.float64)
    got = tt_matmul(x, list(layer.cores), right_to_left)
    assert torch.allclose(got, x @ layer.dense_weight().T, atol=1e-12)
    assert layer.flops_per_token() == min(tt_matmul_flops(layer.out_shape, layer.in_shape, layer.ranks, rtl)
                                          for rtl in (True, False))


@pytest.mark.parametrize("out_shape,in_shape,ratio", [((24, 96), (24, 32), 2), ((24, 32), (48, 64), 4), ((4, 6), (2, 3), 3),
                                                      ((12, 16, 16), (8, 8, 12), 8)])
def test_vectorised_tucker_rank_search_matches_the_loop(out_shape, in_shape, ratio):
    from kroncompress.linalg import tensorized as tz
    from kroncompress.strategies.tucker import feasible_params

    budget = math.prod(out_shape) * math.prod(in_shape) / ratio
    params_of = feasible_params(lambda r: tz.tucker_params(out_shape, in_shape, r), tz.tucker_ranks_problem)
    max_ranks = tz.tucker_max_ranks(out_shape, in_shape)
    grid = tz.solve_ranks(params_of, max_ranks, budget, params_of_grid=lambda g: tz.tucker_params_grid(out_shape, in_shape, g))
    assert grid == tz.solve_ranks(params_of, max_ranks, budget)
