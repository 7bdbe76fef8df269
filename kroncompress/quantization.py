"""`kc.quantize`: weight-only int8 / int4 storage of the factor matrices, stacked on the decomposition.

    model = kc.load_compressed("runs/kn-gpt2")
    summary = kc.quantize(model, bits=8)              # every factor of every factorized layer, in place
    print(summary.bytes_before, summary.bytes_after)
    kc.save_compressed(model, "runs/kn-gpt2-int8")    # int8 tensors + scales in model.safetensors
    AutoModelForCausalLM.from_pretrained("runs/kn-gpt2-int8")   # after `import kroncompress`: the same model

Symmetric quantization, one scale per output channel (or per `group_size` entries along the input side);
see kroncompress.linalg.quantize for the math and kroncompress.layers.quantized for the storage. Forward
dequantizes each factor when it reads it, so the saving is on disk and in memory, not in FLOPs.

What is quantized: the factor tensors of every factorized layer (and, with `dense=True`, the weight of every
remaining nn.Linear / GPT-2 Conv1D, e.g. an uncompressed attention, or an original model as a baseline).
Never: biases, norms, dense embeddings, and tensors shared by several modules (a tied head). A tensor whose
integers and scales would take more than half its float bytes (e.g. a 1 x 2 Kronecker factor, whose rows
are 2 entries long) is left as it is and listed in `summary.kept`.

The quantized structure is recorded in `model.config.kroncompress["quantization"]`, saved in config.json,
and rebuilt by `kc.load_compressed` and `from_pretrained` before the weights are read.

Post-hoc quantizers do not see factor layers: `torch.ao.quantization.quantize_dynamic` only swaps nn.Linear
(and GPT-2 uses Conv1D), torchao's `quantize_` only handles modules with a `.weight` Parameter, so both
leave every factor in float without a word (torchao's `filter_fn` on a KroneckerLinear fails its own
assertion). `check_foreign_quantization` finds models treated that way; `save_compressed` calls it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kroncompress.layers.quantized import (
    QuantizedTensor, factor_axes, is_quantized, num_stored, planned_bytes, quantize_tensors,
)
from kroncompress.linalg.quantize import check_quant_args
from kroncompress.plans import CONFIG_KEY

SECTION = "quantization"  # the key of the kroncompress config section recording what was quantized
MIN_SAVING = 2.0  # a tensor is quantized only when this shrinks its bytes at least this many times


class QuantizationError(ValueError):
    """kc.quantize cannot apply the request (bad bits or group_size, a group_size that does not fit a factor)."""


@dataclass
class QuantizedRow:
    module: str
    tensor: str
    shape: list[int]
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizationSummary:
    """What kc.quantize did: one row per quantized tensor, the tensors kept in float (with why) and the
    weight bytes of the whole model before and after (see `weight_bytes`)."""

    bits: int
    group_size: int | None
    rows: list[QuantizedRow] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "tensors": len(self.rows), "kept": list(self.kept)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: every parameter once (tied ones once) plus the integers and
    scales of its quantized tensors. Non-persistent buffers (rotary tables, masks) are not counted."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        m.nbytes for m in model.modules() if isinstance(m, QuantizedTensor))


def _shared_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _targets(model: nn.Module, dense: bool) -> list[tuple[str, nn.Module, dict[str, int]]]:
    out = []
    for name, module in model.named_modules():
        if is_quantized(module):
            continue
        factored = getattr(type(module), "FACTOR_AXES", None) is not None
        if factored or (dense and factor_axes(module)):
            out.append((name, module, factor_axes(module)))
    return out


def quantize(model: nn.Module, bits: int = 8, group_size: int | None = None, *, dense: bool = False) -> QuantizationSummary:
    """Store the factors of every factorized layer of `model` as `bits`-bit integers with per-channel
    (group_size None) or per-group scales; in place. `dense=True` also quantizes the remaining nn.Linear /
    Conv1D weights. Everything is checked before anything changes: bits must be 4 or 8, group_size must
    divide the quantized axis of every factor longer than it (the error names the module and tensor).
    Modules already quantized are left as they are. Returns a QuantizationSummary."""
    try:
        check_quant_args(bits, group_size)
    except ValueError as exc:
        raise QuantizationError(str(exc)) from None
    shared = _shared_ids(model)
    summary = QuantizationSummary(bits, group_size, bytes_before=weight_bytes(model))
    work = []
    for name, module, axes in _targets(model, dense):
        chosen = choose_tensors(name, module, axes, bits, group_size, shared, summary)
        if chosen:
            work.append((name, module, chosen))
    with torch.no_grad():
        for name, module, chosen in work:
            quantize_tensors(module, chosen, bits, group_size)
    _record(model, {name: {"bits": bits, "group_size": group_size, "tensors": chosen} for name, _, chosen in work})
    summary.bytes_after = weight_bytes(model)
    return summary


def choose_tensors(name: str, module: nn.Module, axes: dict[str, int], bits: int, group_size: int | None,
                   shared: set[int], summary: QuantizationSummary) -> dict[str, int]:
    """The tensors of `module` worth quantizing ({name: axis}), their rows and the kept ones added to
    `summary`; works on a module on the meta device too (kc.plan counts bytes with it)."""
    chosen = {}
    for tensor, axis in axes.items():
        where = f"{name}.{tensor}" if name else tensor
        params = [p for p in (module._parameters.get(tensor),) if p is not None] or list(
            getattr(module._modules.get(tensor), "parameters", lambda: [])())
        if any(id(p) in shared for p in params):
            summary.kept.append(f"{where} (shared with another module)")
            continue
        if not params or not all(p.is_floating_point() for p in params):
            summary.kept.append(f"{where} (not a float tensor)")
            continue
        before, after = planned_bytes(module, tensor, bits, group_size, axis)
        if after * MIN_SAVING > before:
            summary.kept.append(f"{where} (int{bits} and its scales would take {after:,} of {before:,} bytes)")
            continue
        chosen[tensor] = axis
        summary.rows.append(QuantizedRow(name, tensor, list(params[0].shape), before, after))
    return chosen


def _record(model: nn.Module, entries: dict[str, dict[str, Any]]) -> None:
    config = getattr(model, "config", None)
    if config is None or not entries:
        return
    section = dict(getattr(config, CONFIG_KEY, None) or {})
    quant = dict(section.get(SECTION) or {})
    quant["modules"] = {**(quant.get("modules") or {}), **entries}
    section[SECTION] = quant
    section["params_after"] = num_stored(model)
    setattr(config, CONFIG_KEY, section)


def apply_saved_quantization(model: nn.Module, section: dict[str, Any], error) -> None:
    """Rebuild (empty) the quantized tensors recorded in a saved `kroncompress` section, before the weights
    are loaded. `error(field, problem)` makes the exception naming the config field."""
    quant = section.get(SECTION) or {}
    if not isinstance(quant, dict) or not isinstance(quant.get("modules", {}), dict):
        raise error(f"{CONFIG_KEY}.{SECTION}", "must be an object with a `modules` object")
    for name, entry in (quant.get("modules") or {}).items():
        field_name = f"{CONFIG_KEY}.{SECTION}.modules[{name!r}]"
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise error(field_name, f"the {type(model).__name__} has no module {name!r}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise error(field_name, "must be an object with `bits`, `group_size` and `tensors`")
        axes = factor_axes(module)
        unknown = [t for t in entry["tensors"] if t not in axes]
        if unknown:
            raise error(f"{field_name}.tensors", f"{type(module).__name__} has no factor {unknown[0]!r} (it has {sorted(axes)})")
        try:
            check_quant_args(entry.get("bits"), entry.get("group_size"), field_name)
            with torch.no_grad():
                quantize_tensors(module, {t: int(a) for t, a in entry["tensors"].items()}, entry["bits"],
                                 entry.get("group_size"), empty=True)
        except (ValueError, TypeError) as exc:
            raise error(field_name, str(exc)) from None


def is_foreign_quantized(module: nn.Module) -> bool:
    """Whether torch.ao or torchao quantized this module (a module swap, or a tensor-subclass weight)."""
    if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized", "torchao")):
        return True
    weight = module.__dict__.get("_parameters", {}).get("weight")
    return weight is not None and type(weight).__module__.startswith("torchao")


def check_foreign_quantization(model: nn.Module, action: str = "save") -> None:
    """Raise QuantizationError when another quantizer touched the model: torch.ao's quantize_dynamic and
    torchao's quantize_ skip every factor layer (their factors stay float) and write modules a kroncompress
    folder cannot store. The message names the modules and what to run instead."""
    foreign = [name for name, module in model.named_modules() if is_foreign_quantized(module)]
    if not foreign:
        return
    factored = sum(1 for m in model.modules() if getattr(type(m), "FACTOR_AXES", None) is not None and not is_quantized(m))
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise QuantizationError(
        f"cannot {action}: {shown} were quantized by torch.ao / torchao, which skip the {factored} factorized layers "
        "(their factors stay float) and whose modules a kroncompress folder cannot store; start from the unquantized "
        "model and run kc.quantize(model, bits=8) (or `kroncompress quantize`) instead")


def warn_if_factors_skipped(model: nn.Module) -> bool:
    """Warn (and return True) when another quantizer quantized some modules and left factor layers in float."""
    try:
        check_foreign_quantization(model, "quantize the factors")
    except QuantizationError as exc:
        warnings.warn(str(exc), stacklevel=2)
        return True
    return False


def _itemsize(module: nn.Module) -> int:
    first = next(iter(module.parameters()), None)
    return first.element_size() if first is not None else 4


def plan_bytes(model: nn.Module, rows: list, quantize_config: Any = None) -> tuple[int, int]:
    """(weight bytes before, weight bytes after) for a CompressionPlan's `rows` of `model` (meta is fine),
    with the recipe's `quantize` section applied on top when given; sets `bytes_before` / `bytes_after` on
    each row. A factorized module's bytes come from its replacement built empty on the meta device, so the
    kept-in-float rule and the scales count exactly as kc.quantize will."""
    before = weight_bytes(model)
    bits = getattr(quantize_config, "bits", None)
    group_size = getattr(quantize_config, "group_size", None)
    shared, saved, dropped = _shared_ids(model), 0, []
    for row in rows:
        module = model.get_submodule(row.name)
        itemsize = _itemsize(module)
        row.bytes_before = row.plan.params_before * itemsize
        row.bytes_after = row.plan.params_after * itemsize
        if row.structural:
            dropped += [f"{row.name}.{i}." for i in range(len(module)) if i not in set(row.plan.spec.get("keep", []))]
        elif bits is not None:
            with torch.device("meta"):
                new = row.strategy_impl.build(row.plan, None, dtype=next(module.parameters()).dtype)
            summary = QuantizationSummary(bits, group_size)
            choose_tensors(row.name, new, factor_axes(new), bits, group_size, set(), summary)
            row.bytes_after -= sum(r.bytes_before - r.bytes_after for r in summary.rows)
        saved += row.bytes_before - row.bytes_after
    if bits is not None and getattr(quantize_config, "dense", False):
        planned = {row.name for row in rows}
        summary = QuantizationSummary(bits, group_size)
        for name, module, axes in _targets(model, dense=True):
            if name in planned or getattr(type(module), "FACTOR_AXES", None) is not None or any(
                    (name + ".").startswith(prefix) for prefix in dropped):
                continue
            choose_tensors(name, module, axes, bits, group_size, shared, summary)
        saved += sum(r.bytes_before - r.bytes_after for r in summary.rows)
    return before, before - saved
