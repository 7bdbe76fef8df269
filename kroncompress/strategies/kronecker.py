"""`kronecker`: W ~ sum_{i<r} A_i (x) B_i, initialised by the nearest Kronecker product (KnGPT2), or
data-aware by ALS on the layer's input statistics (`init: als`, see docs/dataaware.md); for an embedding,
ALS on the token-frequency-weighted row error plus, for a tied head, the head's output error."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


import torch

from kroncompress.errors import OptionError
from kroncompress.layers.kronecker import KroneckerEmbedding, KroneckerLinear
from kroncompress.linalg.als import KroneckerProblem, MomentCache, content_key, kronecker_als
from kroncompress.linalg.kronecker import infer_shapes, kron_matmul_flops, nearest_kronecker
from kroncompress.linalg.shapes import divisors, is_degenerate, kronecker_shapes
from kroncompress.linalg.weighted_kronecker import TokenStatistics, weighted_kronecker_als
from kroncompress.strategies.base import (
    check_forward_mode,
    LayerPlan, PlannedFit, Strategy, StrategyConfig, check_ratio_met, dense_flops, is_ratio, linear_params,
)
from kroncompress.strategies.registry import register_strategy


def _check_shape(name: str, value) -> None:
    if value is None:
        return
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(v is None or (isinstance(v, int) and v >= 1) for v in value)
    if not ok:
        raise OptionError("kronecker", name, f"expected [rows, cols] with positive ints or null (inferred), got {value!r}")


INITS = ("auto", "nkp", "als")
DATA_AWARE_INITS = ("auto", "als")  # the inits that use calibration statistics when they are given


@dataclass
class KroneckerConfig(StrategyConfig):
    """a_shape / b_shape: explicit factor shapes (null entries are inferred); or ratio: a target
    compression (m n / params) and the shape search picks the factors. rank: Kronecker terms, or
    "auto" for as many as the budget allows. init: "nkp" (weight-only nearest Kronecker product), "als"
    (output-error ALS from a Kronecker-factored whitening start; needs calibration statistics) or "auto"
    (als when statistics are given, else nkp); for an embedding, als minimises the token-frequency-
    weighted row error (+ the tied head's output error), reported as init "als-freq" ("als-freq+head").
    sweeps: the most ALS sweeps. With statistics and ratio,
    the shape search ranks candidates by output error (whitened NKP proxy, then ALS on `shortlist`)."""

    ratio: float | None = None
    a_shape: list | None = None
    b_shape: list | None = None
    rank: int | str = 1
    allow_degenerate: bool = False
    init: str = "auto"
    sweeps: int = 6
    shortlist: int = 3
    forward_mode: str = "factored"  # or "dense": W built once next to the factors (see FactorizedLinear)

    def __post_init__(self):
        check_forward_mode("kronecker", self.forward_mode)
        if self.init not in INITS:
            raise OptionError("kronecker", "init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in ("sweeps", "shortlist"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "sweeps" else 1):
                raise OptionError("kronecker", name, f"must be an int >= {0 if name == 'sweeps' else 1}, got {value!r}")
        _check_shape("a_shape", self.a_shape)
        _check_shape("b_shape", self.b_shape)
        explicit = self.a_shape is not None or self.b_shape is not None
        if explicit == (self.ratio is not None):
            raise OptionError(
                "kronecker", "ratio",
                "give either ratio (e.g. 2) or a_shape/b_shape (e.g. b_shape: [1, 2]), exactly one of them",
            )
        if self.ratio is not None and not is_ratio(self.ratio):
            raise OptionError("kronecker", "ratio", f"must be a finite number > 1 (2 halves the parameters), got {self.ratio!r}")
        if self.rank != "auto" and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise OptionError("kronecker", "rank", f"must be a positive int or 'auto', got {self.rank!r}")
        if explicit and self.rank == "auto":
            raise OptionError("kronecker", "rank", "'auto' needs ratio; with explicit shapes give an int")


@register_strategy("kronecker")
class KroneckerStrategy(Strategy):
    Config = KroneckerConfig
    kinds = ("linear", "conv1d", "embedding")
    uses_calibration = True
    KEEP_MOMENTS = 2  # MomentCaches of the most recent distinct inputs (q/k/v, gate/up are adjacent)

    def _problem(self, weight, stats) -> KroneckerProblem:
        """The KroneckerProblem of (weight, stats), whose MomentCache (whitenings, C's permuted views) is
        shared with the other weights reading the same input: identified by content, since each call gets a
        new statistics tensor. A memo of what C determines, never a result: the factors themselves travel
        on the plan (LayerPlan.fit)."""
        moments = self.__dict__.setdefault("_moments", OrderedDict())
        key = content_key(stats)
        cache = moments.pop(key, None) or MomentCache(stats.to(device=weight.device))
        moments[key] = cache
        while len(moments) > self.KEEP_MOMENTS:
            moments.popitem(last=False)
        return KroneckerProblem(weight, cache)

    def _fit_key(self, weight, stats, spec) -> tuple:
        """What a planned ALS fit belongs to: the weight and statistics (by content), the shapes, rank, sweeps."""
        return (content_key(weight.to(torch.float32)), content_key(stats), tuple(spec["a_shape"]), tuple(spec["b_shape"]),
                spec["rank"], self.config.sweeps)

    def _choose_shape(self, shape, weight, stats=None):
        """(a_shape, b_shape, rank, how the shape was chosen, the winner's finished PlannedFit or None)."""
        cfg = self.config
        m, n = shape
        if cfg.ratio is None:
            try:
                a_shape, b_shape = infer_shapes(m, n, cfg.a_shape, cfg.b_shape)
            except ValueError as exc:
                field_name = "b_shape" if cfg.b_shape is not None else "a_shape"
                raise OptionError("kronecker", field_name, str(exc).removeprefix("nearest_kronecker: ")) from None
            if is_degenerate(a_shape, b_shape) and not cfg.allow_degenerate:
                raise OptionError(
                    "kronecker", "b_shape",
                    f"A {a_shape} (x) B {b_shape} is an outer product (plain low rank); use strategy 'svd', "
                    "or set allow_degenerate: true",
                )
            max_rank = min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1])
            if cfg.rank > max_rank:
                raise OptionError("kronecker", "rank", f"{cfg.rank} exceeds min(m1*n1, m2*n2) = {max_rank} for A {a_shape} (x) B {b_shape}")
            return a_shape, b_shape, cfg.rank, "explicit", None
        use_stats = weight is not None and stats is not None and cfg.init != "nkp"
        self._check_reachable(m, n)
        problem = self._problem(weight, stats) if use_stats else None
        candidates = kronecker_shapes(
            m, n, ratio=cfg.ratio, rank=cfg.rank, weight=weight, allow_degenerate=cfg.allow_degenerate,
            stats=stats if use_stats else None, shortlist=cfg.shortlist, sweeps=min(cfg.sweeps, 2), problem=problem,
        )
        best, planned = candidates[0], None
        if problem is not None and best.fit is not None:
            # Finish the winner's ALS now, while V = W C and C's views are at hand: decompose resumes nothing
            # and recomputes nothing (the same sweeps as a fresh run of `sweeps` sweeps, so the same factors).
            fit = kronecker_als(weight, stats, best.a_shape, best.b_shape, best.rank, start=best.fit,
                                max_sweeps=cfg.sweeps, problem=problem)
            fit.a, fit.b = fit.a.to(weight.dtype), fit.b.to(weight.dtype)
            spec = {"a_shape": best.a_shape, "b_shape": best.b_shape, "rank": best.rank}
            planned = PlannedFit(self._fit_key(weight, stats, spec), {"a": fit.a, "b": fit.b})
        if best.score is None:
            how = "parameter budget (no weights)"
        elif use_stats:
            how = f"output error {max(1 - best.score, 0) ** 0.5:.4f}"
        else:
            how = f"energy kept {best.score:.4f}"
        return best.a_shape, best.b_shape, best.rank, how, planned

    def _check_reachable(self, m: int, n: int) -> None:
        """Refuse a ratio the Kronecker shapes of an m x n weight cannot meet (with this rank), saying what
        they reach, instead of silently compressing more: one term holds at most about half a matrix."""
        cfg = self.config
        try:
            closest = kronecker_shapes(m, n, ratio=cfg.ratio, rank=cfg.rank, weight=None,
                                       allow_degenerate=cfg.allow_degenerate)[0]
        except ValueError as exc:
            if "ALS sweep" in str(exc):  # shapes exist, but rank auto gives them too many terms to fit
                raise OptionError("kronecker", "rank", str(exc).removeprefix("kronecker_shapes: ")) from None
            closest = None
        if closest is None:
            smallest = min((m1 * n1 + (m // m1) * (n // n1), m1, n1) for m1 in divisors(m) for n1 in divisors(n)
                           if cfg.allow_degenerate or not is_degenerate((m1, n1), (m // m1, n // n1)))
            raise OptionError("kronecker", "ratio", f"{cfg.ratio:g} is too high for a {m} x {n} weight: the smallest "
                              f"Kronecker factors need {smallest[0]:,} parameters (ratio {m * n / smallest[0]:.4g}); "
                              "lower the ratio")
        if cfg.rank == "auto":
            reach = "no Kronecker shape comes closer; pick a ratio they reach, or use strategy svd"
        else:
            reach = (f"with rank {cfg.rank} no shape comes closer (one Kronecker term holds at most about half a "
                     "matrix); set rank: auto for as many terms as the ratio allows")
        check_ratio_met("kronecker", cfg.ratio, (m, n), closest.params, reach)

    def plan(self, shape, kind="linear", weight=None, bias=True, stats=None):
        """As Strategy.plan; `stats` (the input second moment) makes a ratio search rank by output error."""
        self.check_kind(kind)
        usable = weight if weight is not None and weight.device.type != "meta" else None
        a_shape, b_shape, rank, how, fit = self._choose_shape(tuple(shape), usable, stats if kind != "embedding" else None)
        factor_params = rank * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])
        bias_params = shape[0] if bias and kind != "embedding" else 0
        flops = 2 * rank * shape[1] if kind == "embedding" else kron_matmul_flops(a_shape, b_shape, rank)
        return LayerPlan(
            strategy=self.name, kind=kind, shape=tuple(shape),
            spec={"a_shape": list(a_shape), "b_shape": list(b_shape), "rank": rank},
            params_before=linear_params(shape, kind, bias), params_after=factor_params + bias_params,
            flops_before=dense_flops(shape, kind), flops_after=flops, note=f"shape chosen by {how}", fit=fit,
        )

    def wants_statistics(self, kind: str) -> bool:
        """init als or auto (an embedding's statistics are its token counts)."""
        return self.config.init in DATA_AWARE_INITS and kind in ("linear", "conv1d", "embedding")

    def init_for(self, kind: str, stats) -> str:
        """The init that runs: "als" when asked (or auto) and statistics exist ("als-freq" or
        "als-freq+head" for an embedding, with a tied head's term), else "nkp"."""
        if not (self.wants_statistics(kind) and stats is not None):
            return "nkp"
        if kind == "embedding":  # only token statistics describe an embedding's input
            if not isinstance(stats, TokenStatistics):
                return "nkp"
            return "als-freq+head" if stats.head is not None else "als-freq"
        return "als"

    def decompose(self, weight, plan, stats=None):
        """Factors {"a": (r, m1, n1), "b": (r, m2, n2)}; with `stats` (the damped n x n input second
        moment, or an embedding's TokenStatistics) and init als/auto, minimise the output error by ALS
        instead of the weight error. An ALS fit that plan() finished for this weight and these statistics
        (`plan.fit`) is taken as it is, the same factors a fresh run gives, and cleared from the plan."""
        spec = plan.spec
        if self.init_for(plan.kind, stats).startswith("als-freq"):
            result = weighted_kronecker_als(weight, stats, spec["a_shape"], spec["b_shape"], spec["rank"],
                                            max_sweeps=self.config.sweeps)
            return {"a": result.a, "b": result.b}
        if self.init_for(plan.kind, stats) == "als":
            planned = plan.fit
            if planned is not None and planned.key == self._fit_key(weight, stats, spec):
                plan.fit = None  # taken: the plan holds no factors once they are built
                return {name: factor.to(weight.dtype) for name, factor in planned.factors.items()}
            result = kronecker_als(weight, stats, spec["a_shape"], spec["b_shape"], spec["rank"],
                                   max_sweeps=self.config.sweeps, problem=self._problem(weight, stats))
            return {"a": result.a.to(weight.dtype), "b": result.b.to(weight.dtype)}
        A, B = nearest_kronecker(weight, spec["a_shape"], spec["b_shape"], rank=spec["rank"])
        if spec["rank"] == 1:
            A, B = A.unsqueeze(0), B.unsqueeze(0)
        return {"a": A, "b": B}

    def build(self, plan, factors=None, bias=None, device=None, dtype=None):
        spec = plan.spec
        if plan.kind == "embedding":
            if factors is not None:
                return KroneckerEmbedding.from_factors(factors["a"], factors["b"])
            return KroneckerEmbedding(spec["a_shape"], spec["b_shape"], spec["rank"], device=device, dtype=dtype)
        if factors is not None:
            return KroneckerLinear.from_factors(factors["a"], factors["b"], bias, plan.kind)
        (m1, n1), (m2, n2) = spec["a_shape"], spec["b_shape"]
        has_bias = plan.params_after > spec["rank"] * (m1 * n1 + m2 * n2)
        return KroneckerLinear(spec["a_shape"], spec["b_shape"], spec["rank"], has_bias, plan.kind, device, dtype)
