"""LoRA adapters (Hugging Face PEFT) on top of a compressed model.

PEFT only knows nn.Linear, Conv1D and friends; its LoRA config takes a mapping from other layer types to
LoRA layers written for them (`LoraConfig._register_custom_module`, PEFT's documented "custom models"
extension point). `lora_config` builds a LoraConfig with our factorised layers registered:

    import kroncompress as kc
    from peft import get_peft_model
    model = get_peft_model(compressed, kc.lora.lora_config(r=8, target_modules=kc.lora.lora_targets(compressed)))
    ...train...
    model.save_pretrained("adapter")                      # the adapter only
    again = kc.lora.load_adapter(base, "adapter")         # base: the compressed model, e.g. from_pretrained
    again = PeftModel.from_pretrained(base, "adapter")    # the same: import kroncompress taught PEFT our layers
    merged = kc.lora.merge(model)                         # low-rank layers absorb the adapter exactly

The adapter computes y = base(x) + scale * B A x next to the factorised layer, which is never densified.
Merging is exact for LowRankLinear (its rank grows by r: U' = [U, scale B], V' = [V; A]); a LoRA update is
not a Kronecker product (nor a Tucker / CP / TT one), so those layers refuse to merge and keep the adapter.
`peft` is an optional dependency: `pip install kroncompress[peft]`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

try:
    from peft import LoraConfig, PeftConfig, PeftModel
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as exc:  # pragma: no cover - exercised only without peft
    raise ImportError("kroncompress.lora needs PEFT: pip install 'kroncompress[peft]' (or pip install peft)") from exc

from kroncompress.layers.base import FactorizedLinear
from kroncompress.layers.lowrank import LowRankLinear


class FactorizedLoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer around one of our FactorizedLinear layers (any strategy)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any):
        super().__init__()
        with warnings.catch_warnings():  # PEFT warns for every layer type it does not know; this one is handled
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer)
        for option in ("use_dora", "velora_config"):
            if getattr(config, option, None):
                raise ValueError(f"LoraConfig.{option}: not supported on kroncompress factorised layers; "
                                 f"use plain LoRA")
        self._active_adapter = adapter_name
        self._merged_ranks: list[tuple[str, int]] = []  # (adapter, rank added to a LowRankLinear), for unmerge
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        result = self.base_layer(x)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype))
            result = result + (lora_B(lora_A(h)) * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if not isinstance(base, LowRankLinear):
            raise ValueError(
                f"cannot merge a LoRA adapter into a {type(base).__name__}: B A is not of its form, so the merged "
                f"layer would lose its compression; keep the adapter (save_pretrained / kc.lora.load_adapter), or "
                f"export the model dense (kc.to_dense) and merge there")
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            a = self.lora_A[name].weight.to(base.v.dtype)
            b = (self.lora_B[name].weight * self.scaling[name]).to(base.u.dtype)
            u, v = torch.cat([base.u.data, b], 1), torch.cat([base.v.data, a], 0)
            if safe_merge and not (torch.isfinite(u).all() and torch.isfinite(v).all()):
                raise ValueError(f"adapter {name!r} holds NaN or inf values; not merged")
            _set_low_rank(base, u, v)
            self._merged_ranks.append((name, a.shape[0]))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self._merged_ranks:
            name, rank = self._merged_ranks.pop()
            _set_low_rank(base, base.u.data[:, :-rank], base.v.data[:-rank])
            self.merged_adapters.remove(name)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _set_low_rank(layer: LowRankLinear, u: torch.Tensor, v: torch.Tensor) -> None:
    layer.u = nn.Parameter(u.contiguous(), requires_grad=layer.u.requires_grad)
    layer.v = nn.Parameter(v.contiguous(), requires_grad=layer.v.requires_grad)
    layer.rank = u.shape[1]


def register(config: LoraConfig) -> LoraConfig:
    """`config` with our factorised layers registered as LoRA targets (returned for chaining)."""
    config._register_custom_module({FactorizedLinear: FactorizedLoraLinear})
    return config


def lora_config(**kwargs: Any) -> LoraConfig:
    """`peft.LoraConfig(**kwargs)` that can target kroncompress's factorised layers."""
    return register(LoraConfig(**kwargs))


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the model's factorised linear layers (what `target_modules=` should list to adapt them)."""
    names = [name for name, module in model.named_modules() if isinstance(module, FactorizedLinear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no factorised layer; compress it first (kc.compress), or "
                         f"target its plain nn.Linear modules with a plain LoraConfig")
    return names


def load_adapter(model: nn.Module, folder: str, **kwargs: Any) -> PeftModel:
    """`PeftModel.from_pretrained(model, folder)` for an adapter saved on a compressed model (the saved
    adapter_config.json cannot carry the custom-layer mapping, so it is registered again here). An adapter
    holding NaN or inf values is refused (a diverged or damaged adapter would make every output NaN)."""
    config = register(PeftConfig.from_pretrained(folder))
    peft_model = PeftModel.from_pretrained(model, folder, config=config, **kwargs)
    bad = _nonfinite_adapter(peft_model)
    if bad is not None:
        raise ValueError(f"{folder}: adapter tensor {bad!r} holds NaN or inf values; the adapter is damaged or its "
                         "training diverged: train it again (or load an earlier checkpoint)")
    return peft_model


def _nonfinite_adapter(model: nn.Module) -> str | None:
    """The name of the first LoRA tensor holding NaN or inf, or None."""
    for name, param in model.named_parameters():
        if "lora_" in name and param.is_floating_point() and not bool(torch.isfinite(param).all()):
            return name
    return None


def check_mergeable(peft_model: PeftModel) -> None:
    """Raise ValueError, before anything is changed, unless every adapted layer can absorb its adapter:
    only low-rank (svd) layers can (a LoRA update is not a Kronecker, Tucker, CP or TT term), and only
    finite adapters are merged."""
    refused = [name for name, module in peft_model.named_modules()
               if isinstance(module, FactorizedLoraLinear) and module.lora_A
               and not isinstance(module.get_base_layer(), LowRankLinear)]
    if refused:
        kind = type(peft_model.get_submodule(refused[0]).get_base_layer()).__name__
        raise ValueError(
            f"cannot merge: {refused[0]}" + (f" and {len(refused) - 1} more layers" if len(refused) > 1 else "")
            + f" are {kind} layers, and B A is not of their form (the merged layer would lose its compression); "
            "nothing was merged. Keep the adapter (save_pretrained / kc.lora.load_adapter), adapt only the low-rank "
            "layers, or export the model dense (kc.to_dense) and merge there")
    bad = _nonfinite_adapter(peft_model)
    if bad is not None:
        raise ValueError(f"cannot merge: adapter tensor {bad!r} holds NaN or inf values; nothing was merged")


def merge(peft_model: PeftModel) -> nn.Module:
    """The base model with every adapter merged in (`merge_and_unload`), and its saved plan brought up to
    date, so save_compressed / save_pretrained / from_pretrained see the grown ranks. All or nothing:
    every layer is checked first (`check_mergeable`), so a model that cannot be merged is left as it was."""
    from kroncompress.plans import CONFIG_KEY

    check_mergeable(peft_model)
    model = peft_model.merge_and_unload(safe_merge=True)
    modules = (getattr(model.config, CONFIG_KEY, None) or {}).get("modules", {})
    for name, entry in modules.items():
        layer = model.get_submodule(name)
        if isinstance(layer, LowRankLinear) and entry["plan"]["spec"].get("rank") != layer.rank:
            entry["plan"]["spec"]["rank"] = layer.rank
            entry["plan"]["params_after"] = layer.num_params
            entry["plan"]["flops_after"] = layer.flops_per_token()
    return model
