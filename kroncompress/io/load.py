"""`load_compressed`: the model rebuilt from a folder's config and saved plans (nothing re-decomposed),
weights loaded strictly (legacy key names renamed as transformers does); `verify_folder` lists problems."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from kroncompress import hf  # registers the kroncompress format with transformers' from_pretrained
from kroncompress.io.checks import (
    CONFIG_NAME, WEIGHTS_NAME, _check_section, _config_error, _rebuild_module, check_safetensors, first_nonfinite,
)
from kroncompress.surgery import CONFIG_KEY, install


def _model_class(config: Any, folder: Path):
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise ValueError(f"{folder / CONFIG_NAME}: 'architectures' is {names!r}, not a transformers model class; "
                     "save the folder with kc.save_compressed (it records the class)")


def _file_dtype(path: Path) -> torch.dtype:
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_slice(key)
            dtype = getattr(torch, {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(tensor.get_dtype(), ""), None)
            if isinstance(dtype, torch.dtype):
                return dtype
    return torch.float32


def _tie_groups(model: nn.Module, groups: list[list[str]], folder: Path) -> None:
    """Make every parameter of a group the same Parameter object as the group's first."""
    for names in groups:
        try:
            params = [model.get_parameter(name) for name in names]
        except AttributeError as exc:
            raise _config_error(folder, f"{CONFIG_KEY}.shared_parameters", f"{exc}") from None
        if len({tuple(p.shape) for p in params}) > 1:
            raise _config_error(folder, f"{CONFIG_KEY}.shared_parameters",
                                f"{', '.join(names)} have different shapes and cannot be one parameter")
        shared = params[0]
        for name in names[1:]:
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, attribute, shared)


def model_key_names(model: nn.Module, keys) -> dict[str, str]:
    """{stored key: the model's name for it}. transformers' save_pretrained writes some architectures (ViT,
    GPT-NeoX ...) under their legacy checkpoint names and renames them when loading; this applies the same
    renamings (name changes only: a key that needs a tensor conversion keeps its stored name)."""
    names = set(model.state_dict(keep_vars=True))
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [m for m in get_model_conversion_mapping(model) if isinstance(m, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # another transformers: the names as stored
        renamings = []
    if not renamings:
        return {key: key for key in keys}
    prefix, meta = getattr(model, "base_model_prefix", None), dict.fromkeys(names, True)
    return {key: key if key in names else rename_source_key(key, renamings, [], prefix, meta)[0] for key in keys}


def _load_weights_strict(model: nn.Module, path: Path) -> None:
    loaded = load_file(str(path))
    loaded = {new: loaded[old] for old, new in model_key_names(model, loaded).items()}
    expected = model.state_dict()
    alias_of: dict[str, list[str]] = {}
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    for names in groups.values():
        for name in names:
            alias_of[name] = names
    missing = [n for n in expected if n not in loaded and not any(a in loaded for a in alias_of.get(n, [n]))]
    unexpected = [n for n in loaded if n not in expected]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "") if keys else "none"
        raise ValueError(f"{path}: the weights do not match the model rebuilt from config.json: missing keys: {show(missing)}; "
                         f"unexpected keys: {show(unexpected)}. The folder is damaged or was written by another version")
    for name, tensor in loaded.items():
        want = expected[name]
        if tensor.is_floating_point() != want.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, the model needs "
                             f"{str(want.dtype).removeprefix('torch.')}; the folder was edited or damaged: compress again")
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the plan in config.json gives "
                             f"{tuple(want.shape)}; the weights and config.json do not belong together: compress again")
    bad = first_nonfinite(loaded)
    if bad is not None:
        raise ValueError(f"{path}: tensor {bad[0]!r} holds NaN or inf values ({bad[1]:,} of {bad[2]:,}); the folder "
                         "is damaged (or the run diverged): compress again")
    try:
        model.load_state_dict(loaded, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{path}: " + " ".join(str(exc).split())) from None


def load_compressed(directory: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, attn_implementation: str | None = None) -> nn.Module:
    """Load a folder written by `save_compressed`: the architecture from config.json, each compressed
    module rebuilt from its saved plan (no decomposition), tied heads re-tied, then model.safetensors
    loaded with strict key checking. Everything read is checked first: the file is a complete safetensors
    file, each module's plan names a module of the model with its shape and a registered strategy, shared
    parameters exist, and every tensor has the rebuilt model's shape, a floating dtype where the model has
    one and finite values; a ValueError names the config field, module or tensor otherwise. Returns the model in eval mode, on `device`, in `dtype` (default: the
    saved dtype), with logits identical to the model that was saved.
    """
    import transformers
    from transformers.initialization import no_init_weights

    folder = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name}; give a folder written by kc.save_compressed (config.json + model.safetensors)")
    check_safetensors(folder / WEIGHTS_NAME)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise ValueError(f"{folder / CONFIG_NAME}: not a readable model config ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         "restore it or compress again") from None
    cls = _model_class(config, folder)
    if getattr(config, "transformers_weights", None) == hf.REFUSAL:
        delattr(config, "transformers_weights")  # the plain-transformers refusal marker (see kroncompress.hf)
    section = getattr(config, CONFIG_KEY, None) or {}
    modules = _check_section(section, folder)
    dtype = dtype or _file_dtype(folder / WEIGHTS_NAME)
    implementation = attn_implementation or section.get("attn_implementation")
    kwargs = {"attn_implementation": implementation} if implementation else {}
    with no_init_weights():  # every weight is overwritten from the file; skip the random init
        try:
            model = cls._from_config(config, dtype=dtype, **kwargs)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{folder / CONFIG_NAME}: cannot build the {cls.__name__} from it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                             "restore it or compress again") from None
        for name, entry in modules.items():
            new = _rebuild_module(model, name, entry, folder, dtype)
            if "padding_idx" in entry:
                new.padding_idx = entry["padding_idx"]
            try:
                install(model, name, new, entry.get("tied", []))
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise _config_error(folder, f"{CONFIG_KEY}.modules[{name!r}].tied", f"{type(exc).__name__}: {exc}") from None
    if "shared_parameters" in section:
        _tie_groups(model, section["shared_parameters"] or [], folder)
    else:  # a folder transformers' own save_pretrained wrote (e.g. a layer-dropped model): its config's ties
        model.tie_weights()
    _load_weights_strict(model, folder / WEIGHTS_NAME)
    hf.mark(model)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def verify_folder(directory: str | os.PathLike, load: bool = True) -> list[str]:
    """Problems of a folder written by `save_compressed`, one line each (empty list: none found).

    Checks that config.json and model.safetensors exist and that the weights file is a complete safetensors
    file; with `load=True` (default) also loads the model as `load_compressed` does, which checks every saved
    plan against the model and every tensor's shape, dtype and values. Used by `kroncompress inspect`.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            problems.append(f"{folder / name} is missing")
    if (folder / WEIGHTS_NAME).is_file():
        try:
            check_safetensors(folder / WEIGHTS_NAME)
        except (ValueError, OSError) as exc:
            problems.append(str(exc))
    if problems or not load:
        return problems
    try:
        load_compressed(folder)
    except (ValueError, OSError) as exc:
        problems.append(" ".join(str(exc).split()))
    return problems
