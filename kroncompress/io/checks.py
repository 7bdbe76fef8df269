"""The folder layout, and checks of what a folder holds: complete safetensors files, finite tensors, and
the `kroncompress` config section (each saved plan checked against the model before its module is rebuilt)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Raise ValueError (one line naming the file) unless `path` is a complete safetensors file; returns
    its header ({tensor name: {dtype, shape, data_offsets}}, and "__metadata__").

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
                if int(dim) < 0:
                    raise ValueError
                count *= int(dim)
            itemsize = _SAFETENSORS_ITEMSIZE.get(entry["dtype"])  # None: a newer dtype, its size unchecked
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry") from None
        if start < 0 or stop < start or (itemsize is not None and stop - start != count * itemsize):
            raise bad(f"tensor {name!r}: its byte range does not fit its shape and dtype")
        end = max(end, stop)
    if 8 + length + end != size:
        raise bad(f"the header describes {8 + length + end:,} bytes but the file has {size:,}")
    return header


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
        if not isinstance(entry.get("options", {}) or {}, dict):
            raise config_error(folder, f"{field}.options", "is not an object")
        tied = entry.get("tied", []) or []
        if not isinstance(tied, list) or not all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("as") in ("head", "alias") for t in tied):
            raise config_error(folder, f"{field}.tied", 'must be a list of {"name": module, "as": "head" or "alias"}')
        padding = entry.get("padding_idx")
        if padding is not None and (type(padding) is not int or padding < 0):
            raise config_error(folder, f"{field}.padding_idx", f"must be null or a token id, got {padding!r}")
    implementation = section.get("attn_implementation")
    if implementation is not None and not isinstance(implementation, str):
        raise config_error(folder, f"{CONFIG_KEY}.attn_implementation", f"must be a name, got {implementation!r}")
    shared = section.get("shared_parameters", []) or []
    if not isinstance(shared, list) or not all(
            isinstance(g, list) and len(g) > 1 and all(isinstance(n, str) for n in g) for g in shared):
        raise config_error(folder, f"{CONFIG_KEY}.shared_parameters", "must be a list of lists of 2+ parameter names")
    return modules


def rebuild_module(model: nn.Module, name: str, entry: dict[str, Any], folder: Path, dtype,
                    saved_name: str | None = None) -> nn.Module:
    """The compressed module `name` rebuilt from its saved plan, after checking the plan against the model."""
    field = f"{CONFIG_KEY}.modules[{saved_name or name!r}]"
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


def _local_name(model: nn.Module, name: str) -> str | None:
    """`name` (as saved from the folder's own class) as `model` names it: the same, without the base model's
    prefix when `model` is the bare base model (AutoModel), with it when the folder was saved from the base
    model; None when `model` has no such module or parameter (e.g. a head another class lacks)."""
    def exists(candidate: str) -> bool:
        try:
            model.get_submodule(candidate)
            return True
        except AttributeError:
            try:
                model.get_parameter(candidate)
                return True
            except AttributeError:
                return False

    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1:])
    elif prefix and hasattr(model, prefix):
        candidates.append(f"{prefix}.{name}")
    return next((c for c in candidates if exists(c)), None)


def _base_model_test(model: nn.Module, section: dict[str, Any]):
    """name -> whether the saved name lies inside the base model (not in a task head). A folder saved from
    a head class names the base model's modules under its prefix (`transformer.h.0...`), its head outside
    it (`lm_head`); one saved from the base model itself names everything without the prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    saved = [*(section.get("modules", {}) or {}), *(n for g in section.get("shared_parameters", []) or [] for n in g)]
    from_head = bool(prefix) and any(n.startswith(prefix + ".") for n in saved)
    return lambda name: not from_head or name.startswith(prefix + ".")


def rebuild_modules(model: nn.Module, section: Any, folder: Path, dtype, other_class: bool = False) -> "Rebuilt":
    """Rebuild every factorized module of a folder's `kroncompress` section on `model` (the one routine of
    both loaders): each plan checked against the model, the module rebuilt and installed with its tied
    modules, then the shared parameter groups tied. `other_class`: `model` is another class than the one
    saved (AutoModel, or another head, on a causal LM folder): names are mapped to the model's, and modules
    of a head the model lacks are skipped (transformers warns about the head it adds or drops)."""
    from kroncompress.surgery import install

    modules = check_section(section, folder)
    _in_base = _base_model_test(model, section)
    rebuilt: list[str] = []
    for saved_name, entry in modules.items():
        name = _local_name(model, saved_name) if other_class else saved_name
        if name is None:
            if _in_base(saved_name):
                name = saved_name  # reported as "no module" below
            else:
                continue
        new = rebuild_module(model, name, entry, folder, dtype, saved_name)
        if entry.get("padding_idx") is not None:
            new.padding_idx = entry["padding_idx"]
        tied = []
        for tie in entry.get("tied", []) or []:
            local = _local_name(model, tie["name"]) if other_class else tie["name"]
            if local is not None:
                tied.append({**tie, "name": local})
            elif not other_class or _in_base(tie["name"]):
                raise config_error(folder, f"{CONFIG_KEY}.modules[{saved_name!r}].tied",
                                    f"the {type(model).__name__} has no module {tie['name']!r}")
        try:
            install(model, name, new, tied)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise config_error(folder, f"{CONFIG_KEY}.modules[{saved_name!r}].tied", f"{type(exc).__name__}: {exc}") from None
        rebuilt.append(name)
    if (section.get("quantization") or {}).get("modules"):
        if other_class:
            raise config_error(folder, f"{CONFIG_KEY}.quantization", f"a kc.quantize'd folder loads only as the class it "
                                f"was saved as, not as a {type(model).__name__}")
        from kroncompress.quantization import apply_saved_quantization

        apply_saved_quantization(model, section, lambda field, problem: config_error(folder, field, problem))
    groups = []
    for group in section.get("shared_parameters", []) or []:
        local = []
        for saved in group:
            name = _local_name(model, saved) if other_class else saved
            if name is not None or _in_base(saved):
                local.append(name or saved)  # a name the model lacks is reported by tie_groups
        if len(local) > 1:
            groups.append(local)
    if "shared_parameters" not in section and hasattr(model, "tie_weights"):
        model.tie_weights()  # transformers' own save_pretrained wrote the folder (a layer-dropped model): its config's ties
    tie_groups(model, groups, folder)
    prefix = getattr(model, "base_model_prefix", "") or ""
    # the model's own names: in a head class, its head lies outside the base model's prefix
    head = bool(prefix) and hasattr(model, prefix)
    # a tensor of a head: one this class adds (outside its base model) or one the saved class had
    optional = (lambda name: (head and not name.startswith(prefix + ".")) or not _in_base(name)) if other_class \
        else (lambda name: False)
    return Rebuilt(rebuilt, groups, optional)


@dataclass
class Rebuilt:
    """What `rebuild_modules` did: the rebuilt modules' names, the tied groups (the model's names), and
    which tensor names may be absent from the file (a head of another class)."""

    modules: list[str]
    shared: list[list[str]]
    optional: Any


def tie_groups(model: nn.Module, groups: list[list[str]], folder: Path) -> None:
    """Make every parameter of a group the same Parameter object as the group's first."""
    for names in groups:
        try:
            params = [model.get_parameter(name) for name in names]
        except AttributeError as exc:
            raise config_error(folder, f"{CONFIG_KEY}.shared_parameters", f"{exc}") from None
        if len({tuple(p.shape) for p in params}) > 1:
            raise config_error(folder, f"{CONFIG_KEY}.shared_parameters",
                                f"{', '.join(names)} have different shapes and cannot be one parameter")
        shared = params[0]
        for name in names[1:]:
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, attribute, shared)
