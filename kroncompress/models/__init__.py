"""Load a Hugging Face model (and its tokenizer) from a local folder, a config-only folder or a hub id.

    model, info = load_model("path/to/gpt2")          # folder with config.json + weights
    model, info = load_model("path/to/config-only")   # only config.json: built on the meta device
    model, info = load_model("gpt2")                  # hub id (needs network access)
    model, info = load_model("shakespeare-gpt2")      # the packaged demo model (also "demo"), offline

A config-only folder gives a model on the meta device: shapes only, no memory, enough for
`kc.plan`. Errors for bad input are ValueErrors naming the path or id, what is wrong and the fix.

Import every name from `kroncompress.models`; the code lives in submodules by responsibility: `load`
(`load_model`; `info`: `ModelInfo`; folders, config-only folders, hub ids, the demo), `checks` (config.json, weight
files, the loading report, finiteness) and `tokenizer` (which tokenizer a loaded model gets).
"""

from __future__ import annotations

from kroncompress.models.checks import PICKLE_SUFFIXES, check_finite, check_weight_files
from kroncompress.models.load import (
    COMPRESSED_CONFIG_KEY, WEIGHT_FILES, ModelInfo, load_model, parse_dtype,
)
from kroncompress.models.tokenizer import (
    CHECKPOINTS, GPT2_VOCAB, TOKENIZER_FILES, TOKENIZER_HINT, check_tokenizer_fits, require_tokenizer, resolve_tokenizer,
    tokenizer_name, tokenizer_size,
)

# in the order the reference page lists them
__all__ = [
    "WEIGHT_FILES", "COMPRESSED_CONFIG_KEY", "ModelInfo", "load_model", "PICKLE_SUFFIXES", "check_weight_files",
    "check_finite", "TOKENIZER_FILES", "GPT2_VOCAB", "CHECKPOINTS", "require_tokenizer", "TOKENIZER_HINT",
    "check_tokenizer_fits", "resolve_tokenizer", "tokenizer_name", "tokenizer_size", "parse_dtype",
]
