"""The demo model that ships inside the package: a small GPT-2 trained on Shakespeare, usable offline.

    from kroncompress.models import load_model
    model, info = load_model("shakespeare-gpt2")        # the packaged folder; "demo" works too
    demo_model_path()                                   # Path of kroncompress/demo/shakespeare-gpt2

The folder holds config.json, model.safetensors (fp32, under 10 MB), the byte-level BPE tokenizer files,
TRAINING.md (how it was trained, its held-out perplexity against a unigram baseline) and training.json
(the same numbers). `scripts/train_demo_teacher.py` rebuilds it; see docs/demo.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "shakespeare-gpt2"
DEMO_ALIASES = (DEMO_MODEL_NAME, "demo")
DEMO_MODEL_DIR = Path(__file__).resolve().parent / DEMO_MODEL_NAME
DEMO_CORPUS = "shakespeare"  # the packaged corpus it was trained on (kroncompress.distill.corpora)


def is_demo_name(name: str) -> bool:
    """Whether `name` is one of the short names of the packaged demo model."""
    return str(name) in DEMO_ALIASES


def demo_model_path() -> Path:
    """The packaged demo model's folder; ValueError when the installed package lacks its weights."""
    if not (DEMO_MODEL_DIR / "config.json").is_file() or not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise ValueError(f"model {DEMO_MODEL_NAME!r}: the packaged folder {DEMO_MODEL_DIR} lacks config.json or "
                         "model.safetensors; reinstall kroncompress, or rebuild it with "
                         "`python scripts/train_demo_teacher.py`")
    return DEMO_MODEL_DIR


def demo_training_record() -> dict[str, Any]:
    """The demo model's training record (training.json): command, hardware, losses, held-out perplexities."""
    return json.loads((demo_model_path() / "training.json").read_text(encoding="utf-8"))
