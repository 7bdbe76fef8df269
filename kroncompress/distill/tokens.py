"""Documents to token ids: long documents cut where the tokenizer splits anyway, EOS between documents, and
the token streams cached on disk as safetensors, keyed by spec, split and tokenizer (`token_stream`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from kroncompress.distill.corpora import get_corpus
from kroncompress.distill.documents import inline_kept, load_text, resolve_files
from kroncompress.distill.spec import TextSpec, default_cache_dir, text_spec

logger = logging.getLogger("kroncompress.distill.data")  # the name it logged under before the split

CACHE_FORMAT = 1  # bump when the stored token streams change meaning
CHUNK_CHARS = 1 << 20  # longer documents are cut (at safe points) before tokenising
_BATCH_DOCS, _BATCH_CHARS = 512, 4 << 20


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
        inline = inline_kept(s)
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
