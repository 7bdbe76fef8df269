"""What a strategy is: a validated config (`BaseStrategy`), then one of two siblings.

A factorising `Strategy` (kronecker, svd, tucker, cp, tt) replaces a weight matrix: plan() needs only a
shape (so a model on the meta device can be planned); decompose() is pure math on a weight; build() turns
factors (or nothing, when loading a saved model) into a drop-in module. A `StructuralStrategy`
(layerdrop) changes the model's structure instead: plan_layers() and apply(). Neither pretends to be the
other: a structural strategy has no decompose or build to refuse.

The contract, all of it declared here (the surgery inspects nothing else):

- `name`, `Config` (a StrategyConfig dataclass), `kinds` (module kinds it compresses);
- `plan(shape, kind, weight=None, bias=True, stats=None)` and `decompose(weight, plan, stats=None)`:
  `stats` is always passed, as the keyword `stats=`: the layer's damped input second moment (for an
  embedding: a `TokenStatistics` from linalg.weighted_kronecker, token counts and the tied head's second
  moment), or None when there are none or the strategy does not want them (`wants_statistics`).
  `register_strategy` refuses a class whose plan or decompose has no `stats` parameter;
- what plan() computed that decompose() can reuse travels on the plan (`LayerPlan.fit`, a `PlannedFit`
  naming the weight and statistics it belongs to), never in a cache on the strategy instance;
- `uses_calibration` / `wants_statistics(kind)`: whether the configured init would use statistics for a
  module of that kind (which modules the calibration pass hooks); `init_for(kind, stats)`: the name of
  the init that runs;
- `build(plan, factors=None, bias=None, device=None, dtype=None)`;
- bad options raise `OptionError(strategy, field, problem)` (kroncompress.errors), other bad input a
  `KroncompressError` subclass.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kroncompress.errors import OptionError
from kroncompress.layers.base import FORWARD_MODES, FactorizedLinear, dense_weight_of

KINDS = ("linear", "conv1d", "embedding")


@dataclass
class LayerPlan:
    """How one module is compressed: its structure (`spec`, JSON-serialisable) and its costs."""

    strategy: str
    kind: str
    shape: tuple[int, int]  # (out, in) for linear/conv1d, (vocab, dim) for embedding
    spec: dict[str, Any]
    params_before: int
    params_after: int
    flops_before: int = 0
    flops_after: int = 0
    note: str = ""
    # What plan() computed that decompose() can take instead of computing it again (a PlannedFit), or
    # None. Held in memory only: never saved, compared or shown.
    fit: "PlannedFit | None" = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "fit"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerPlan":
        data = dict(data)
        data["shape"] = tuple(data["shape"])
        return cls(**data)


@dataclass(frozen=True)
class PlannedFit:
    """Factors plan() already computed for one (weight, statistics) pair, which decompose() takes when it
    is given the same pair (`key`, by content: linalg.als.content_key) instead of computing them again."""

    key: tuple
    factors: dict[str, torch.Tensor]


@dataclass
class StrategyConfig:
    """Base of every strategy's options; subclasses add fields and validate them in __post_init__."""


config_error = OptionError  # the name plugins written before kroncompress.errors used: the same class


def check_forward_mode(strategy: str, value) -> None:
    """The `forward_mode` option of a factorising strategy (see FactorizedLinear)."""
    if value not in FORWARD_MODES:
        raise OptionError(strategy, "forward_mode", f"must be one of {', '.join(FORWARD_MODES)} (\"dense\" builds W once "
                          f"next to the factors: memory for speed), got {value!r}")


def with_forward_mode(strategy: "Strategy", module: nn.Module) -> nn.Module:
    """`module` with its forward_mode set from the strategy's option (factorised linear layers only: an
    embedding's lookups never build the table)."""
    mode = getattr(strategy.config, "forward_mode", None)
    if mode is not None and isinstance(module, FactorizedLinear):
        module.forward_mode = mode
    return module


# The relative shortfall below a ratio's parameter budget that still counts as meeting it: the Kronecker
# shape search keeps candidates within this band of the best one (linalg.shapes.kronecker_shapes).
RATIO_BAND = 0.05


class BaseStrategy:
    """What every strategy has: a registered `name`, a validated `Config`, the module `kinds` it targets."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: StrategyConfig | None = None, **options: Any):
        if config is not None and options:
            raise TypeError("give a config or keyword options, not both")
        self.config = config if config is not None else self.parse_options(options)

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> StrategyConfig:
        known = [f.name for f in dataclasses.fields(cls.Config)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(known)}"
                raise OptionError(cls.name, key, f"unknown option; {hint}")
        try:
            return cls.Config(**options)
        except OptionError:
            raise
        except (TypeError, ValueError) as exc:  # a Config that raises plain errors: no field to point at
            raise OptionError(cls.name, None, str(exc)) from None

    @classmethod
    def options_of(cls, config: StrategyConfig) -> dict[str, Any]:
        """The options that differ from the Config's defaults (what a recipe would write)."""
        out = {}
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if value != default:
                out[f.name] = value
        return out

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise OptionError(self.name, None, f"cannot compress a {kind} module; it supports {', '.join(self.kinds)}")


class Strategy(BaseStrategy):
    """A factorising strategy: plan() a module, decompose() its weight, build() the drop-in module."""

    kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")
    # True when plan()/decompose() can use calibration statistics (`stats`); see wants_statistics().
    uses_calibration: ClassVar[bool] = False

    # -- calibration -------------------------------------------------------------------------------
    def wants_statistics(self, kind: str) -> bool:
        """Whether decompose (and plan) would use input statistics for a module of `kind` with this config;
        the calibration pass collects them for exactly these modules. Default: `uses_calibration`, for
        linear and conv1d modules (an embedding's input is a token id)."""
        return self.uses_calibration and kind in ("linear", "conv1d")

    def init_for(self, kind: str, stats: torch.Tensor | None) -> str:
        """The name of the initialisation that runs for a module of `kind` given `stats` ("" when the
        strategy has a single one); reported per module."""
        return ""

    # -- the three steps ---------------------------------------------------------------------------
    def plan(self, shape: tuple[int, int], kind: str = "linear", weight: torch.Tensor | None = None, bias: bool = True,
             stats: torch.Tensor | None = None) -> LayerPlan:
        """Structure and costs for an (out x in) weight, or a (vocab x dim) embedding table."""
        raise NotImplementedError

    def decompose(self, weight: torch.Tensor, plan: LayerPlan, stats: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Factors for `weight` following `plan`; `stats` as for plan (None: weight-only)."""
        raise NotImplementedError

    def build(self, plan: LayerPlan, factors: dict[str, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
              device=None, dtype=None) -> nn.Module:
        """The drop-in module; with factors=None an uninitialised one of the right structure (for loading)."""
        raise NotImplementedError

    # -- conveniences ------------------------------------------------------------------------------
    def statistics_for(self, kind: str, stats: Any) -> Any:
        """`stats` when this strategy would use them for a module of `kind`, else None (what plan and
        decompose are passed)."""
        return stats if stats is not None and self.uses_calibration and self.wants_statistics(kind) else None

    def compress_module(self, module: nn.Module, stats: torch.Tensor | None = None) -> tuple[nn.Module, LayerPlan, float]:
        """Plan, decompose and build a replacement for an nn.Linear, Conv1D or nn.Embedding.

        Returns (new module, plan, relative Frobenius reconstruction error ||W - W^|| / ||W||).
        """
        kind = "embedding" if isinstance(module, nn.Embedding) else dense_weight_of(module)[1]
        weight, bias = weight_and_bias(module, kind)
        stats = self.statistics_for(kind, stats)
        plan = self.plan(tuple(weight.shape), kind, weight=weight.detach(), bias=bias is not None, stats=stats)
        replaced = replacement(self, module, plan, stats)
        return replaced.module, plan, replaced.error


class StructuralStrategy(BaseStrategy):
    """A strategy that changes the model's structure (e.g. drops whole blocks) instead of factorising a
    weight, the sibling of `Strategy`. It targets an nn.ModuleList of blocks; the surgery calls
    `plan_layers` then `apply`, and a saved model reloads with plain `from_pretrained`."""

    kinds: ClassVar[tuple[str, ...]] = ("layers",)

    def plan_layers(self, layer_params: list[int]) -> LayerPlan:
        """Plan for a ModuleList whose blocks hold `layer_params[i]` parameters each."""
        raise NotImplementedError

    def apply(self, model: nn.Module, layers_name: str, plan: LayerPlan) -> None:
        """Change `model.<layers_name>` in place following `plan` (and update the model's config)."""
        raise NotImplementedError


def weight_and_bias(module: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight in out x in orientation, or vocab x dim for an embedding; bias or None)."""
    if kind == "embedding":
        return module.weight, None
    weight, _ = dense_weight_of(module)
    return weight, getattr(module, "bias", None)


@dataclass
class Replacement:
    """A built drop-in module and how well it reproduces the original."""

    module: nn.Module
    error: float  # ||W - W^||_F / ||W||_F
    output_error: float | None  # sqrt(tr(D C D^T) / tr(W C W^T)) with the statistics, when given (for an
    # embedding: the token-frequency-weighted relative row error)
    init: str  # the init that ran ("" for single-init strategies)


def replacement(strategy: Strategy, module: nn.Module, plan: LayerPlan, stats: torch.Tensor | None = None) -> Replacement:
    """Decompose `module`'s weight following `plan` and build the drop-in module (the one routine used by
    compress_module and kc.compress). Half-precision weights are decomposed in float32; the result has
    the original's device, dtype, padding_idx and train/eval mode."""
    kind = plan.kind
    weight, bias = weight_and_bias(module, kind)
    weight = weight.detach()
    work = weight if weight.dtype in (torch.float32, torch.float64) else weight.to(torch.float32)
    work_bias = None if bias is None else bias.detach().to(work.dtype)
    with torch.no_grad():
        new = with_forward_mode(strategy, strategy.build(plan, strategy.decompose(work, plan, stats=stats), work_bias))
        if kind == "embedding" and module.padding_idx is not None:
            new.padding_idx = module.padding_idx
        new.to(device=weight.device, dtype=weight.dtype)
        approx = new.dense_weight().to(torch.float32)
        reference = weight.to(torch.float32)
        error = float((approx - reference).norm() / reference.norm().clamp_min(1e-30))
        output_error = None
        if stats is not None:
            from kroncompress.linalg.weighted_kronecker import TokenStatistics, weighted_row_error
            from kroncompress.linalg.whitening import output_error as relative_output_error

            if isinstance(stats, TokenStatistics):  # an embedding: the frequency-weighted row error
                output_error = weighted_row_error(reference, approx, stats.counts)
            else:
                output_error = relative_output_error(reference, approx, stats)
    new.train(module.training)
    return Replacement(new, error, output_error, strategy.init_for(kind, stats))


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's `true` is not a rank)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_ratio(value: Any) -> bool:
    """A compression ratio: a finite number > 1 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 1


def check_ratio_met(strategy: str, ratio: float, shape: tuple[int, int], factor_params: int, reach: str) -> None:
    """Refuse a plan whose factors fall more than RATIO_BAND below the budget m n / ratio: the ratio would
    be silently exceeded. `reach` tells what the strategy can reach instead (ends the message)."""
    budget = shape[0] * shape[1] / ratio
    if factor_params < budget * (1 - RATIO_BAND):
        achieved = shape[0] * shape[1] / max(factor_params, 1)
        raise OptionError(strategy, "ratio", f"{ratio:g} cannot be met for a {shape[0]} x {shape[1]} weight: the "
                          f"closest plan keeps {factor_params:,} of the {budget:,.0f} parameters the ratio allows "
                          f"(ratio {achieved:.3g}); {reach}")


def linear_params(shape: tuple[int, int], kind: str, bias: bool) -> int:
    out_features, in_features = shape
    return out_features * in_features + (out_features if bias and kind != "embedding" else 0)


def dense_flops(shape: tuple[int, int], kind: str) -> int:
    """FLOPs per token of the dense module (an embedding lookup reads one row)."""
    return shape[1] if kind == "embedding" else 2 * shape[0] * shape[1]
