"""`layerdrop`: keep some transformer blocks and drop the rest (DistilGPT2-style), a structural strategy.

It targets the ModuleList of blocks (`transformer.h`, `model.layers`, `role:layers`) rather than a weight
matrix: there is nothing to decompose. It is a `StructuralStrategy`: the surgery calls `plan_layers` and
`apply`; the result is the same architecture with fewer layers (config layer count and per-layer indices updated), so it saves with plain
`save_pretrained` and reloads with `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from kroncompress.errors import CheckpointError, OptionError, RecipeError
from kroncompress.strategies.base import LayerPlan, StrategyConfig, StructuralStrategy, is_int
from kroncompress.strategies.registry import register_strategy

# Config attributes that hold the number of blocks (GPT-2 maps num_hidden_layers to n_layer itself).
LAYER_COUNT_ATTRIBUTES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Attributes of modules inside a block that store the block's own index (KV caches, layer scaling).
LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id")


@dataclass
class LayerDropConfig(StrategyConfig):
    """keep: the block indices to keep, in increasing order (e.g. [0, 2, 4, 7, 9, 11]); or every: keep
    blocks 0, k, 2k, ... Exactly one of them."""

    keep: list | None = None
    every: int | None = None

    def __post_init__(self):
        if (self.keep is None) == (self.every is None):
            raise OptionError("layerdrop", "keep", "give either keep (e.g. [0, 2, 4, 7, 9, 11]) or every (e.g. 2), exactly one of them")
        if self.every is not None and (not is_int(self.every) or self.every < 1):
            raise OptionError("layerdrop", "every", f"must be a positive int (2 keeps blocks 0, 2, 4, ...), got {self.every!r}")
        if self.keep is not None:
            ok = isinstance(self.keep, (list, tuple)) and len(self.keep) > 0 and all(is_int(i) and i >= 0 for i in self.keep)
            if not ok:
                raise OptionError("layerdrop", "keep", f"must be a non-empty list of block indices >= 0, got {self.keep!r}")
            if list(self.keep) != sorted(set(self.keep)):
                raise OptionError("layerdrop", "keep", f"indices must be strictly increasing (blocks keep their order), got {list(self.keep)}")
            self.keep = list(self.keep)


@register_strategy("layerdrop")
class LayerDropStrategy(StructuralStrategy):
    """Structural: keeps the chosen blocks of a ModuleList (a sibling of the factorising strategies)."""

    Config = LayerDropConfig

    def kept_indices(self, num_layers: int) -> list[int]:
        """The indices kept out of `num_layers` blocks (validated against the count)."""
        if self.config.every is not None:
            return list(range(0, num_layers, self.config.every))
        too_big = [i for i in self.config.keep if i >= num_layers]
        if too_big:
            raise OptionError("layerdrop", "keep", f"indices {too_big} do not exist: the model has {num_layers} blocks (0..{num_layers - 1})")
        return list(self.config.keep)

    def plan_layers(self, layer_params: list[int]) -> LayerPlan:
        """Plan for a ModuleList whose blocks hold `layer_params[i]` parameters each."""
        keep = self.kept_indices(len(layer_params))
        return LayerPlan(
            strategy=self.name, kind="layers", shape=(len(layer_params), len(keep)),
            spec={"keep": keep, "num_layers": len(layer_params)},
            params_before=sum(layer_params), params_after=sum(layer_params[i] for i in keep),
            note=f"keeps {len(keep)} of {len(layer_params)} blocks",
        )

    def apply(self, model: nn.Module, layers_name: str, plan: LayerPlan) -> None:
        """Drop the blocks of `model.<layers_name>` not in `plan.spec["keep"]`, in place, and update the config."""
        drop_layers(model, layers_name, plan.spec["keep"])


def drop_layers(model: nn.Module, layers_name: str, keep: list[int]) -> None:
    """Keep only blocks `keep` (in order) of the ModuleList `layers_name`; renumber them; fix the config."""
    layers = model.get_submodule(layers_name)
    if not isinstance(layers, nn.ModuleList):
        raise RecipeError(f"{layers_name} is a {type(layers).__name__}, not the nn.ModuleList of blocks", where="layerdrop",
                          fix="target e.g. role:layers")
    before = len(layers)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "per_layer_attributes", None):
        raise CheckpointError(f"{type(config).__name__} has per-layer overrides (per_layer_config); dropping blocks "
                              "from a heterogeneous config is not supported", where="layerdrop")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, block in enumerate(kept):
        for module in block.modules():
            for attribute in LAYER_INDEX_ATTRIBUTES:
                if is_int(getattr(module, attribute, None)):
                    setattr(module, attribute, new_index)
    parent_name, _, child = layers_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, kept)
    if config is not None:
        _update_config(config, before, keep)


def _update_config(config: Any, before: int, keep: list[int]) -> None:
    updated = False
    for attribute in LAYER_COUNT_ATTRIBUTES:
        if getattr(config, attribute, None) == before:
            setattr(config, attribute, len(keep))
            updated = True
    if not updated:
        raise CheckpointError(f"found no layer count equal to {before} in {type(config).__name__} (looked at "
                              f"{', '.join(LAYER_COUNT_ATTRIBUTES)}); the saved config would not match the model",
                              where="layerdrop")
    # Per-layer lists (e.g. layer_types for sliding-window attention) follow the kept blocks.
    for key, value in config.to_dict().items():
        if "layer" in key and isinstance(value, list) and len(value) == before and before > 1:
            setattr(config, key, [value[i] for i in keep])
