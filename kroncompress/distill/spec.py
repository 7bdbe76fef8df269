"""Text specs: a recipe section, dict, string or in-memory data normalised to a `TextSpec` (`text_spec`),
the `--data` syntax (`parse_data_arg`) and the cache folder (`default_cache_dir`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from kroncompress.distill.bos import check_bos
from kroncompress.distill.corpora import get_corpus, list_corpora

DEFAULT_SOURCE = "shakespeare"
CACHE_ENV = "KRONCOMPRESS_CACHE"
TEXT_COLUMN = "text"
JSON_SUFFIXES = (".jsonl", ".json")
_EVALUATION_KEYS = {"stride", "max_tokens"}  # PerplexityConfig keys that are not about the text


def default_cache_dir() -> Path:
    """Where tokenised data and tokenizer files are cached: `$KRONCOMPRESS_CACHE` or ~/.cache/kroncompress."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kroncompress").expanduser()


@dataclass(frozen=True)
class TextSpec:
    """Where text comes from, normalised from a recipe section, dict or string (see the module docs)."""

    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    fraction: float = 1.0
    files: tuple[str, ...] = ()
    source: str | None = None
    streaming: bool = False
    block_size: int = 1024
    validation_fraction: float = 0.0
    separator: str = "eos"
    column: str = TEXT_COLUMN
    bos: Any = "auto"  # BOS at the start of every block: "auto", True or False (see kroncompress.distill.bos)
    inline: Any = field(default=None, compare=False, repr=False)  # in-memory data (see `in_memory`)

    @property
    def kind(self) -> str:
        """"inline", "dataset", "files" or "source"."""
        if self.inline is not None:
            return "inline"
        return "dataset" if self.dataset else "files" if self.files else "source"

    def describe(self, split: str | None = None) -> str:
        """A short human-readable name, e.g. `shakespeare (test)` or `wikitext/wikitext-2-raw-v1 (test)`."""
        split = split or self.split
        if self.kind == "inline":
            return f"in-memory {type(self.inline).__name__}"
        if self.kind == "dataset":
            return f"{self.dataset}{'/' + self.config if self.config else ''} ({split})"
        if self.kind == "files":
            return ", ".join(self.files)
        return f"{self.source} ({split})"


_FIELDS = {f.name for f in dataclasses.fields(TextSpec)}


def in_memory(data: Any) -> bool:
    """Whether `data` is in-memory text or tokens rather than a spec: a `datasets.Dataset` /
    `IterableDataset`, a list or tuple of strings, or a tensor of token ids."""
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, (list, tuple)):
        return len(data) > 0 and all(isinstance(item, str) for item in data)
    return type(data).__module__.startswith("datasets.") and hasattr(data, "column_names")


def _check_inline(data: Any, column: str) -> None:
    if isinstance(data, torch.Tensor):
        if data.dim() not in (1, 2) or data.is_floating_point() or data.is_complex():
            raise ValueError(f"data: token ids must be an integer tensor of shape (n, block) or (n,), got "
                             f"{data.dtype} of shape {tuple(data.shape)}")
        return
    columns = getattr(data, "column_names", None)
    if isinstance(columns, Mapping):  # a DatasetDict: {split: columns}
        raise ValueError(f"data: a DatasetDict holds several splits ({', '.join(columns)}); give one, "
                         f"e.g. ds[{next(iter(columns), 'train')!r}]")
    if columns is not None and column not in columns and "input_ids" not in columns:
        raise ValueError(f"data: the dataset has no {column!r} column (columns: {', '.join(columns)}); name the text "
                         f"column, e.g. {{'dataset': ds, 'column': {columns[0]!r}}}")


def model_tokenizer(model: Any, tokenizer: Any = None, *, needed_for: str = "this") -> Any:
    """The tokenizer for an in-memory model: `tokenizer` when given, else the one saved with the model's
    `name_or_path` (a hub id or folder). ValueError saying to pass `tokenizer=` when neither works."""
    if tokenizer is not None:
        return tokenizer
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(name))
        except Exception as error:  # not a folder with a tokenizer, offline hub, ...
            raise ValueError(f"{needed_for} needs a tokenizer: none could be loaded from the model's name_or_path "
                             f"{name!r} ({type(error).__name__}); pass tokenizer=...") from error
    raise ValueError(f"{needed_for} needs a tokenizer and the {type(model).__name__} object names no source "
                     "(name_or_path is empty); pass tokenizer=...")


def text_spec(spec: Any = None, **overrides) -> TextSpec:
    """Normalise a spec (DataConfig, PerplexityConfig, dict, TextSpec, string or None) to a `TextSpec`.

    `overrides` replace fields (e.g. `split="test"`). Raises ValueError naming the field for a bad value.
    """
    if isinstance(spec, TextSpec):
        values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}  # shallow: keeps `inline`
    elif in_memory(spec):
        values = {"inline": spec}
    elif spec is None:
        values = {}
    elif isinstance(spec, str):
        values = parse_data_arg(spec)
    elif isinstance(spec, Mapping):
        values = dict(spec)
    elif dataclasses.is_dataclass(spec):
        values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    else:
        raise ValueError(f"data: cannot read a text spec from {type(spec).__name__}; give a DataConfig, "
                         "PerplexityConfig, dict, string, datasets.Dataset, list of strings or token tensor")
    values.update(overrides)
    if values.get("dataset") is not None and not isinstance(values["dataset"], str):
        if not in_memory(values["dataset"]):
            raise ValueError(f"data: dataset must be a hub name, a datasets.Dataset, a list of strings or a token "
                             f"tensor, got {type(values['dataset']).__name__}")
        values["inline"] = values.pop("dataset")
    unknown = set(values) - _FIELDS - _EVALUATION_KEYS
    if unknown:
        raise ValueError(f"data: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_FIELDS))}")
    values = {k: v for k, v in values.items() if k in _FIELDS and v is not None}
    files = values.get("files") or ()
    values["files"] = (str(files),) if isinstance(files, (str, os.PathLike)) else tuple(str(f) for f in files)
    given = [k for k in ("dataset", "files", "source") if values.get(k)]
    if values.get("inline") is not None:
        given.append("in-memory data")
        _check_inline(values["inline"], values.get("column") or TEXT_COLUMN)
    if len(given) > 1:
        raise ValueError(f"data: gives {' and '.join(given)}; give only one text source: dataset, files or source")
    if not given:
        values["source"] = DEFAULT_SOURCE
    result = TextSpec(**values)
    if result.source:
        get_corpus(result.source)  # unknown name: ValueError listing the known ones
    if not 0 < result.fraction <= 1:
        raise ValueError(f"data: fraction must be in (0, 1], got {result.fraction}; e.g. 0.1 keeps the first 10%")
    if not 0 <= result.validation_fraction < 1:
        raise ValueError(f"data: validation_fraction must be in [0, 1), got {result.validation_fraction}")
    if int(result.block_size) < 1:
        raise ValueError(f"data: block_size must be >= 1, got {result.block_size}")
    check_bos(result.bos)
    return result


def parse_data_arg(text: str) -> dict:
    """Read a command-line `--data` value into spec keys.

    - a packaged corpus name (`shakespeare`) -> `{"source": ...}`;
    - an existing path, a glob (`*`, `?`, `[`) or a name ending in .txt/.jsonl/.json -> `{"files": [...]}`
      (several may be joined with commas);
    - anything else is a hub dataset, `name` or `name:config` (`wikitext:wikitext-103-raw-v1`).
    """
    text = text.strip()
    if text in list_corpora():
        return {"source": text}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all(any(c in p for c in "*?[") or os.path.exists(os.path.expanduser(p))
                     or p.endswith((".txt", ".text", ".md") + JSON_SUFFIXES) for p in parts):
        return {"files": parts}
    name, _, config = text.partition(":")
    return {"dataset": name, **({"config": config} if config else {})}
