"""The folder layout, and checks of what a folder holds: complete safetensors files, finite tensors, and
the `kroncompress` config section (each saved plan checked against the model before its module is rebuilt)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kroncompress.strategies import LayerPlan, get_strategy
from kroncompress.strategies.base import with_forward_mode
from kroncompress.surgery import CONFIG_KEY

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "recipe.yaml", "report.json", "README.md")


# bytes per element of every dtype safetensors writes
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise ValueError (one line naming the file) unless `path` is a complete safetensors file.

    Reads only the header (8-byte length + JSON) and compares the byte ranges it declares with the file
    size, so a truncated download or a file of another format is caught before any tensor is read.
    """
    path = Path(path)

    def bad(problem: str) -> ValueError:
        return ValueError(f"{path} is truncated or not a safetensors file: {problem}; re-download or re-save it")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise bad(f"{size} bytes, too short for a header")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise bad(f"the header claims {length:,} bytes but the file has {size:,}")
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"the header is not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in entry["data_offsets"])
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            itemsize = _SAFETENSORS_ITEMSIZE.get(entry["dtype"])  # None: a newer dtype, its size unchecked
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry") from None
        if start < 0 or stop < start or (itemsize is not None and stop - start != count * itemsize):
            raise bad(f"tensor {name!r}: its byte range does not fit its shape and dtype")
        end = max(end, stop)
    if 8 + length + end != size:
        raise bad(f"the header describes {8 + length + end:,} bytes but the file has {size:,}")


def first_nonfinite(tensors) -> tuple[str, int, int] | None:
    """(name, bad count, size) of the first floating tensor of a name -> tensor mapping holding NaN or inf."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            continue
        if tensor.is_floating_point() or tensor.is_complex():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                return name, int((~finite).sum()), tensor.numel()
    return None


def config_error(folder: Path, field: str, problem: str) -> ValueError:
    return ValueError(f"{folder / CONFIG_NAME}: {field}: {problem}; the folder was edited or damaged: restore it or "
                      "compress again")


def _module_shape(module: nn.Module) -> tuple[str | None, tuple[int, int] | None]:
    """(kind, (out, in) or (vocab, dim)) of a dense module as a plan records it."""
    from kroncompress.surgery import module_kind

    kind = module_kind(module)
    weight = getattr(module, "weight", None)
    if kind is None or weight is None:
        return kind, None
    shape = tuple(weight.shape)
    return kind, (shape[1], shape[0]) if kind == "conv1d" else shape


def check_section(section: Any, folder: Path) -> dict[str, Any]:
    """The `kroncompress` section's structure (types only; modules are checked as they are rebuilt)."""
    if not isinstance(section, dict):
        raise config_error(folder, CONFIG_KEY, f"is a {type(section).__name__}, not an object")
    modules = section.get("modules", {}) or {}
    if not isinstance(modules, dict):
        raise config_error(folder, f"{CONFIG_KEY}.modules", f"is a {type(modules).__name__}, not an object")
    for name, entry in modules.items():
        field = f"{CONFIG_KEY}.modules[{name!r}]"
        if not isinstance(entry, dict):
            raise config_error(folder, field, f"is a {type(entry).__name__}, not an object")
        for key in ("strategy", "plan"):
            if key not in entry:
                raise config_error(folder, field, f"has no {key!r} key")
        if not isinstance(entry["plan"], dict):
            raise config_error(folder, f"{field}.plan", "is not an object")
    shared = section.get("shared_parameters", []) or []
    if not isinstance(shared, list) or not all(
            isinstance(g, list) and len(g) > 1 and all(isinstance(n, str) for n in g) for g in shared):
        raise config_error(folder, f"{CONFIG_KEY}.shared_parameters", "must be a list of lists of 2+ parameter names")
    return modules


def rebuild_module(model: nn.Module, name: str, entry: dict[str, Any], folder: Path, dtype) -> nn.Module:
    """The compressed module `name` rebuilt from its saved plan, after checking the plan against the model."""
    field = f"{CONFIG_KEY}.modules[{name!r}]"
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise config_error(folder, field, f"the {type(model).__name__} has no module {name!r}") from None
    try:
        strategy_cls = get_strategy(entry["strategy"])
    except (ValueError, TypeError) as exc:
        raise config_error(folder, f"{field}.strategy", str(exc).splitlines()[0]) from None
    try:
        layer_plan = LayerPlan.from_dict(entry["plan"])
    except (TypeError, KeyError, ValueError) as exc:
        raise config_error(folder, f"{field}.plan", f"not a saved plan ({exc})") from None
    kind, shape = _module_shape(old)
    if layer_plan.strategy != entry["strategy"] or layer_plan.kind != kind or tuple(layer_plan.shape) != shape:
        raise config_error(folder, f"{field}.plan", (
            f"says a {layer_plan.kind} {tuple(layer_plan.shape)} by {layer_plan.strategy!r}, but the module is a "
            f"{kind} {shape} compressed by {entry['strategy']!r}"))
    for key, value in layer_plan.spec.items():  # shapes and ranks: positive integers, possibly nested in lists
        leaves = value if isinstance(value, list) else [value]
        leaves = [v for leaf in leaves for v in (leaf if isinstance(leaf, list) else [leaf])]
        if not all(type(v) is int and v > 0 for v in leaves):
            raise config_error(folder, f"{field}.plan.spec.{key}", f"must hold positive integers, got {value!r}")
    try:
        options = strategy_cls.parse_options(dict(entry.get("options", {}) or {}))
        strategy = strategy_cls(config=options)
        new = with_forward_mode(strategy, strategy.build(layer_plan, None, dtype=dtype))
    except Exception as exc:  # noqa: BLE001  any failure here comes from the edited plan
        raise config_error(folder, f"{field}.plan", f"cannot rebuild the module ({type(exc).__name__}: "
                                                     f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return new
