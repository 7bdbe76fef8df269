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

from kroncompress.io.checks import CONFIG_NAME, WEIGHTS_NAME, check_safetensors, check_section, rebuild_modules
from kroncompress.io.config import REFUSAL, mark
from kroncompress.io.verify import check_finite, check_shared, check_stored, read_specs
from kroncompress.surgery import CONFIG_KEY
from kroncompress.io.metadata import check_weights_metadata


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


def _load_weights_strict(model: nn.Module, path: Path, specs: dict, shared: list[list[str]]) -> None:
    """Load the checked file (see kroncompress.io.verify) into the rebuilt model: its keys, shapes and
    dtypes were checked on the meta model; here the tied groups and the values."""
    loaded = load_file(str(path))
    names = check_stored(model, specs, str(path))
    loaded = {names[old]: tensor for old, tensor in loaded.items()}
    check_shared(shared, specs, names, lambda old: loaded[names[old]], path.parent)
    check_finite(loaded, str(path))
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
    from transformers.initialization import no_init_weights

    folder = Path(directory)
    cls, config, section, dtype, kwargs, specs = check_structure(folder, dtype, attn_implementation)
    with no_init_weights():  # every weight is overwritten from the file; skip the random init
        model = _build(cls, config, dtype, kwargs, folder)
        rebuilt = rebuild_modules(model, section, folder, dtype)
    _load_weights_strict(model, folder / WEIGHTS_NAME, specs, rebuilt.shared)
    mark(model)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def check_structure(folder: Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """Everything of a folder but the tensors' values, checked without allocating: the files, config.json and
    its plans, and the weights file's header against the model rebuilt on the meta device (an edited config,
    e.g. a huge n_embd, is refused before anything is allocated). Returns what `load_compressed` builds from:
    (class, config, kroncompress section, dtype, build kwargs, stored tensor specs)."""
    import transformers

    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name}; give a folder written by kc.save_compressed (config.json + model.safetensors)")
    specs = read_specs([folder / WEIGHTS_NAME])
    check_weights_metadata(folder / WEIGHTS_NAME)  # a newer kroncompress format: say so before any shape error
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as exc:
        raise ValueError(f"{folder / CONFIG_NAME}: not a readable model config ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         "restore it or compress again") from None
    cls = _model_class(config, folder)
    if getattr(config, "transformers_weights", None) == REFUSAL:
        delattr(config, "transformers_weights")  # the plain-transformers refusal marker (see kroncompress.hf)
    section = getattr(config, CONFIG_KEY, None) or {}
    check_section(section, folder)
    dtype = dtype or _file_dtype(folder / WEIGHTS_NAME)
    implementation = attn_implementation or section.get("attn_implementation")
    kwargs = {"attn_implementation": implementation} if implementation else {}
    with torch.device("meta"):
        skeleton = _build(cls, config, dtype, kwargs, folder)
        rebuilt = rebuild_modules(skeleton, section, folder, dtype)
    check_stored(skeleton, specs, str(folder / WEIGHTS_NAME), rebuilt.modules)
    return cls, config, section, dtype, kwargs, specs


def _build(cls, config, dtype, kwargs, folder: Path) -> nn.Module:
    try:
        return cls._from_config(config, dtype=dtype, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{folder / CONFIG_NAME}: cannot build the {cls.__name__} from it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         "restore it or compress again") from None


def _marker_problems(folder: Path) -> list[str]:
    """A folder with factorized modules whose config.json lost the marker that makes plain transformers refuse
    it (a folder saved before the marker existed, or `AutoConfig.from_pretrained(f).save_pretrained(f)`, which
    drops `transformers_weights`): kroncompress still loads it, but without kroncompress transformers would
    load random weights, with only a warning."""
    import json

    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return []  # reported by the load
    section = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    if not isinstance(section, dict) or not section.get("modules") or config.get("transformers_weights") == REFUSAL:
        return []
    return [f"{folder / CONFIG_NAME} lacks the kroncompress checkpoint marker (`transformers_weights`, dropped by a "
            "config round trip through transformers): kroncompress loads the folder, but plain transformers would load "
            f"random weights; restore it with: python -c \"import kroncompress.hf as h; h.mark_config('{folder / CONFIG_NAME}')\""]


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
    if not problems:
        problems += _marker_problems(folder)
    if problems or not load:
        return problems
    try:
        load_compressed(folder)
    except (ValueError, OSError) as exc:
        problems.append(" ".join(str(exc).split()))
    return problems
