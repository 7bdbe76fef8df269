"""`tt`: tensor-train (TT-matrix) decomposition of the weight (tensorly TT-SVD), the tensor-train baseline.

Options as for `tucker` (see kroncompress/strategies/tucker.py), with `ranks` the d - 1 inner TT ranks.
The default order is 3 factors per side: with 2, a TT-matrix is exactly a rank-r Kronecker sum (use
`kronecker` for that).

No data-aware init (see docs/dataaware.md): the fit works on the tensorized weight, and an input metric C
couples all input modes, so the mode updates stop being small SVD / least-squares problems; calibration
statistics are ignored here.
"""

from __future__ import annotations

from dataclasses import dataclass

from kroncompress.layers.tt import TTLinear
from kroncompress.linalg.tensorized import tt_decompose, tt_matmul_flops, tt_max_ranks, tt_params, tt_ranks_problem
from kroncompress.strategies.base import check_forward_mode, LayerPlan, Strategy, StrategyConfig, dense_flops, linear_params
from kroncompress.strategies.registry import register_strategy
from kroncompress.strategies.tucker import check_explicit_ranks, check_tensor_options, feasible_params, ranks_for_ratio, resolve_tensorization


@dataclass
class TTConfig(StrategyConfig):
    """ranks: the d - 1 inner TT ranks, or ratio: target m n / params. out_shape / in_shape / order: the
    tensorization (default 3 balanced factors per side). TT-SVD is deterministic, so no iteration options."""

    ranks: list | None = None
    ratio: float | None = None
    out_shape: list | None = None
    in_shape: list | None = None
    order: int = 3
    forward_mode: str = "factored"  # or "dense": W built once next to the factors (see FactorizedLinear)

    def __post_init__(self):
        check_forward_mode("tt", self.forward_mode)
        check_tensor_options("tt", self, "ranks", min_order=2)


@register_strategy("tt")
class TTStrategy(Strategy):
    Config = TTConfig

    def plan(self, shape, kind="linear", weight=None, bias=True, stats=None):
        self.check_kind(kind)
        cfg = self.config
        out_shape, in_shape = resolve_tensorization(self.name, cfg, shape)
        max_ranks = tt_max_ranks(out_shape, in_shape)
        if cfg.ranks is not None:
            problem = lambda r: tt_ranks_problem(out_shape, in_shape, r)  # noqa: E731
            ranks = check_explicit_ranks(self.name, "ranks", cfg.ranks, max_ranks, "inner TT ranks r_1..r_{d-1}", problem)
            note = "explicit ranks"
        else:
            params_of = feasible_params(lambda r: tt_params(out_shape, in_shape, r), lambda r: tt_ranks_problem(out_shape, in_shape, r))
            ranks, note = ranks_for_ratio(self.name, cfg, shape, params_of, max_ranks)
        return LayerPlan(
            strategy=self.name, kind=kind, shape=tuple(shape),
            spec={"out_shape": list(out_shape), "in_shape": list(in_shape), "ranks": ranks},
            params_before=linear_params(shape, kind, bias),
            params_after=tt_params(out_shape, in_shape, ranks) + (shape[0] if bias else 0),
            flops_before=dense_flops(shape, kind), flops_after=tt_matmul_flops(out_shape, in_shape, ranks), note=note,
        )

    def decompose(self, weight, plan, stats=None):
        spec = plan.spec
        cores = tt_decompose(weight, spec["out_shape"], spec["in_shape"], spec["ranks"])
        return {f"core_{k}": c for k, c in enumerate(cores)}

    def build(self, plan, factors=None, bias=None, device=None, dtype=None):
        spec = plan.spec
        if factors is not None:
            return TTLinear.from_factors([factors[f"core_{k}"] for k in range(len(spec["out_shape"]))], bias, plan.kind)
        has_bias = plan.params_after > tt_params(spec["out_shape"], spec["in_shape"], spec["ranks"])
        return TTLinear(spec["out_shape"], spec["in_shape"], spec["ranks"], has_bias, plan.kind, device, dtype)
