"""Save and load compressed models as Hugging Face-style folders; export them back to dense.

    kc.save_compressed(model, "out/", recipe=recipe, report=report)
    model = kc.load_compressed("out/")            # same logits, bit for bit; nothing re-decomposed
    model = AutoModelForCausalLM.from_pretrained("out/")  # the same, kroncompress imported (kroncompress.hf)
    dense = kc.to_dense(model)                    # plain transformers model (save_pretrained/from_pretrained)
    kc.io.verify_folder("out/")                   # [] or one line per problem (truncated weights, bad plan, ...)
    kc.export_dense("out/", "out-dense/")

A folder holds config.json (with a `kroncompress` section: per-module plans, tied heads, shared
parameters), model.safetensors, recipe.yaml, report.json and a README.md model card. Only safetensors is
ever read, so loading unpickles nothing; and everything read is validated (see `load_compressed`).
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

from kroncompress import hf  # registers the kroncompress format with transformers' from_pretrained
from kroncompress.layers.base import FactorizedLinear
from kroncompress.layers.kronecker import KroneckerEmbedding, KroneckerTiedHead
from kroncompress.outputs import OutputExistsError, match_file_mode  # noqa: F401  (OutputExistsError: re-exported)
from kroncompress.strategies import LayerPlan, get_strategy
from kroncompress.strategies.base import with_forward_mode
from kroncompress.surgery import CONFIG_KEY, _set_submodule, count_params, install, set_tie_word_embeddings

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "recipe.yaml", "report.json", "README.md")


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


def saved_section(model: nn.Module) -> dict[str, Any]:
    """The `kroncompress` config section as a folder stores it: the recorded plan plus what only the model
    object knows (tied parameter groups, attention implementation, parameter count)."""
    section = copy.deepcopy(getattr(model.config, CONFIG_KEY, None) or {})
    if section:
        section["shared_parameters"] = _shared_groups(model)
        section["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        section["params_after"] = count_params(model)
    return section


def _write_weights(model: nn.Module, path: Path) -> None:
    save_file(_unique_state(model), str(path), metadata={"format": "pt"})


def _front_matter(model: nn.Module, section: dict[str, Any], recipe_dict: dict | None, metrics: dict | None,
                  card: dict | None) -> str:
    """The model card's YAML metadata (Hugging Face model card fields): library, tags (the strategies),
    base model, licence, datasets and metrics; values not known are left out."""
    import yaml

    card = dict(card or {})
    strategies = sorted({e["strategy"] for e in section.get("modules", {}).values()}
                        | {e["strategy"] for e in section.get("structural", [])})
    meta: dict[str, Any] = {"library_name": "kroncompress", "tags": ["kroncompress", "compressed", *strategies]}
    base = card.get("base_model") or getattr(model.config, "_name_or_path", "") or None
    if base:
        meta["base_model"] = str(base)
    licence = card.get("license") or (source_license(base) if base else None)
    if licence:
        meta["license"] = licence
    if card.get("datasets"):
        meta["datasets"] = list(dict.fromkeys(card["datasets"]))
    metrics = metrics or {}
    before = metrics.get("perplexity teacher")
    after = metrics.get("perplexity distilled", metrics.get("perplexity compressed"))
    if before is not None or after is not None or "perplexity" in metrics:
        meta["metrics"] = ["perplexity"]
    extra: dict[str, Any] = {"recipe": (recipe_dict or {}).get("name")}
    if before is not None:
        extra["perplexity_before"] = float(before)
    if after is not None:
        extra["perplexity_after"] = float(after)
    meta["kroncompress"] = {k: v for k, v in extra.items() if v is not None}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def source_license(source: Any) -> str | None:
    """The licence of a source model, from its README.md front matter (`license:`) or its config
    (`license`), read from a local folder or the local hub cache; None when not found (never downloads)."""
    import yaml

    folder = Path(str(source)).expanduser()
    readme, config = folder / "README.md", folder / CONFIG_NAME
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = [try_to_load_from_cache(str(source), name) for name in ("README.md", CONFIG_NAME)]
        except Exception:  # not a valid repo id
            return None
        readme, config = (Path(c) if isinstance(c, str) else Path("/nonexistent") for c in cached)
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            head = text.split("---", 2)[1] if text.count("---") >= 2 else ""
            try:
                meta = yaml.safe_load(head) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and meta.get("license"):
                return str(meta["license"])
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("license")
        except (ValueError, OSError):
            value = None
        if value:
            return str(value)
    return None


def _model_card(model: nn.Module, section: dict[str, Any], recipe_dict: dict | None, report: Any, metrics: dict | None,
                card: dict | None = None) -> str:
    config = model.config
    before = section.get("params_before") or (report.params_before if report is not None else None)
    after = count_params(model)
    recipe_name = (recipe_dict or {}).get("name", "none")
    lines = [
        _front_matter(model, section, recipe_dict, metrics, card),
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
    lines += ["", "## Loading", "", "```python", "import kroncompress  # pip install kroncompress; registers this format",
              "from transformers import AutoModel", "",
              'model = AutoModel.from_pretrained("path/to/this/folder")  # or the AutoModelFor* class of the architecture',
              '# the same: model = kroncompress.load_compressed("path/to/this/folder")', "```", ""]
    if section.get("modules"):
        lines += ["Without `import kroncompress`, transformers refuses this folder instead of loading random weights.", ""]
    else:
        lines[-1:-1] = ["", "No module is factorized: `transformers.AutoModel*.from_pretrained` loads this folder as is.", ""]
    return "\n".join(lines)


def save_compressed(model: nn.Module, directory: str | os.PathLike, recipe: Any = None, report: Any = None,
                    metrics: dict[str, Any] | None = None, tokenizer: Any = None, overwrite: bool = False,
                    card: dict[str, Any] | None = None) -> Path:
    """Write `model` to an HF-style folder, atomically: everything goes into a temporary folder next to
    `directory` that is renamed into place at the end, so a crash never leaves a half-written folder.

    `recipe` (a Recipe; default: the one recorded by `compress`) is written resolved as recipe.yaml,
    `report` (a CompressionReport) and `metrics` into report.json and the README.md model card,
    `tokenizer` with its own save_pretrained. An existing `directory` is replaced only with overwrite=True.
    The model card's front matter says `library_name: kroncompress`, the strategies as tags, and from
    `card` (else what the model knows): `base_model` (default: the config's name_or_path), `license`
    (default: the base model's, from its README.md or config when found locally) and `datasets`.
    """
    from kroncompress.recipe import Recipe

    target = Path(directory)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output folder {target} already exists; pass overwrite=True or pick another folder")
    if not hasattr(model, "config"):
        raise ValueError(f"save_compressed expects a transformers model with a config, got {type(model).__name__}")
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
        if hf.is_factorized(config):
            hf.mark_config(tmp / CONFIG_NAME)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(tmp)
        _write_weights(model, tmp / WEIGHTS_NAME)
        match_file_mode(tmp / WEIGHTS_NAME, tmp / CONFIG_NAME)  # safetensors writes 0600 whatever the umask
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
        (tmp / "README.md").write_text(_model_card(model, section, recipe_dict, report, metrics, card), encoding="utf-8")
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


# -- checks ----------------------------------------------------------------------------------------

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


def _config_error(folder: Path, field: str, problem: str) -> ValueError:
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


def _check_section(section: Any, folder: Path) -> dict[str, Any]:
    """The `kroncompress` section's structure (types only; modules are checked as they are rebuilt)."""
    if not isinstance(section, dict):
        raise _config_error(folder, CONFIG_KEY, f"is a {type(section).__name__}, not an object")
    modules = section.get("modules", {}) or {}
    if not isinstance(modules, dict):
        raise _config_error(folder, f"{CONFIG_KEY}.modules", f"is a {type(modules).__name__}, not an object")
    for name, entry in modules.items():
        field = f"{CONFIG_KEY}.modules[{name!r}]"
        if not isinstance(entry, dict):
            raise _config_error(folder, field, f"is a {type(entry).__name__}, not an object")
        for key in ("strategy", "plan"):
            if key not in entry:
                raise _config_error(folder, field, f"has no {key!r} key")
        if not isinstance(entry["plan"], dict):
            raise _config_error(folder, f"{field}.plan", "is not an object")
    shared = section.get("shared_parameters", []) or []
    if not isinstance(shared, list) or not all(
            isinstance(g, list) and len(g) > 1 and all(isinstance(n, str) for n in g) for g in shared):
        raise _config_error(folder, f"{CONFIG_KEY}.shared_parameters", "must be a list of lists of 2+ parameter names")
    return modules


def _rebuild_module(model: nn.Module, name: str, entry: dict[str, Any], folder: Path, dtype) -> nn.Module:
    """The compressed module `name` rebuilt from its saved plan, after checking the plan against the model."""
    field = f"{CONFIG_KEY}.modules[{name!r}]"
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise _config_error(folder, field, f"the {type(model).__name__} has no module {name!r}") from None
    try:
        strategy_cls = get_strategy(entry["strategy"])
    except (ValueError, TypeError) as exc:
        raise _config_error(folder, f"{field}.strategy", str(exc).splitlines()[0]) from None
    try:
        layer_plan = LayerPlan.from_dict(entry["plan"])
    except (TypeError, KeyError, ValueError) as exc:
        raise _config_error(folder, f"{field}.plan", f"not a saved plan ({exc})") from None
    kind, shape = _module_shape(old)
    if layer_plan.strategy != entry["strategy"] or layer_plan.kind != kind or tuple(layer_plan.shape) != shape:
        raise _config_error(folder, f"{field}.plan", (
            f"says a {layer_plan.kind} {tuple(layer_plan.shape)} by {layer_plan.strategy!r}, but the module is a "
            f"{kind} {shape} compressed by {entry['strategy']!r}"))
    for key, value in layer_plan.spec.items():  # shapes and ranks: positive integers, possibly nested in lists
        leaves = value if isinstance(value, list) else [value]
        leaves = [v for leaf in leaves for v in (leaf if isinstance(leaf, list) else [leaf])]
        if not all(type(v) is int and v > 0 for v in leaves):
            raise _config_error(folder, f"{field}.plan.spec.{key}", f"must hold positive integers, got {value!r}")
    try:
        options = strategy_cls.parse_options(dict(entry.get("options", {}) or {}))
        strategy = strategy_cls(config=options)
        new = with_forward_mode(strategy, strategy.build(layer_plan, None, dtype=dtype))
    except Exception as exc:  # noqa: BLE001  any failure here comes from the edited plan
        raise _config_error(folder, f"{field}.plan", f"cannot rebuild the module ({type(exc).__name__}: "
                                                     f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return new


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
    _tie_groups(model, section.get("shared_parameters", []) or [], folder)
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
        quantization = getattr(config, "quantization_config", None)
        if isinstance(quantization, hf.KronCompressConfig) or (
                isinstance(quantization, dict) and quantization.get("quant_method") == hf.QUANT_METHOD):
            delattr(config, "quantization_config")  # a plain model now: no kroncompress checkpoint
    model.__dict__.pop("save_pretrained", None)
    return model


def export_dense(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Load a compressed folder, densify it, and write a plain transformers folder (atomically).

    Files other than the kroncompress ones (e.g. tokenizer files) are copied along.
    """
    source, target = Path(source), Path(output)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output folder {target} already exists; pass overwrite=True or pick another folder")
    model = to_dense(load_compressed(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        for weights in tmp.glob("*.safetensors"):
            match_file_mode(weights, tmp / CONFIG_NAME)
        for item in source.iterdir():
            if item.is_file() and item.name not in FOLDER_FILES and not (tmp / item.name).exists():
                shutil.copy2(item, tmp / item.name)
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
