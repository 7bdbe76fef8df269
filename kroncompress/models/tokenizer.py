"""Which tokenizer a loaded model gets: the folder's, a training checkpoint's run's, GPT-2's BPE for a GPT-2
vocabulary, or one given explicitly; `require_tokenizer` says why there is none (see kroncompress.models)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kroncompress.models.checks import first_line
from kroncompress.models.info import ModelInfo


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
logger = logging.getLogger("kroncompress.models")
GPT2_VOCAB = 50257
CHECKPOINTS = "checkpoints"


def looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, x\\y) is meant as a path."""
    return (
        name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
        or name.endswith(("/", ".json", ".safetensors", ".bin"))
    )


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _vocab_size(model) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        value = getattr(getattr(model, "config", None), "vocab_size", None)
        return int(value) if isinstance(value, int) else None


def fallback_tokenizer(model, folder: Path, note: str) -> tuple[Any, str]:
    """No tokenizer in `folder`: the run's (a checkpoint's output folder), else GPT-2's when the vocabulary
    is GPT-2's, else None with a note saying so."""
    if folder.parent.name == CHECKPOINTS:  # <output>/checkpoints/checkpoint-N: the run's tokenizer
        for run_folder in (folder.parent, folder.parent.parent):
            if has_tokenizer(run_folder):
                tokenizer, problem = tokenizer_in(run_folder)
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
            return None, f"no tokenizer in the folder, and GPT-2's BPE is unavailable: {first_line(exc)}"
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
    from kroncompress.demo import demo_model_path, is_demo_name

    name = os.fspath(source)
    path = Path(name).expanduser()
    if not path.exists() and is_demo_name(name):
        path = demo_model_path()
    if path.exists():
        if not path.is_dir() or not has_tokenizer(path):
            raise ValueError(f"tokenizer {name!r} is not a folder holding tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                             "pass the folder a tokenizer was saved to with save_pretrained(), or a hub id")
        target, cache_only = str(path), {}
    elif looks_like_path(name):
        raise ValueError(f"tokenizer path {name!r} does not exist; pass a folder written by tokenizer.save_pretrained() "
                         "or a Hugging Face hub id such as 'gpt2'")
    else:
        target, cache_only = name, ({} if hub.online() else {"local_files_only": True})
    try:
        return AutoTokenizer.from_pretrained(target, **cache_only)
    except Exception as exc:  # noqa: BLE001  transformers raises many types for a bad tokenizer
        if cache_only:
            raise ValueError(hub.offline_message("tokenizer", name)) from exc
        raise ValueError(f"cannot load the tokenizer {name!r}: {first_line(exc)}; pass a folder written by "
                         "tokenizer.save_pretrained()") from exc


def tokenizer_in(source: Path | str) -> tuple[Any, str]:
    """(tokenizer or None, a note when one was expected but failed to load)."""
    if isinstance(source, Path) and not any((source / f).is_file() for f in TOKENIZER_FILES):
        return None, ""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source), ""
    except Exception as exc:  # noqa: BLE001  a model without a usable tokenizer is still a model
        if isinstance(source, str):
            return None, ""
        return None, f"tokenizer not loaded: {first_line(exc)}"
