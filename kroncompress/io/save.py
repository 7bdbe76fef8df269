"""`save_compressed`: a model written atomically (temporary folder, then rename) as config.json with the
`kroncompress` section, model.safetensors (each shared tensor once), recipe.yaml, report.json and a card."""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

from kroncompress.io.card import model_card
from kroncompress.io.checks import CONFIG_NAME, WEIGHTS_NAME
from kroncompress.io.config import is_factorized, mark_config, saved_section
from kroncompress.io.load import check_structure
from kroncompress.io.metadata import weights_metadata
from kroncompress.io.verify import check_finite
from kroncompress.outputs import OutputExistsError, replace_folder
from kroncompress.quantization import check_foreign_quantization, weight_bytes
from kroncompress.surgery import CONFIG_KEY, count_params


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor stored once (safetensors refuses aliases)."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    # tensors that overlap without being identical views cannot be aliased in safetensors: copy them
    ptrs: dict[int, str] = {}
    for name, tensor in list(out.items()):
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in ptrs:
            out[name] = tensor.clone()
        ptrs[ptr] = name
    return out


def _write_weights(model: nn.Module, path: Path) -> None:
    state = unique_state(model)
    check_finite(state, "save_compressed: the model")  # a folder holding NaN would not reload
    save_file(state, str(path), metadata=weights_metadata())


def _refuse_adapters(model: nn.Module) -> None:
    """A model still wrapped in LoRA layers: its modules no longer match the plan config.json records."""
    wrapped = next((name for name, module in model.named_modules() if type(module).__module__.startswith("peft.")
                    or type(module).__name__ == "FactorizedLoraLinear"), None)
    if wrapped is not None:
        raise ValueError(f"save_compressed: {wrapped} is a LoRA (PEFT) layer; merge the adapters first "
                         "(kc.lora.merge), or save the adapter alone with peft_model.save_pretrained and the base "
                         "model with save_compressed")


def save_compressed(model: nn.Module, directory: str | os.PathLike, recipe: Any = None, report: Any = None,
                    metrics: dict[str, Any] | None = None, tokenizer: Any = None, overwrite: bool = False,
                    card: dict[str, Any] | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write `model` to an HF-style folder, atomically: everything goes into a temporary folder next to
    `directory` that is renamed into place at the end, so a crash never leaves a half-written folder.

    `recipe` (a Recipe; default: the one recorded by `compress`) is written resolved as recipe.yaml,
    `report` (a CompressionReport) and `metrics` into report.json and the README.md model card,
    `tokenizer` with its own save_pretrained. An existing `directory` is replaced only with overwrite=True.
    The model card's front matter says `library_name: kroncompress`, the strategies and model type as tags,
    the `pipeline_tag` of the model class, and from `card` (else what the model knows): `base_model`
    (default: the config's name_or_path; written only when it is a hub id, see `io.card.hub_model_id`),
    `license` (default: the source model's, from its README.md or config when found locally) and `datasets`.
    model.safetensors carries metadata naming the writer (see `io.metadata`).
    `extra(folder)` is called with the temporary folder before the rename, to add a run's own files (its
    results in report.json, plots), so those are part of the atomic write too.
    """
    from kroncompress.recipe import Recipe

    target = Path(directory)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output folder {target} already exists; pass overwrite=True or pick another folder")
    if not hasattr(model, "config"):
        raise ValueError(f"save_compressed expects a transformers model with a config, got {type(model).__name__}")
    check_foreign_quantization(model)  # torch.ao / torchao modules: a clear error, not a crash in safetensors
    _refuse_adapters(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        section = saved_section(model)
        if section:
            setattr(config, CONFIG_KEY, section)
        config.save_pretrained(tmp)
        if is_factorized(config):
            mark_config(tmp / CONFIG_NAME)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(tmp)
        _write_weights(model, tmp / WEIGHTS_NAME)
        if recipe is None and section.get("recipe"):
            recipe = Recipe.from_dict(section["recipe"], source="config.json kroncompress.recipe")
        recipe_dict = recipe.to_dict() if recipe is not None else None
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        summary = {
            "params_before": section.get("params_before"), "params_after": count_params(model),
            "weight_bytes": weight_bytes(model),
            "report": report.to_dict() if report is not None else None, "metrics": metrics or {},
        }
        (tmp / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(model, section, recipe_dict, report, metrics, card), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        try:  # what load_compressed checks before reading values: never put a folder in place that cannot reload
            check_structure(tmp)
        except ValueError as exc:
            raise ValueError(f"save_compressed: not writing {target}: the folder would not reload ("
                             f"{str(exc).replace(str(tmp), str(target))})") from None
        move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def move_into_place(tmp: Path, target: Path, overwrite: bool, command: str = "save_compressed") -> None:
    """The rename into place, with its manifest and ownership rule (`kroncompress.outputs.replace_folder`)."""
    replace_folder(tmp, target, overwrite=overwrite, command=command)
