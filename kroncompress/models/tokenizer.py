"""Which tokenizer a loaded model gets: the folder's, a training checkpoint's run's, GPT-2's BPE for a GPT-2
vocabulary, or one given explicitly; `require_tokenizer` says why there is none (see kroncompress.models)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kroncompress.models.checks import _first_line

if TYPE_CHECKING:
    from kroncompress.models.load import ModelInfo

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
logger = logging.getLogger("kroncompress.models")
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


def require_tokenizer(info: ModelInfo, model=None):
    """`info.tokenizer`, or a ValueError (one line) saying why there is none and how to provide one.

    With `model`, a tokenizer with more tokens than the model's vocabulary is refused too (its ids would
    index past the embedding).
    """
    tokenizer = info.tokenizer
    if tokenizer is None:
        why = next((n for n in info.notes if "tokenizer" in n), "the folder has no tokenizer")
        raise ValueError(
            f"model {info.name_or_path!r} has no usable tokenizer ({why}); save the model's tokenizer into the folder "
            "(`tokenizer.save_pretrained(folder)`) and run again"
        )
    vocab = _vocab_size(model) if model is not None else None
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"model {info.name_or_path!r}: its tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
            f"{vocab}; the tokenizer belongs to another model: save the right one into the folder"
        )
    return tokenizer


def _explicit_tokenizer(source: str | os.PathLike):
    from transformers import AutoTokenizer

    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.exists() and not _has_tokenizer(path):
        raise ValueError(f"tokenizer folder {name!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass the "
                         "folder a tokenizer was saved to with save_pretrained()")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
    except Exception as exc:  # noqa: BLE001  transformers raises many types for a bad tokenizer
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
