"""Load a Hugging Face model (and its tokenizer) from a local folder, a config-only folder or a hub id.

    model, info = load_model("path/to/gpt2")          # folder with config.json + weights
    model, info = load_model("path/to/config-only")   # only config.json: built on the meta device
    model, info = load_model("gpt2")                  # hub id (needs network access)
    model, info = load_model("shakespeare-gpt2")      # the packaged demo model (also "demo"), offline

A config-only folder gives a model on the meta device: shapes only, no memory, enough for
`kc.plan`. Errors for bad input are ValueErrors naming the path or id, what is wrong and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kroncompress.demo import demo_model_path, is_demo_name

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
# The key under which io.save_compressed records the per-module plan in config.json.
COMPRESSED_CONFIG_KEY = "kroncompress"


@dataclass
class ModelInfo:
    """Where a loaded model came from and what it is."""

    name_or_path: str
    source: str  # "local" (folder with weights), "config" (config.json only), "hub", "compressed"
    model_type: str
    model_class: str
    meta: bool = False  # True: parameters live on the meta device (shapes only)
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        text = f"{self.model_class} ({self.model_type}) from {self.source} {self.name_or_path!r}"
        return text + ("; meta: shapes only" if self.meta else "")


def load_model(name_or_path: str | os.PathLike, *, meta_ok: bool = True, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, load_tokenizer: bool = True):
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
    The tokenizer is loaded when the folder (or hub repo) has one, and put in `info.tokenizer`.
    """
    name = os.fspath(name_or_path)
    torch_dtype = _parse_dtype(dtype)
    path = Path(name).expanduser()
    if not path.exists() and is_demo_name(name):  # a folder of that name in the cwd still wins
        path = demo_model_path()
    if path.exists():
        model, info = _load_local(path, name, meta_ok=meta_ok, dtype=torch_dtype)
    elif _looks_like_path(name):
        raise ValueError(
            f"model path {name!r} does not exist; pass an existing folder holding config.json "
            "(and weights, as written by save_pretrained()) or a Hugging Face hub id such as 'gpt2'"
        )
    else:
        model, info = _load_hub(name, dtype=torch_dtype)
    if device is not None and not info.meta:
        model = model.to(device)
    if load_tokenizer and info.tokenizer is None and info.source != "config":
        info.tokenizer, note = _load_tokenizer(path if info.source != "hub" else name)
        if note:
            info.notes.append(note)
    return model, info


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return value


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, x\\y) is meant as a path."""
    return (
        name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
        or name.endswith(("/", ".json", ".safetensors", ".bin"))
    )


def _read_config_dict(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"model folder {str(path)!r} has no config.json; pass a folder written by save_pretrained() "
            "(config.json plus weights), or one holding just config.json to plan on shapes only"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({exc}); fix or regenerate it with save_pretrained()") from exc


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
    config_dict = _read_config_dict(path)
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
        raise ValueError(f"cannot read the model config in {name!r}: {_first_line(exc)}") from exc
    cls = _model_class(config)
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if not has_weights:
        if not meta_ok:
            raise ValueError(
                f"model folder {name!r} holds only config.json, no weights; compressing needs the weights "
                f"(save the model with save_pretrained() there); a config-only folder is enough for planning"
            )
        with torch.device("meta"):
            model = cls.from_config(config)
        info = ModelInfo(name, "config", config.model_type, _class_name(model), meta=True)
        info.notes.append("meta: shapes only (config.json without weights)")
        return model, info
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot load the model weights in {name!r}: {_first_line(exc)}") from exc
    return model, ModelInfo(name, "local", config.model_type, _class_name(model))


def _load_hub(name: str, *, dtype) -> tuple[Any, ModelInfo]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
        cls = _model_class(config)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = cls.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise ValueError(
            f"could not load model {name!r} from the Hugging Face hub ({_first_line(exc)}); this machine may be "
            f"offline or the id may be wrong; no local folder named {name!r} exists either: to use a local model, "
            "pass the folder written by save_pretrained() (e.g. ./my-model)"
        ) from exc
    return model, ModelInfo(name, "hub", config.model_type, _class_name(model))


def _load_tokenizer(source: Path | str) -> tuple[Any, str]:
    """(tokenizer or None, a note when one was expected but failed to load)."""
    if isinstance(source, Path) and not any((source / f).is_file() for f in TOKENIZER_FILES):
        return None, ""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source), ""
    except Exception as exc:  # noqa: BLE001  a model without a usable tokenizer is still a model
        if isinstance(source, str):
            return None, ""
        return None, f"tokenizer not loaded: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
