"""Save and load compressed models as Hugging Face-style folders; export them back to dense.

    kc.save_compressed(model, "out/", recipe=recipe, report=report)
    model = kc.load_compressed("out/")            # same logits, bit for bit; nothing re-decomposed
    dense = kc.to_dense(model)                    # plain transformers model (save_pretrained/from_pretrained)
    kc.export_dense("out/", "out-dense/")

A folder holds config.json (with a `kroncompress` section: per-module plans, tied heads, shared
parameters), model.safetensors, recipe.yaml, report.json and a README.md model card. Only safetensors is
ever read, so loading unpickles nothing.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kroncompress.layers.base import FactorizedLinear
from kroncompress.layers.kronecker import KroneckerEmbedding, KroneckerTiedHead
from kroncompress.strategies import LayerPlan, get_strategy
from kroncompress.surgery import CONFIG_KEY, _set_submodule, count_params, install, set_tie_word_embeddings

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "recipe.yaml", "report.json", "README.md")


class OutputExistsError(FileExistsError, ValueError):
    """The output folder exists and overwrite was not asked for."""


# -- save ------------------------------------------------------------------------------------------

def _shared_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are the same Parameter object (tied), groups of 2 or more."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
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
    save_file(_unique_state(model), str(path), metadata={"format": "pt"})


def _model_card(model: nn.Module, section: dict[str, Any], recipe_dict: dict | None, report: Any, metrics: dict | None) -> str:
    config = model.config
    before = section.get("params_before") or (report.params_before if report is not None else None)
    after = count_params(model)
    recipe_name = (recipe_dict or {}).get("name", "none")
    lines = [
        "---", "library_name: transformers", "tags: [kroncompress, compressed]", "---", "",
        f"# {type(model).__name__} compressed with kroncompress", "",
        f"- architecture: `{type(model).__name__}` (model type `{getattr(config, 'model_type', '?')}`)",
        f"- recipe: `{recipe_name}`" + (f": {recipe_dict.get('description')}" if recipe_dict and recipe_dict.get("description") else ""),
    ]
    if before:
        lines.append(f"- parameters: {before:,} before, {after:,} after ({before / max(after, 1):.2f}x smaller)")
    else:
        lines.append(f"- parameters: {after:,}")
    if section.get("tied_head"):
        lines.append(f"- `{section['tied_head']['head']}` stays tied to `{section['tied_head']['embedding']}` (logits through the same factors)")
    by_strategy: dict[str, list[int]] = {}
    for entry in section.get("modules", {}).values():
        counts = by_strategy.setdefault(entry["strategy"], [0, 0, 0])
        counts[0] += 1
        counts[1] += entry["plan"]["params_before"]
        counts[2] += entry["plan"]["params_after"]
    for entry in section.get("structural", []):
        spec = entry["spec"]
        lines.append(f"- `{entry['name']}`: {entry['strategy']} kept blocks {spec.get('keep')} of {spec.get('num_layers')}")
    if by_strategy:
        lines += ["", "## Compressed modules", "", "| strategy | modules | params before | params after |", "|---|---:|---:|---:|"]
        lines += [f"| {s} | {c[0]} | {c[1]:,} | {c[2]:,} |" for s, c in sorted(by_strategy.items())]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Loading", "", "```python", "import kroncompress as kc", "", 'model = kc.load_compressed("path/to/this/folder")',
              "```", ""]
    if not section.get("modules"):
        lines[-1:-1] = ["", "No module is factorized: `transformers.AutoModel*.from_pretrained` loads this folder as is.", ""]
    return "\n".join(lines)


def save_compressed(model: nn.Module, directory: str | os.PathLike, recipe: Any = None, report: Any = None,
                    metrics: dict[str, Any] | None = None, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write `model` to an HF-style folder, atomically: everything goes into a temporary folder next to
    `directory` that is renamed into place at the end, so a crash never leaves a half-written folder.

    `recipe` (a Recipe; default: the one recorded by `compress`) is written resolved as recipe.yaml,
    `report` (a CompressionReport) and `metrics` into report.json and the README.md model card,
    `tokenizer` with its own save_pretrained. An existing `directory` is replaced only with overwrite=True.
    """
    from kroncompress.recipe import Recipe

    target = Path(directory)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output folder {target} already exists; pass overwrite=True (CLI: --overwrite) or pick another folder")
    if not hasattr(model, "config"):
        raise ValueError(f"save_compressed expects a transformers model with a config, got {type(model).__name__}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        section = copy.deepcopy(getattr(config, CONFIG_KEY, None) or {})
        if section:
            section["shared_parameters"] = _shared_groups(model)
            section["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
            section["params_after"] = count_params(model)
            setattr(config, CONFIG_KEY, section)
        config.save_pretrained(tmp)
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
            "report": report.to_dict() if report is not None else None, "metrics": metrics or {},
        }
        (tmp / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(model, section, recipe_dict, report, metrics), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    if not overwrite:
        raise OutputExistsError(f"output folder {target} appeared while saving; pass overwrite=True to replace it")
    backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# -- load ------------------------------------------------------------------------------------------

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


def _tie_groups(model: nn.Module, groups: list[list[str]]) -> None:
    """Make every parameter of a group the same Parameter object as the group's first."""
    for names in groups:
        shared = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, attribute, shared)


def _load_weights_strict(model: nn.Module, path: Path) -> None:
    loaded = load_file(str(path))
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
    try:
        model.load_state_dict(loaded, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_compressed(directory: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, attn_implementation: str | None = None) -> nn.Module:
    """Load a folder written by `save_compressed`: the architecture from config.json, each compressed
    module rebuilt from its saved plan (no decomposition), tied heads re-tied, then model.safetensors
    loaded with strict key checking. Returns the model in eval mode, on `device`, in `dtype` (default: the
    saved dtype), with logits identical to the model that was saved.
    """
    import transformers
    from transformers.initialization import no_init_weights

    folder = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name}; give a folder written by kc.save_compressed (config.json + model.safetensors)")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    cls = _model_class(config, folder)
    section = getattr(config, CONFIG_KEY, None) or {}
    dtype = dtype or _file_dtype(folder / WEIGHTS_NAME)
    implementation = attn_implementation or section.get("attn_implementation")
    kwargs = {"attn_implementation": implementation} if implementation else {}
    with no_init_weights():  # every weight is overwritten from the file; skip the random init
        model = cls._from_config(config, dtype=dtype, **kwargs)
        for name, entry in section.get("modules", {}).items():
            layer_plan = LayerPlan.from_dict(entry["plan"])
            strategy = get_strategy(entry["strategy"])(config=get_strategy(entry["strategy"]).parse_options(dict(entry.get("options", {}))))
            new = strategy.build(layer_plan, None, dtype=dtype)
            if "padding_idx" in entry:
                new.padding_idx = entry["padding_idx"]
            install(model, name, new, entry.get("tied", []))
    _tie_groups(model, section.get("shared_parameters", []))
    _load_weights_strict(model, folder / WEIGHTS_NAME)
    model.eval()
    if device is not None:
        model.to(device)
    return model


# -- dense export ----------------------------------------------------------------------------------

@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """Replace every factorized module by its dense equivalent, in place, and return the model.

    Kronecker/low-rank linears become nn.Linear (Conv1D for GPT-2), Kronecker embeddings nn.Embedding, and a
    tied head an nn.Linear sharing the dense embedding's weight (tie_word_embeddings restored). The
    kroncompress config section is dropped, so `save_pretrained` gives a folder that
    `AutoModelForCausalLM.from_pretrained` loads without kroncompress.
    """
    replaced: dict[int, nn.Module] = {}
    heads = []
    for name, module in list(model.named_modules()):
        if isinstance(module, KroneckerTiedHead):
            heads.append((name, module))
        elif isinstance(module, (FactorizedLinear, KroneckerEmbedding)) or (
                hasattr(module, "to_dense") and type(module).__module__.startswith("kroncompress.layers")):
            dense = replaced.get(id(module))
            if dense is None:
                dense = module.to_dense()
                dense.train(module.training)
                if isinstance(module, KroneckerEmbedding) and module.padding_idx is not None:
                    dense.padding_idx = module.padding_idx
                replaced[id(module)] = dense
            _set_submodule(model, name, dense)
    for name, head in heads:
        embedding = replaced.get(id(head.tied_to))
        if embedding is None:
            raise ValueError(f"{name} is tied to an embedding that is not part of the model; cannot export it")
        dense_head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=head.bias is not None,
                               device=embedding.weight.device, dtype=embedding.weight.dtype)
        dense_head.weight = embedding.weight
        if head.bias is not None:
            dense_head.bias = head.bias
        _set_submodule(model, name, dense_head)
    config = getattr(model, "config", None)
    if config is not None:
        section = getattr(config, CONFIG_KEY, None) or {}
        tied_head = section.get("tied_head")
        if tied_head:
            set_tie_word_embeddings(model, bool(tied_head.get("tie_word_embeddings", True)))
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
    return model


def export_dense(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Load a compressed folder, densify it, and write a plain transformers folder (atomically).

    Files other than the kroncompress ones (e.g. tokenizer files) are copied along.
    """
    source, target = Path(source), Path(output)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output folder {target} already exists; pass overwrite=True (CLI: --overwrite) or pick another folder")
    model = to_dense(load_compressed(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        for item in source.iterdir():
            if item.is_file() and item.name not in FOLDER_FILES and not (tmp / item.name).exists():
                shutil.copy2(item, tmp / item.name)
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
