"""Save/load of compressed folders (exact round trip), atomic writes, strict loading, dense export."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import kroncompress as kc
import kroncompress.io.save as io_save
from kroncompress.layers import KroneckerTiedHead
from kroncompress.surgery import count_params

from conftest import build_inputs, build_tiny, logits, recipe_of




def factor_strategies() -> list[str]:
    """Every registered strategy that decomposes weights (structural ones are tested apart)."""
    return [name for name in kc.list_strategies() if not getattr(kc.get_strategy(name), "structural", False)]


def ratio_options(strategy: str) -> dict:
    fields = {f.name for f in dataclasses.fields(kc.get_strategy(strategy).Config)}
    if "ratio" not in fields:
        pytest.skip(f"strategy {strategy!r} has no ratio option to give it a generic budget")
    return {"ratio": 2, **({"n_iter_max": 3} if "n_iter_max" in fields else {})}  # iterations: speed only


ROUND_TRIP_CASES = [(arch, strategy) for arch in ("gpt2", "llama") for strategy in factor_strategies()]


@pytest.mark.parametrize("arch, strategy", ROUND_TRIP_CASES, ids=[f"{a}-{s}" for a, s in ROUND_TRIP_CASES])
def test_save_load_round_trip_gives_identical_logits(tmp_path, arch, strategy):
    model, inputs = build_tiny(arch), build_inputs(arch)
    # the iterative tensor decompositions are slow even on tiny matrices: fewer targets for them
    targets = ["role:attn.o", "role:mlp"] if strategy in ("kronecker", "svd") else ["role:attn.o"]
    rules = [(targets, strategy, ratio_options(strategy))]
    if "embedding" in kc.get_strategy(strategy).kinds:
        rules.insert(0, (["role:embedding"], strategy, {"ratio": 2}))
    recipe = recipe_of(*rules)
    report = kc.compress(model, recipe)
    expected = logits(model, inputs)

    out = kc.save_compressed(model, tmp_path / "out", recipe=recipe, report=report, metrics={"perplexity": 12.5})
    loaded = kc.load_compressed(out)

    assert torch.equal(logits(loaded, inputs), expected)
    assert not loaded.training
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    assert sorted(p.name for p in out.iterdir()) == [".kroncompress", "README.md", "config.json", "generation_config.json",
                                                     "model.safetensors", "recipe.yaml", "report.json"]
    manifest = json.loads((out / ".kroncompress").read_text())  # what a later overwrite may replace
    assert manifest["files"] == sorted(p.name for p in out.iterdir() if p.name != ".kroncompress")
    section = json.loads((out / "config.json").read_text())["kroncompress"]
    assert section["modules"].keys() == {row.name for row in report.rows}
    assert kc.load_recipe(out / "recipe.yaml") == recipe
    saved_report = json.loads((out / "report.json").read_text())
    assert saved_report["params_after"] == report.params_after and saved_report["metrics"] == {"perplexity": 12.5}
    card = (out / "README.md").read_text()
    assert f"{report.params_before:,} before, {report.params_after:,} after" in card and "perplexity" in card


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


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_layerdrop_only_model_is_a_plain_transformers_folder(tmp_path, arch):
    model, inputs = build_tiny(arch, **({"n_layer": 3} if arch == "gpt2" else {"num_hidden_layers": 3})), build_inputs(arch)
    kc.compress(model, recipe_of((["role:layers"], "layerdrop", {"keep": [0, 2]})))
    expected = logits(model, inputs)

    plain_dir = tmp_path / "plain"
    model.save_pretrained(plain_dir)
    compressed_dir = kc.save_compressed(model, tmp_path / "kc")
    for folder in (plain_dir, compressed_dir):
        reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
        assert reloaded.config.num_hidden_layers == 2 and type(reloaded) is type(model)
        assert torch.equal(logits(reloaded, inputs), expected)
    assert torch.equal(logits(kc.load_compressed(compressed_dir), inputs), expected)
    assert "No module is factorized" in (compressed_dir / "README.md").read_text()
