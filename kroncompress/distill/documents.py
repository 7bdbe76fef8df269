"""The documents of a text spec: local files and split folders (checked before any model loads), hub
datasets, packaged corpora and in-memory data, each cut to the spec's `fraction` (`load_text`)."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from kroncompress.distill.corpora import corpus_documents, list_corpora
from kroncompress.distill.spec import JSON_SUFFIXES, TEXT_COLUMN, TextSpec, default_cache_dir, text_spec

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
        inline = inline_kept(s)
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


def inline_kept(s: TextSpec) -> Any:
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


def held_out_split(spec: Any) -> str | None:
    """The split a perplexity is scored on when none is named (`kroncompress eval --data` and the stages of
    `kroncompress compress --data`): "test" where the text has one, else "validation"; None when the text has
    a single split (files outside a split folder, in-memory data) or a hub dataset's splits cannot be listed
    (offline)."""
    s = text_spec(spec)
    if s.kind == "inline":
        return None
    if s.kind == "source":
        return "test"
    if s.kind == "files":
        splits = [folder_splits(f) for f in s.files]
        return next((name for name in ("test", "validation") if splits and all(name in f for f in splits)), None)
    try:
        import datasets

        names = datasets.get_dataset_split_names(s.dataset, s.config)
    except Exception:  # offline or unknown
        return None
    return next((name for name in ("test", "validation") if name in names), None)
