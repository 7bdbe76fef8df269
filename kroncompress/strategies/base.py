"""What a decomposition strategy is: a validated config + plan() + decompose() + build().

plan() needs only a shape (so a model on the meta device can be planned); decompose() is pure math on
a weight; build() turns factors (or nothing, when loading a saved model) into a drop-in module.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kroncompress.layers.base import dense_weight_of

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerPlan":
        data = dict(data)
        data["shape"] = tuple(data["shape"])
        return cls(**data)


@dataclass
class StrategyConfig:
    """Base of every strategy's options; subclasses add fields and validate them in __post_init__."""


def config_error(strategy: str, field_name: str, problem: str) -> ValueError:
    return ValueError(f"strategy {strategy!r}, option {field_name!r}: {problem}")


class Strategy:
    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

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
                raise config_error(cls.name, key, f"unknown option; {hint}")
        return cls.Config(**options)

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    # -- the three steps ---------------------------------------------------------------------------
    def plan(self, shape: tuple[int, int], kind: str = "linear", weight: torch.Tensor | None = None, bias: bool = True) -> LayerPlan:
        """Structure and costs for an (out x in) weight, or a (vocab x dim) embedding table."""
        raise NotImplementedError

    def decompose(self, weight: torch.Tensor, plan: LayerPlan) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build(self, plan: LayerPlan, factors: dict[str, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
              device=None, dtype=None) -> nn.Module:
        """The drop-in module; with factors=None an uninitialised one of the right structure (for loading)."""
        raise NotImplementedError

    # -- conveniences ------------------------------------------------------------------------------
    def check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise ValueError(f"strategy {self.name!r} cannot compress a {kind} module; it supports {', '.join(self.kinds)}")

    def compress_module(self, module: nn.Module) -> tuple[nn.Module, LayerPlan, float]:
        """Plan, decompose and build a replacement for an nn.Linear, Conv1D or nn.Embedding.

        Returns (new module, plan, relative Frobenius reconstruction error ||W - W^|| / ||W||).
        """
        if isinstance(module, nn.Embedding):
            weight, kind, bias = module.weight, "embedding", None
        else:
            weight, kind = dense_weight_of(module)
            bias = getattr(module, "bias", None)
        weight = weight.detach()
        plan = self.plan(tuple(weight.shape), kind, weight=weight, bias=bias is not None)
        factors = self.decompose(weight, plan)
        new = self.build(plan, factors, bias.detach() if bias is not None else None)
        if kind == "embedding" and module.padding_idx is not None:
            new.padding_idx = module.padding_idx
        with torch.no_grad():
            approx = new.dense_weight().to(torch.float32)
            error = (approx - weight.to(torch.float32)).norm() / weight.to(torch.float32).norm().clamp_min(1e-30)
        return new, plan, float(error)


def linear_params(shape: tuple[int, int], kind: str, bias: bool) -> int:
    out_features, in_features = shape
    return out_features * in_features + (out_features if bias and kind != "embedding" else 0)


def dense_flops(shape: tuple[int, int], kind: str) -> int:
    """FLOPs per token of the dense module (an embedding lookup reads one row)."""
    return shape[1] if kind == "embedding" else 2 * shape[0] * shape[1]
