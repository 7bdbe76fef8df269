"""BOS-led blocks: whether every training, evaluation and calibration block opens with the BOS token.

Models trained with a BOS token at the start of every sequence (Llama, Gemma: their tokenizers add it)
score much worse on blocks without one (Gemma 3 270M: perplexity 149.0 instead of 42.1, see
docs/real-models.md), so blocks follow the tokenizer: `bos: auto` (the default) starts every block with
BOS when the tokenizer adds one to what it encodes, and not otherwise (GPT-2's adds none). `bos: true` /
`false` force it. Token ids given as data (a tensor, a tokenised dataset) are used as they are under
`auto`. The BOS is context, never a target.
"""

from __future__ import annotations

from typing import Any

BOS_SETTINGS = ("auto", True, False)


def check_bos(value: Any, where: str = "data") -> Any:
    """`value` when it is a valid `bos` setting (auto, true or false), else ValueError naming `where`.bos."""
    if not any(value is s or (isinstance(value, str) and value == s) for s in BOS_SETTINGS):
        raise ValueError(f"{where}: bos must be auto, true or false, got {value!r}; auto starts every block with "
                         "BOS when the tokenizer adds one")
    return value


def tokenizer_bos(tokenizer) -> int | None:
    """The tokenizer's BOS id when it adds BOS to the text it encodes (Llama, Gemma), else None (GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if len(ids) and ids[0] == bos else None


def block_bos(setting: Any, tokenizer, *, token_ids: bool = False) -> int | None:
    """The id every block starts with (None: blocks are plain slices of the token stream) for a `bos`
    setting; `token_ids`: the data was given as token ids, which `auto` leaves as they are."""
    check_bos(setting)
    if setting is False or (setting == "auto" and token_ids):
        return None
    if setting == "auto":
        return tokenizer_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("data: bos is true, but the tokenizer has no bos_token_id; set bos: auto or false, or give a "
                         "tokenizer with a BOS token")
    return int(bos)
