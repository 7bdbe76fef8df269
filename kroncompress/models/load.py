"""`load_model`: a model (and its tokenizer) from a local folder, a config-only folder (meta device), a
compressed folder, the packaged demo model or a hub id (see kroncompress.models)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kroncompress.demo import demo_model_path, is_demo_name
from kroncompress.models.info import ModelInfo
from kroncompress.models.checks import (
    check_finite, check_loading_info, check_weight_files, first_line, quiet_load_report, read_config_dict,
)
from kroncompress.models.tokenizer import (
    check_tokenizer_fits, fallback_tokenizer, looks_like_path, resolve_tokenizer, tokenizer_in, tokenizer_name,
)


WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
# The key under which io.save_compressed records the per-module plan in config.json.
COMPRESSED_CONFIG_KEY = "kroncompress"


def load_model(name_or_path: str | os.PathLike, *, meta_ok: bool = True, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, load_tokenizer: bool = True,
               tokenizer: str | os.PathLike | None = None):
    """Load a model and return `(model, ModelInfo)`.

    - a local folder with config.json and weights: `from_pretrained` with the class its config names
      (`architectures`), else AutoModelForCausalLM when the model type has a causal LM head, else AutoModel
      (encoders such as BERT or ViT);
    - a local folder with only config.json: the same class built from the config on the meta device
      (`info.meta` is True; refused with a ValueError when `meta_ok=False`);
    - a folder saved by `kc.save_compressed`: delegated to `kc.load_compressed`;
    - "shakespeare-gpt2" (or "demo"): the small GPT-2 packaged with kroncompress (`kroncompress.demo`),
      when no folder of that name exists;
    - anything else: a hub id, loaded with `from_pretrained` (needs network access).

    `dtype` is a torch dtype or its name ("float32", "bfloat16", "auto"); `device` moves the loaded model.
    Only safetensors weights are read (a folder with only pickle `.bin` weights is refused, never unpickled);
    a truncated weights file, missing, unexpected or mismatched tensors, or NaN/inf weights raise a ValueError
    naming the file or tensor.

    The tokenizer is loaded when the folder (or hub repo) has one, and put in `info.tokenizer`. A training
    checkpoint (`<output>/checkpoints/checkpoint-N`) gets the run's, from `checkpoints/` or `<output>`. A
    folder without one whose vocabulary is GPT-2's (50257 tokens) gets GPT-2's BPE
    (`kroncompress.tokenizers.gpt2_tokenizer`), with a warning and a note in `info.notes`; otherwise
    `info.tokenizer` is None and `require_tokenizer(info)` says why and what to do. `tokenizer` (a folder or
    hub id, or a tokenizer object) overrides all of this; it must fit the model's embedding
    (`check_tokenizer_fits`).
    """
    name = os.fspath(name_or_path)
    torch_dtype = parse_dtype(dtype)
    path = Path(name).expanduser()
    if not path.exists() and is_demo_name(name):  # a folder of that name in the cwd still wins
        path = demo_model_path()
    if path.exists():
        model, info = _load_local(path, name, meta_ok=meta_ok, dtype=torch_dtype)
    elif looks_like_path(name):
        raise ValueError(
            f"model path {name!r} does not exist; pass an existing folder holding config.json "
            "(and weights, as written by save_pretrained()) or a Hugging Face hub id such as 'gpt2'"
        )
    else:
        model, info = _load_hub(name, dtype=torch_dtype)
    if not info.meta:
        check_finite(model, name)
    if device is not None and not info.meta:
        model = model.to(device)
    if tokenizer is not None:  # given explicitly: it wins, must load and must fit the embedding
        info.tokenizer = resolve_tokenizer(tokenizer)
        check_tokenizer_fits(info.tokenizer, model, name)
        info.notes.append(f"tokenizer: {tokenizer_name(info.tokenizer)!r}")
    elif load_tokenizer and info.tokenizer is None and info.source != "config":
        source = path if info.source != "hub" else name
        info.tokenizer, note = tokenizer_in(source)
        if info.tokenizer is None and isinstance(source, Path):
            info.tokenizer, note = fallback_tokenizer(model, source, note)
        if note:
            info.notes.append(note)
    return model, info


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return value


def _model_class(config) -> type:
    """The class named by config.architectures, else a causal LM when the type is one, else AutoModel.

    Encoder families (BERT, RoBERTa, ...) also have a causal-LM head class in transformers; without
    `is_decoder` they load as the bare encoder (AutoModel), like ViT and other non-LM models.
    """
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    model_type = config.model_type
    is_encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not is_encoder:
        return AutoModelForCausalLM
    return AutoModel


def _class_name(model) -> str:
    return type(model).__name__


def _load_local(path: Path, name: str, *, meta_ok: bool, dtype) -> tuple[Any, ModelInfo]:
    from transformers import AutoConfig

    if not path.is_dir():
        raise ValueError(f"model path {name!r} is a file; pass the folder that holds config.json and the weights")
    config_dict = read_config_dict(path)
    if COMPRESSED_CONFIG_KEY in config_dict:
        from kroncompress.io import load_compressed

        model = load_compressed(path)
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        info = ModelInfo(name, "compressed", config_dict.get("model_type", "?"), _class_name(model))
        return model, info
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"cannot read the model config in {name!r}: {first_line(exc)}") from exc
    cls = _model_class(config)
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if not has_weights:
        if not meta_ok:
            raise ValueError(
                f"model folder {name!r} holds only config.json, no weights; compressing needs the weights "
                f"(save the model with save_pretrained() there); a config-only folder is enough for planning"
            )
        with torch.device("meta"):
            # the Auto classes have from_config; a concrete class named by `architectures` has _from_config
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
        info = ModelInfo(name, "config", config.model_type, _class_name(model), meta=True)
        info.notes.append("meta: shapes only (config.json without weights)")
        return model, info
    check_weight_files(path, name)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        with quiet_load_report():
            model, loading = cls.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                                 ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot load the model weights in {name!r}: {first_line(exc)}") from exc
    info = ModelInfo(name, "local", config.model_type, _class_name(model))
    check_loading_info(loading, name, cls, info)
    return model, info


def _load_hub(name: str, *, dtype) -> tuple[Any, ModelInfo]:
    from transformers import AutoConfig

    from kroncompress import hub

    # offline: only the local cache, no retries (a hub id then fails in milliseconds, not ~30 s)
    cache_only = {} if hub.online() else {"local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(name, **cache_only)
        cls = _model_class(config)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        with quiet_load_report():
            model, loading = cls.from_pretrained(name, use_safetensors=True, output_loading_info=True,
                                                 ignore_mismatched_sizes=True, **cache_only, **kwargs)
    except OSError as exc:
        if cache_only:
            raise ValueError(hub.offline_message("model", name)) from exc
        raise ValueError(
            f"could not load model {name!r} from the Hugging Face hub ({first_line(exc)}); the id may be wrong or "
            f"the repo may hold only pickle (.bin) weights, which kroncompress never loads; no local folder named "
            f"{name!r} exists either: to use a local model, pass the folder written by save_pretrained() (e.g. ./my-model)"
        ) from exc
    info = ModelInfo(name, "hub", config.model_type, _class_name(model))
    check_loading_info(loading, name, cls, info)
    return model, info
