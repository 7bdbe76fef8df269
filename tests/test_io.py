"""Save/load details: tied heads, dtypes, atomic writes, strict loading, dense export (the round trip of every
strategy x architecture is tests/test_contract.py)."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import kroncompress as kc
import kroncompress.io.save as io_save
from kroncompress.layers import KroneckerTiedHead
from kroncompress.surgery import count_params

from conftest import build_inputs, build_tiny, logits, recipe_of




TIED_CASES = [("gpt2", {}, "transformer.wte", "lm_head"),
              ("bert", {}, "bert.embeddings.word_embeddings", "cls.predictions.decoder")]


@pytest.mark.parametrize("arch, overrides, embedding_name, head_name", TIED_CASES, ids=["gpt2", "bert"])
def test_tied_head_stays_tied_after_load(tmp_path, arch, overrides, embedding_name, head_name):
    model, inputs = build_tiny(arch, **overrides), build_inputs(arch)
    kc.compress(model, recipe_of(([embedding_name], "kronecker", {"b_shape": [1, 2]}),
                                 (["role:mlp"], "kronecker", {"ratio": 2})))
    loaded = kc.load_compressed(kc.save_compressed(model, tmp_path / "out"))

    head, embedding = loaded.get_submodule(head_name), loaded.get_submodule(embedding_name)
    assert isinstance(head, KroneckerTiedHead) and head.tied_to is embedding
    assert count_params(loaded) == count_params(model)
    if arch == "bert":  # BERT's decoder bias is the same Parameter as cls.predictions.bias
        assert head.bias is loaded.cls.predictions.bias
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_load_in_another_dtype(tmp_path):
    model, inputs = build_tiny("gpt2"), build_inputs("gpt2")
    kc.compress(model, recipe_of((["role:embedding", "role:mlp"], "kronecker", {"ratio": 2})))
    model.to(torch.bfloat16)
    out = kc.save_compressed(model, tmp_path / "bf16")
    loaded = kc.load_compressed(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert {p.dtype for p in kc.load_compressed(out, dtype=torch.float32).parameters()} == {torch.float32}


# -- atomic writes -------------------------------------------------------------------------------

def _crash(*args, **kwargs):
    raise OSError("disk full (simulated)")


def test_crash_mid_save_leaves_no_folder(tmp_path, monkeypatch):
    model = build_tiny("gpt2")
    kc.compress(model, recipe_of((["role:mlp"], "svd", {"rank": 8})))
    monkeypatch.setattr(io_save, "_write_weights", _crash)
    with pytest.raises(OSError, match="simulated"):
        kc.save_compressed(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_crash_during_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    model = build_tiny("gpt2")
    kc.compress(model, recipe_of((["role:mlp"], "svd", {"rank": 8})))
    target = tmp_path / "out"
    kc.save_compressed(model, target)
    old_weights = (target / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        kc.save_compressed(model, target)
    monkeypatch.setattr(io_save, "model_card", _crash)
    with pytest.raises(OSError, match="simulated"):
        kc.save_compressed(model, target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() == old_weights
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.undo()
    kc.save_compressed(build_tiny("gpt2", seed=3), target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() != old_weights
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- strict loading ------------------------------------------------------------------------------

def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = build_tiny("gpt2")
    kc.compress(model, recipe_of((["role:mlp"], "svd", {"rank": 8})))
    out = kc.save_compressed(model, tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["transformer.h.0.mlp.c_fc.u"]
    tensors["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(1)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: transformer\.h\.0\.mlp\.c_fc\.u; unexpected keys: transformer\.h\.0\.mlp\.c_fc\.weight"):
        kc.load_compressed(out)


def test_load_refuses_a_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model.safetensors"):
        kc.load_compressed(tmp_path)


# -- plain transformers folders ------------------------------------------------------------------

DENSE_CASES = [("gpt2", {}), ("llama", {"tie_word_embeddings": True}), ("llama", {})]


@pytest.mark.parametrize("arch, overrides", DENSE_CASES, ids=["gpt2-tied", "llama-tied", "llama-untied"])
def test_dense_export_reloads_with_from_pretrained(tmp_path, arch, overrides):
    model, inputs = build_tiny(arch, **overrides), build_inputs(arch)
    tied = model.config.tie_word_embeddings
    kc.compress(model, recipe_of((["role:embedding"], "kronecker", {"b_shape": [1, 2]}),
                                 (["role:attention"], "svd", {"rank": 16}), (["role:mlp"], "kronecker", {"ratio": 2})))
    compressed_logits = logits(model, inputs)
    source = kc.save_compressed(model, tmp_path / "compressed")

    exported = kc.export_dense(source, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager")
    assert not hasattr(plain.config, "kroncompress") and plain.config.tie_word_embeddings is tied
    assert (plain.lm_head.weight is plain.get_input_embeddings().weight) is tied
    assert torch.allclose(logits(plain, inputs), compressed_logits, atol=1e-5)

    kc.to_dense(model)  # in memory: same numbers, plain modules
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied
    assert not any(type(m).__module__.startswith("kroncompress") for m in model.modules())
    assert count_params(model) == count_params(plain)
    assert torch.allclose(logits(model, inputs), compressed_logits, atol=1e-5)
