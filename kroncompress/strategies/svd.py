"""`svd`: truncated SVD, W ~ U V with k terms (the low-rank baseline), or the whitened SVD (SVD-LLM)
minimising the output error on calibration inputs (`init: whitened`, see docs/dataaware.md)."""

from __future__ import annotations

from dataclasses import dataclass

from kroncompress.errors import OptionError
from kroncompress.layers.lowrank import LowRankLinear
from kroncompress.linalg.svd import truncated_svd
from kroncompress.linalg.whitening import whitened_svd
from kroncompress.strategies.base import check_forward_mode, LayerPlan, Strategy, StrategyConfig, dense_flops, is_ratio, linear_params
from kroncompress.strategies.registry import register_strategy


INITS = ("auto", "svd", "whitened")
DATA_AWARE_INITS = ("auto", "whitened")  # the inits that use calibration statistics when they are given


@dataclass
class SVDConfig(StrategyConfig):
    """rank: kept singular values; or ratio: target compression, rank = floor(m n / (ratio (m + n))).
    init: "svd" (weight-only), "whitened" (SVD_k(W L) L^-1 with C = L L^T; needs calibration statistics)
    or "auto" (whitened when statistics are given, else svd)."""

    rank: int | None = None
    ratio: float | None = None
    init: str = "auto"
    forward_mode: str = "factored"  # or "dense": W built once next to the factors (see FactorizedLinear)

    def __post_init__(self):
        check_forward_mode("svd", self.forward_mode)
        if self.init not in INITS:
            raise OptionError("svd", "init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        if (self.rank is None) == (self.ratio is None):
            raise OptionError("svd", "rank", "give either rank (e.g. 64) or ratio (e.g. 2), exactly one of them")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise OptionError("svd", "rank", f"must be a positive int, got {self.rank!r}")
        if self.ratio is not None and not is_ratio(self.ratio):
            raise OptionError("svd", "ratio", f"must be a finite number > 1 (2 halves the parameters), got {self.ratio!r}")


@register_strategy("svd")
class SVDStrategy(Strategy):
    Config = SVDConfig
    uses_calibration = True

    def rank_for(self, shape) -> int:
        m, n = shape
        rank = self.config.rank if self.config.rank is not None else int(m * n // (self.config.ratio * (m + n)))
        if not 1 <= rank <= min(m, n):
            field = "rank" if self.config.rank is not None else "ratio"
            raise OptionError("svd", field, f"gives rank {rank} for a {m} x {n} weight; the rank must be in 1..{min(m, n)}")
        return rank

    def plan(self, shape, kind="linear", weight=None, bias=True, stats=None):
        self.check_kind(kind)
        m, n = shape
        rank = self.rank_for(shape)
        return LayerPlan(
            strategy=self.name, kind=kind, shape=tuple(shape), spec={"rank": rank},
            params_before=linear_params(shape, kind, bias), params_after=rank * (m + n) + (m if bias else 0),
            flops_before=dense_flops(shape, kind), flops_after=2 * rank * (m + n),
        )

    def wants_statistics(self, kind: str) -> bool:
        """init whitened or auto (third-party subclasses may bring a Config without `init`: auto)."""
        return getattr(self.config, "init", "auto") in DATA_AWARE_INITS and kind in ("linear", "conv1d")

    def init_for(self, kind: str, stats) -> str:
        """The init that runs: "whitened" when asked (or auto) and statistics exist, else "svd"."""
        return "whitened" if self.wants_statistics(kind) and stats is not None else "svd"

    def decompose(self, weight, plan, stats=None):
        """Factors {"u": m x k, "v": k x n}; with `stats` (the damped n x n input second moment) and init
        whitened/auto, the output-error-optimal rank-k factors instead of the weight-error-optimal ones."""
        if self.init_for(plan.kind, stats) == "whitened":
            U, V = whitened_svd(weight, stats, plan.spec["rank"])
            return {"u": U, "v": V}
        U, V = truncated_svd(weight, plan.spec["rank"])
        return {"u": U, "v": V}

    def build(self, plan, factors=None, bias=None, device=None, dtype=None):
        if factors is not None:
            return LowRankLinear.from_factors(factors["u"], factors["v"], bias, plan.kind)
        m, n = plan.shape
        has_bias = plan.params_after > plan.spec["rank"] * (m + n)
        return LowRankLinear(n, m, plan.spec["rank"], has_bias, plan.kind, device, dtype)
