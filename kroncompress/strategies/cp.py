"""`cp`: CP (CANDECOMP/PARAFAC) decomposition of the tensorized weight (tensorly ALS), the CP baseline.

Options as for `tucker` (see kroncompress/strategies/tucker.py), with a single `rank`. Beware the cost:
ALS solves an R x R system per mode and iteration, so a 2x ratio on a 768 x 3072 weight (R ~ 7000) takes
minutes per iteration on a CPU; `n_iter_max` bounds it.

No data-aware init (see docs/dataaware.md): the fit works on the tensorized weight, and an input metric C
couples all input modes, so the mode updates stop being small SVD / least-squares problems; calibration
statistics are ignored here.
"""

from __future__ import annotations

from dataclasses import dataclass

from kroncompress.errors import OptionError
from kroncompress.layers.cp import CPLinear
from kroncompress.linalg.tensorized import cp_decompose, cp_matmul_flops, cp_params
from kroncompress.strategies.base import (
    LayerPlan, Strategy, StrategyConfig, check_forward_mode, dense_flops, is_int, linear_params,
)
from kroncompress.strategies.registry import register_strategy
from kroncompress.strategies.tucker import check_tensor_options, ranks_for_ratio, resolve_tensorization


@dataclass
class CPConfig(StrategyConfig):
    """rank: the number of rank-one terms R, or ratio: target m n / params (R = floor(budget / sum of mode
    sizes)). out_shape / in_shape / order: the tensorization. n_iter_max, tol, random_state: the ALS."""

    rank: int | None = None
    ratio: float | None = None
    out_shape: list | None = None
    in_shape: list | None = None
    order: int = 2
    n_iter_max: int = 25
    tol: float = 1e-8
    random_state: int = 0
    forward_mode: str = "factored"  # or "dense": W built once next to the factors (see FactorizedLinear)

    def __post_init__(self):
        check_forward_mode("cp", self.forward_mode)
        check_tensor_options("cp", self, "rank")
        if self.rank is not None and (not is_int(self.rank) or self.rank < 1):
            raise OptionError("cp", "rank", f"must be a positive int, got {self.rank!r}")


@register_strategy("cp")
class CPStrategy(Strategy):
    Config = CPConfig

    def plan(self, shape, kind="linear", weight=None, bias=True, stats=None):
        self.check_kind(kind)
        cfg = self.config
        out_shape, in_shape = resolve_tensorization(self.name, cfg, shape)
        if cfg.rank is not None:
            rank, note = cfg.rank, "explicit rank"
        else:
            # CP rank has no upper limit short of m n; the budget is the only bound.
            (rank,), note = ranks_for_ratio(self.name, cfg, shape, lambda r: cp_params(out_shape, in_shape, r[0]),
                                            [shape[0] * shape[1]])
        return LayerPlan(
            strategy=self.name, kind=kind, shape=tuple(shape),
            spec={"out_shape": list(out_shape), "in_shape": list(in_shape), "rank": rank},
            params_before=linear_params(shape, kind, bias),
            params_after=cp_params(out_shape, in_shape, rank) + (shape[0] if bias else 0),
            flops_before=dense_flops(shape, kind), flops_after=cp_matmul_flops(out_shape, in_shape, rank), note=note,
        )

    def decompose(self, weight, plan, stats=None):
        spec, cfg = plan.spec, self.config
        factors = cp_decompose(weight, spec["out_shape"], spec["in_shape"], spec["rank"],
                               n_iter_max=cfg.n_iter_max, tol=cfg.tol, random_state=cfg.random_state)
        return {f"factor_{k}": f for k, f in enumerate(factors)}

    def build(self, plan, factors=None, bias=None, device=None, dtype=None):
        spec = plan.spec
        d = len(spec["out_shape"])
        if factors is not None:
            return CPLinear.from_factors([factors[f"factor_{k}"] for k in range(2 * d)], d, bias, plan.kind)
        has_bias = plan.params_after > cp_params(spec["out_shape"], spec["in_shape"], spec["rank"])
        return CPLinear(spec["out_shape"], spec["in_shape"], spec["rank"], has_bias, plan.kind, device, dtype)
