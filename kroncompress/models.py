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
import logging
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
logger = logging.getLogger(__name__)
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
        info.tokenizer, note = _load_tokenizer(source)
        if info.tokenizer is None and isinstance(source, Path):
            info.tokenizer, note = _fallback_tokenizer(model, source, note)
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
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({_first_line(exc)}); fix or regenerate it with "
                         "save_pretrained()") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(config_file)!r} holds a JSON {type(data).__name__}, not an object; fix or regenerate it "
                         "with save_pretrained()")
    return data


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
            # the Auto classes have from_config; a concrete class named by `architectures` has _from_config
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
        info = ModelInfo(name, "config", config.model_type, _class_name(model), meta=True)
        info.notes.append("meta: shapes only (config.json without weights)")
        return model, info
    check_weight_files(path, name)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        with _quiet_load_report():
            model, loading = cls.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                                 ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot load the model weights in {name!r}: {_first_line(exc)}") from exc
    info = ModelInfo(name, "local", config.model_type, _class_name(model))
    _check_loading_info(loading, name, cls, info)
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
        with _quiet_load_report():
            model, loading = cls.from_pretrained(name, use_safetensors=True, output_loading_info=True,
                                                 ignore_mismatched_sizes=True, **cache_only, **kwargs)
    except OSError as exc:
        if cache_only:
            raise ValueError(hub.offline_message("model", name)) from exc
        raise ValueError(
            f"could not load model {name!r} from the Hugging Face hub ({_first_line(exc)}); the id may be wrong or "
            f"the repo may hold only pickle (.bin) weights, which kroncompress never loads; no local folder named "
            f"{name!r} exists either: to use a local model, pass the folder written by save_pretrained() (e.g. ./my-model)"
        ) from exc
    info = ModelInfo(name, "hub", config.model_type, _class_name(model))
    _check_loading_info(loading, name, cls, info)
    return model, info


# -- load-time checks: weight files, loading report, finiteness ---------------------------------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(path: Path, name: str) -> None:
    """Every safetensors file of the folder is complete (headers only, fast); pickle-only weights are refused.

    A sharded checkpoint's index must name shards that exist. Raises ValueError naming the file.
    """
    from kroncompress.io import check_safetensors

    safetensors = sorted(path.glob("*.safetensors"))
    if not safetensors:
        pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
        shown = ", ".join(pickles[:3]) or "pytorch_model.bin"
        classes = _read_config_dict(path).get("architectures") or ["AutoModelForCausalLM"]
        cls = classes[0] if isinstance(classes, list) and classes and isinstance(classes[0], str) else "AutoModel"
        raise ValueError(
            f"model folder {name!r} holds only pickle weights ({shown}); kroncompress never unpickles files (a pickle "
            f"can run arbitrary code): convert it where you trust the file, with `transformers.{cls}.from_pretrained"
            "(folder).save_pretrained(folder)` (which writes model.safetensors), then load the folder again"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{str(index)!r} is not a valid safetensors index ({_first_line(exc)}); "
                             "re-download or re-save the model") from exc
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ValueError(f"{str(index)!r} names shards that are not in the folder: {', '.join(missing[:4])}; "
                             "re-download or re-save the model")
    for file in safetensors:
        check_safetensors(file)


class _quiet_load_report:
    """Drop transformers' multi-line LOAD REPORT; `_check_loading_info` turns its content into one line.

    A filter, not a higher level: transformers 5 runs (and logs) its tensor-parallel plan check only when
    that logger's level is WARNING or above.
    """

    @staticmethod
    def _keep(record) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    def __enter__(self):
        self.logger = logging.getLogger("transformers.modeling_utils")
        self.logger.addFilter(self._keep)

    def __exit__(self, *exc_info):
        self.logger.removeFilter(self._keep)


def _show(names, limit: int = 4) -> str:
    names = sorted(str(n) for n in names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_loading_info(loading: dict, name: str, cls: type, info: ModelInfo) -> None:
    """Missing or mismatched tensors are an error (transformers would initialise them at random); so are
    unexpected ones, except a task head left out on purpose when no `architectures` names the class."""
    missing = loading.get("missing_keys") or ()
    mismatched = loading.get("mismatched_keys") or ()
    unexpected = loading.get("unexpected_keys") or ()
    if missing:
        raise ValueError(
            f"model {name!r}: the checkpoint lacks {len(missing)} tensor(s) the {cls.__name__} needs: {_show(missing)}; "
            "they would be initialised at random: the weights file is incomplete or belongs to another config; "
            "re-download or re-save the model"
        )
    if mismatched:
        rows = [f"{m[0]} ({tuple(m[1])} in the file, {tuple(m[2])} in the model)"
                if isinstance(m, tuple) and len(m) == 3 else str(m) for m in mismatched]
        raise ValueError(f"model {name!r}: {len(rows)} tensor(s) have the wrong shape for config.json: {_show(rows, 2)}; "
                         "the weights and config.json do not belong together: re-download or re-save the model")
    if unexpected:
        if getattr(cls, "__name__", "") == "AutoModel":
            info.notes.append(f"checkpoint tensors not used by {info.model_class}: {_show(unexpected)}")
            return
        raise ValueError(
            f"model {name!r}: the checkpoint has {len(unexpected)} tensor(s) the {cls.__name__} built from config.json "
            f"does not: {_show(unexpected)}; the weights and config.json do not belong together: re-download or "
            "re-save the model"
        )


def check_finite(model: torch.nn.Module, name: str) -> None:
    """ValueError naming the first parameter or buffer holding NaN or inf (a corrupt checkpoint)."""
    from kroncompress.io import first_nonfinite

    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        tensor, count, total = bad
        raise ValueError(
            f"model {name!r}: tensor {tensor!r} holds NaN or inf values ({count:,} of {total:,}) right after loading; "
            "the checkpoint is corrupt (nothing kroncompress did): re-download or re-save it"
        )


GPT2_VOCAB = 50257
CHECKPOINTS = "checkpoints"


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _vocab_size(model) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        value = getattr(getattr(model, "config", None), "vocab_size", None)
        return int(value) if isinstance(value, int) else None


def _fallback_tokenizer(model, folder: Path, note: str) -> tuple[Any, str]:
    """No tokenizer in `folder`: the run's (a checkpoint's output folder), else GPT-2's when the vocabulary
    is GPT-2's, else None with a note saying so."""
    if folder.parent.name == CHECKPOINTS:  # <output>/checkpoints/checkpoint-N: the run's tokenizer
        for run_folder in (folder.parent, folder.parent.parent):
            if _has_tokenizer(run_folder):
                tokenizer, problem = _load_tokenizer(run_folder)
                if tokenizer is not None:
                    return tokenizer, f"tokenizer: the run's, from {str(run_folder)!r}"
                note = problem or note
    vocab = _vocab_size(model)
    if vocab == GPT2_VOCAB:
        from kroncompress.tokenizers import gpt2_tokenizer

        try:
            tokenizer = gpt2_tokenizer()
            note = f"no tokenizer in {str(folder)!r}: using GPT-2's BPE (the model's vocabulary has its {GPT2_VOCAB} tokens)"
            logger.warning(note)
            return tokenizer, note
        except ValueError as exc:  # the offline BPE files are not installed
            return None, f"no tokenizer in the folder, and GPT-2's BPE is unavailable: {_first_line(exc)}"
    return None, note or (f"no tokenizer in the folder, and the vocabulary ({vocab} tokens) is not GPT-2's "
                          f"({GPT2_VOCAB}), so GPT-2's BPE cannot stand in")


TOKENIZER_HINT = "pass one with --tokenizer PATH_OR_ID (Python: tokenizer=...)"


def require_tokenizer(info: ModelInfo, model=None):
    """`info.tokenizer`, or a ValueError (one line) saying why there is none and how to provide one.

    With `model`, a tokenizer that can produce ids past the model's embedding is refused too
    (`check_tokenizer_fits`).
    """
    tokenizer = info.tokenizer
    if tokenizer is None:
        why = next((n for n in info.notes if "tokenizer" in n), "the folder has no tokenizer")
        raise ValueError(
            f"model {info.name_or_path!r} has no usable tokenizer ({why}); {TOKENIZER_HINT}, or save the model's "
            "tokenizer into the folder (`tokenizer.save_pretrained(folder)`)"
        )
    if model is not None:
        check_tokenizer_fits(tokenizer, model, info.name_or_path)
    return tokenizer


def tokenizer_size(tokenizer) -> int:
    """How many embedding rows the tokenizer's ids need: its largest id (added tokens included) plus one."""
    try:
        vocab = tokenizer.get_vocab()
        if vocab:
            return max(int(i) for i in vocab.values()) + 1
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        pass
    return len(tokenizer)


def tokenizer_name(tokenizer) -> str:
    """Where a tokenizer came from (its `name_or_path`), else its class."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_tokenizer_fits(tokenizer, model, model_name: Any = None) -> None:
    """ValueError naming both when `tokenizer` can produce an id the model has no embedding row for.

    A tokenizer smaller than the embedding is fine (checkpoints often pad their vocabulary); a model whose
    embedding cannot be read is not checked."""
    rows = _vocab_size(model)
    needed = tokenizer_size(tokenizer)
    if rows is None or needed <= rows:
        return
    name = model_name if model_name is not None else (getattr(model, "name_or_path", "") or type(model).__name__)
    raise ValueError(
        f"tokenizer {tokenizer_name(tokenizer)!r} does not fit model {str(name)!r}: the tokenizer has {len(tokenizer)} "
        f"tokens (ids up to {needed - 1}) but the model's vocabulary only {rows} embedding rows; the tokenizer belongs "
        "to another model: pass the model's own tokenizer (--tokenizer PATH_OR_ID, Python: tokenizer=...)"
    )


def resolve_tokenizer(tokenizer):
    """A tokenizer object from a folder or hub id (`_explicit_tokenizer`); an object (or None) is returned as is."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    return _explicit_tokenizer(tokenizer)


def _explicit_tokenizer(source: str | os.PathLike):
    """A tokenizer from a folder written by save_pretrained (a model folder holding one will do), the demo
    name, or a hub id (offline: the local cache only, failing fast)."""
    from transformers import AutoTokenizer

    from kroncompress import hub

    name = os.fspath(source)
    path = Path(name).expanduser()
    if not path.exists() and is_demo_name(name):
        path = demo_model_path()
    if path.exists():
        if not path.is_dir() or not _has_tokenizer(path):
            raise ValueError(f"tokenizer {name!r} is not a folder holding tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                             "pass the folder a tokenizer was saved to with save_pretrained(), or a hub id")
        target, cache_only = str(path), {}
    elif _looks_like_path(name):
        raise ValueError(f"tokenizer path {name!r} does not exist; pass a folder written by tokenizer.save_pretrained() "
                         "or a Hugging Face hub id such as 'gpt2'")
    else:
        target, cache_only = name, ({} if hub.online() else {"local_files_only": True})
    try:
        return AutoTokenizer.from_pretrained(target, **cache_only)
    except Exception as exc:  # noqa: BLE001  transformers raises many types for a bad tokenizer
        if cache_only:
            raise ValueError(hub.offline_message("tokenizer", name)) from exc
        raise ValueError(f"cannot load the tokenizer {name!r}: {_first_line(exc)}; pass a folder written by "
                         "tokenizer.save_pretrained()") from exc


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
