"""`tucker`: Tucker decomposition of the tensorized weight (HOOI on Gram eigensolves), the Tucker baseline.

Also home of the option handling shared by the tensor strategies (`tucker`, `cp`, `tt`): an explicit or
automatic tensorization (out = prod out_shape, in = prod in_shape) and ranks given explicitly or solved
from a target `ratio` (m n / factor parameters; the bias is not counted). Ratio-solved ranks never
exceed the budget (the ratio is met or exceeded) and use as much of it as the rank grid allows, which is
within 1% for the usual transformer shapes; the plan's note says how much was used.

No data-aware init (see docs/dataaware.md): the fit works on the tensorized weight, and an input metric C
couples all input modes, so the mode updates stop being small SVD / least-squares problems; calibration
statistics are ignored here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

from kroncompress.errors import OptionError
from kroncompress.layers.tucker import TuckerLinear
from kroncompress.linalg.tensorized import (
    balanced_factors, solve_ranks, tucker_ranks_problem, tucker_decompose, tucker_matmul_flops, tucker_max_ranks, tucker_params,
    tucker_params_grid,
)
from kroncompress.strategies.base import (
    LayerPlan, Strategy, StrategyConfig, check_forward_mode, dense_flops, is_int, is_ratio, linear_params,
)
from kroncompress.strategies.registry import register_strategy


def check_tensor_options(strategy: str, cfg, rank_field: str, min_order: int = 1) -> None:
    """Validate ratio / out_shape / in_shape / order and that exactly one of `rank_field` or ratio is given."""
    if (getattr(cfg, rank_field) is None) == (cfg.ratio is None):
        raise OptionError(strategy, rank_field, f"give either {rank_field} or ratio (e.g. 2), exactly one of them")
    if cfg.ratio is not None and not is_ratio(cfg.ratio):
        raise OptionError(strategy, "ratio", f"must be a finite number > 1 (2 halves the parameters), got {cfg.ratio!r}")
    if not is_int(cfg.order) or cfg.order < min_order:
        raise OptionError(strategy, "order", f"must be an int >= {min_order} (factors per side), got {cfg.order!r}")
    for name in ("out_shape", "in_shape"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) < min_order or not all(is_int(v) and v >= 1 for v in value):
            raise OptionError(strategy, name, f"expected a list of at least {min_order} positive ints, e.g. [48, 64], got {value!r}")
    if cfg.out_shape is not None and cfg.in_shape is not None and len(cfg.out_shape) != len(cfg.in_shape):
        raise OptionError(strategy, "in_shape", f"needs as many factors as out_shape {list(cfg.out_shape)} "
                          f"(got {list(cfg.in_shape)}); pad with 1s")
    for name in ("n_iter_max",):
        if hasattr(cfg, name) and (not is_int(getattr(cfg, name)) or getattr(cfg, name) < 1):
            raise OptionError(strategy, name, f"must be a positive int, got {getattr(cfg, name)!r}")


def resolve_tensorization(strategy: str, cfg, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out_shape, in_shape) for an (m x n) weight: the configured ones, or balanced factors of `order`."""
    m, n = shape
    order = len(cfg.out_shape) if cfg.out_shape is not None else len(cfg.in_shape) if cfg.in_shape is not None else cfg.order
    result = []
    for name, given, size in (("out_shape", cfg.out_shape, m), ("in_shape", cfg.in_shape, n)):
        if given is None:
            result.append(balanced_factors(size, order))
        elif math.prod(given) != size:
            raise OptionError(strategy, name, f"{list(given)} multiplies to {math.prod(given)}, but the weight "
                              f"{m} x {n} has {size}; use factors of {size}, e.g. {list(balanced_factors(size, order))}, "
                              "or leave it out to choose automatically")
        else:
            result.append(tuple(given))
    return result[0], result[1]


def ranks_for_ratio(strategy: str, cfg, shape, params_of, max_ranks, params_of_grid=None) -> tuple[list[int], str]:
    """Solve ranks for cfg.ratio; ConfigError naming ratio when even the smallest ranks exceed the budget."""
    budget = shape[0] * shape[1] / cfg.ratio
    ranks = solve_ranks(params_of, max_ranks, budget, params_of_grid=params_of_grid)
    if ranks is None:
        raise OptionError(strategy, "ratio", f"{cfg.ratio} is too high for a {shape[0]} x {shape[1]} weight: the "
                          f"smallest ranks need {params_of([1] * len(max_ranks))} parameters > budget {budget:.0f}; "
                          "lower the ratio or use more factors (order)")
    used = params_of(ranks) / budget
    return ranks, f"ranks from ratio {cfg.ratio}: {used:.2%} of the budget of {budget:.0f} parameters"


def check_explicit_ranks(strategy: str, field: str, ranks, max_ranks, what: str, problem=None) -> list[int]:
    if not isinstance(ranks, (list, tuple)) or len(ranks) != len(max_ranks) or not all(is_int(r) for r in ranks):
        raise OptionError(strategy, field, f"needs {len(max_ranks)} ints ({what}), got {ranks!r}")
    bad = [(k, r, mr) for k, (r, mr) in enumerate(zip(ranks, max_ranks)) if not 1 <= r <= mr]
    if bad:
        k, r, mr = bad[0]
        raise OptionError(strategy, field, f"entry {k} is {r}; it must be in 1..{mr} ({what}: maxima {list(max_ranks)})")
    reason = problem(ranks) if problem is not None else None
    if reason:
        raise OptionError(strategy, field, f"{list(ranks)} is not attainable: {reason}; lower that rank")
    return list(ranks)


def feasible_params(params_of, problem):
    """params_of, but infinite for rank combinations the decomposition cannot produce (for the solver)."""
    return lambda ranks: math.inf if problem(ranks) else params_of(ranks)


@dataclass
class TuckerConfig(StrategyConfig):
    """ranks: one per mode (out modes then in modes), or ratio: target m n / params. out_shape / in_shape:
    the tensorization (default: `order` balanced factors per side). n_iter_max, tol, random_state: HOOI."""

    ranks: list | None = None
    ratio: float | None = None
    out_shape: list | None = None
    in_shape: list | None = None
    order: int = 2
    n_iter_max: int = 25
    tol: float = 1e-4  # stop HOOI once the relative error moves less than this per sweep
    random_state: int = 0
    forward_mode: str = "factored"  # or "dense": W built once next to the factors (see FactorizedLinear)

    def __post_init__(self):
        check_forward_mode("tucker", self.forward_mode)
        check_tensor_options("tucker", self, "ranks")


@functools.lru_cache(maxsize=256)
def _ranks_for_ratio(name: str, ratio: float, shape, out_shape, in_shape) -> tuple[list[int], str]:
    """ranks_for_ratio for Tucker, once per shape and ratio (a transformer repeats the same four shapes in every
    block); the ~15,000 rank combinations near the proportional point are counted as one tensor
    (tucker_params_grid), not in Python (0.3 s per shape)."""
    params_of = feasible_params(lambda r: tucker_params(out_shape, in_shape, r), tucker_ranks_problem)
    ranks, note = ranks_for_ratio(name, SimpleNamespace(ratio=ratio), shape, params_of, tucker_max_ranks(out_shape, in_shape),
                                  lambda grid: tucker_params_grid(out_shape, in_shape, grid))
    return tuple(ranks), note


@register_strategy("tucker")
class TuckerStrategy(Strategy):
    Config = TuckerConfig

    def plan(self, shape, kind="linear", weight=None, bias=True, stats=None):
        self.check_kind(kind)
        cfg = self.config
        out_shape, in_shape = resolve_tensorization(self.name, cfg, shape)
        max_ranks = tucker_max_ranks(out_shape, in_shape)
        if cfg.ranks is not None:
            ranks = check_explicit_ranks(self.name, "ranks", cfg.ranks, max_ranks,
                                         f"one per mode of {list(out_shape + in_shape)}", tucker_ranks_problem)
            note = "explicit ranks"
        else:
            ranks, note = _ranks_for_ratio(self.name, cfg.ratio, tuple(shape), tuple(out_shape), tuple(in_shape))
            ranks = list(ranks)
        return LayerPlan(
            strategy=self.name, kind=kind, shape=tuple(shape),
            spec={"out_shape": list(out_shape), "in_shape": list(in_shape), "ranks": ranks},
            params_before=linear_params(shape, kind, bias),
            params_after=tucker_params(out_shape, in_shape, ranks) + (shape[0] if bias else 0),
            flops_before=dense_flops(shape, kind), flops_after=tucker_matmul_flops(out_shape, in_shape, ranks), note=note,
        )

    def decompose(self, weight, plan, stats=None):
        spec, cfg = plan.spec, self.config
        core, factors = tucker_decompose(weight, spec["out_shape"], spec["in_shape"], spec["ranks"],
                                         n_iter_max=cfg.n_iter_max, tol=cfg.tol, random_state=cfg.random_state)
        return {"core": core, **{f"factor_{k}": f for k, f in enumerate(factors)}}

    def build(self, plan, factors=None, bias=None, device=None, dtype=None):
        spec = plan.spec
        if factors is not None:
            ordered = [factors[f"factor_{k}"] for k in range(len(spec["ranks"]))]
            return TuckerLinear.from_factors(factors["core"], ordered, spec["out_shape"], spec["in_shape"], bias, plan.kind)
        has_bias = plan.params_after > tucker_params(spec["out_shape"], spec["in_shape"], spec["ranks"])
        return TuckerLinear(spec["out_shape"], spec["in_shape"], spec["ranks"], has_bias, plan.kind, device, dtype)
