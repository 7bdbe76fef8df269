"""Shared fixtures: tiny models of several architectures, built offline from local configs.

    def test_x(tiny_model, tiny_inputs):
        model = tiny_model("gpt2")                 # eager attention, eval mode, seeded weights
        logits = model(**tiny_inputs("gpt2")).logits

All hidden sizes are 64 and all intermediate sizes 128, so one set of explicit factor shapes fits every
matrix (b_shape [2, 2] with rank 4 reproduces any of them exactly).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

# The suite runs as `pytest -n 2` on 2 cores: one intra-op thread per worker avoids oversubscription,
# which made tiny forwards ~100x slower on a loaded machine. KRONCOMPRESS_TEST_THREADS=N runs it with N
# threads instead (results must not depend on it: tolerances are derived from the dtype, not the machine).
torch.set_num_threads(int(os.environ.get("KRONCOMPRESS_TEST_THREADS", "1")))

ARCHITECTURES = ("gpt2", "llama", "bert", "opt", "gpt_neox", "vit", "gemma3")
VOCAB = 128
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny config of `arch` (see ARCHITECTURES) with eager attention; `overrides` replace fields."""
    if arch == "gpt2":
        kwargs = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
        config = transformers.GPT2Config(**{**kwargs, **overrides})
    elif arch == "llama":
        kwargs = dict(_SMALL, num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
        config = transformers.LlamaConfig(**{**kwargs, **overrides})
    elif arch == "bert":
        kwargs = dict(_SMALL, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
        config = transformers.BertConfig(**{**kwargs, **overrides})
    elif arch == "opt":
        kwargs = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                      max_position_embeddings=64, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)
        config = transformers.OPTConfig(**{**kwargs, **overrides})
    elif arch == "gpt_neox":
        kwargs = dict(_SMALL, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
        config = transformers.GPTNeoXConfig(**{**kwargs, **overrides})
    elif arch == "gemma3":  # Gemma3ForCausalLM: scaled embedding, tied head, q/k norms, sliding + full attention
        kwargs = dict(_SMALL, num_key_value_heads=4, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                      sliding_window=4, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
        kwargs = {**kwargs, **overrides}
        kwargs.setdefault("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention"
                                          for i in range(kwargs["num_hidden_layers"])])
        config = transformers.Gemma3TextConfig(**kwargs)
    elif arch == "vit":
        kwargs = dict(_SMALL, image_size=32, patch_size=8, num_labels=3)
        config = transformers.ViTConfig(**{**kwargs, **overrides})
    else:
        raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(ARCHITECTURES)}")
    config._attn_implementation = "eager"
    return config


def build_tiny(arch: str, seed: int = 0, device: str | None = None, **overrides) -> torch.nn.Module:
    """A tiny model with a task head (causal LM, masked LM for BERT, image classification for ViT).

    device="meta" builds it without weights (for planning).
    """
    config = tiny_config(arch, **overrides)
    model_class = {"bert": transformers.BertForMaskedLM, "vit": transformers.ViTForImageClassification}.get(
        arch, transformers.AutoModelForCausalLM)
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            model = model_class.from_config(config) if model_class is transformers.AutoModelForCausalLM else model_class(config)
    else:
        model = model_class.from_config(config) if model_class is transformers.AutoModelForCausalLM else model_class(config)
    return model.eval()


def build_inputs(arch: str, batch: int = 2, length: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Model inputs for `arch`: token ids (1..VOCAB-1) or, for ViT, pixel values."""
    generator = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}
    return {"input_ids": torch.randint(2, VOCAB, (batch, length), generator=generator)}


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(arch, seed=0, device=None, **config_overrides) -> model in eval mode."""
    return build_tiny


@pytest.fixture
def tiny_inputs():
    """Factory: tiny_inputs(arch, batch=2, length=8) -> dict of model inputs."""
    return build_inputs


@pytest.fixture
def tiny_config_of():
    """Factory: tiny_config_of(arch, **overrides) -> config (eager attention)."""
    return tiny_config


def recipe_of(*rules, ignore=()):
    """Recipe from (targets, strategy, options) triples."""
    from kroncompress.recipe import Recipe

    compress = [{"targets": list(t), "strategy": s, "options": dict(o)} for t, s, o in rules]
    return Recipe.from_dict({"version": 1, "name": "test", "compress": compress, "ignore": list(ignore)})


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCH_WORDS = "the king queen lord my thy good sir love night day hath doth come go speak".split()


def assert_reloads(model, folder) -> None:
    """Save `model` with kc.save_compressed into `folder` and check kc.load_compressed gives identical logits."""
    import kroncompress as kc

    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    kc.save_compressed(model, folder)
    with torch.no_grad():
        assert torch.equal(kc.load_compressed(folder)(input_ids=inputs).logits, expected)


def import_benchmark(name: str):
    """A script of benchmarks/ as a module; benchmarks/ stays on sys.path (they import siblings by bare name)."""
    import importlib

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 6-block GPT-2 with a byte-level tokenizer, and a text file to distil, calibrate and score on."""
    import random

    from kroncompress.tokenizers import byte_tokenizer

    root = tmp_path_factory.mktemp("bench")
    config = transformers.GPT2Config(n_layer=6, n_embd=32, n_head=2, vocab_size=257, n_positions=64,
                                     bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "tiny")
    byte_tokenizer().save_pretrained(root / "tiny")
    rng = random.Random(0)
    text = root / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(BENCH_WORDS) for _ in range(12)) + "." for _ in range(150)))
    return root / "tiny", text
