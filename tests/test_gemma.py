"""Gemma 3 (Gemma3ForCausalLM) end to end on a tiny model: roles, the scaled embedding and its tied head,
save / reload / dense export, soft-capping, the bundled recipes, and a whole pipeline run with ILKD."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import kroncompress as kc
from kroncompress.layers import KroneckerEmbedding, KroneckerTiedHead
from kroncompress.recipe import list_recipes

from conftest import build_inputs, build_tiny, logits, recipe_of

EXACT_EMBEDDING = (["role:embedding"], "kronecker", {"b_shape": [2, 2], "rank": 4})  # rank 4 = min(m1 n1, m2 n2)


def _close(out: torch.Tensor, reference: torch.Tensor, terms: int) -> None:
    """Within the float error of `terms`-long sums of the reference's magnitude (dtype-derived)."""
    atol = 4 * terms * torch.finfo(reference.dtype).eps * float(reference.abs().max())
    assert torch.allclose(out, reference, atol=atol, rtol=0), f"max diff {(out - reference).abs().max():.3g} > {atol:.3g}"


@pytest.mark.parametrize("role, count", [("attention", 8), ("attn.q", 2), ("mlp", 6), ("embedding", 1), ("head", 1),
                                         ("layers", 1)])
def test_roles_resolve_on_gemma3_text(role, count):
    model = build_tiny("gemma3")
    assert model.config.model_type == "gemma3_text"  # what gemma-3-270m's config.json carries
    recipe = recipe_of(([f"role:{role}"], "layerdrop" if role == "layers" else "kronecker",
                        {"every": 2} if role == "layers" else {"b_shape": [2, 2], "rank": 1}))
    if role == "head":  # the tied head is reached through the embedding; planning it alone is refused
        with pytest.raises(kc.RecipeError, match="tied"):
            kc.plan(model, recipe)
        return
    assert len(kc.plan(model, recipe).rows) == count


def _tiny_gemma(family: str, **overrides):
    """gemma3 from conftest; Gemma 1 / 2 (their embeddings are *ScaledWordEmbedding too) with the same sizes."""
    if family == "gemma3":
        return build_tiny("gemma3", **overrides)
    import transformers

    config_class = {"gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config}[family]
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, head_dim=16, vocab_size=128, max_position_embeddings=64, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family, softcap", [("gemma3", None), ("gemma3", 3.0), ("gemma2", 3.0), ("gemma", None)])
def test_scaled_embedding_keeps_its_scale_and_the_tied_head_does_not(family, softcap):
    overrides = {"final_logit_softcapping": softcap} if family != "gemma" else {}
    model, inputs = _tiny_gemma(family, **overrides), build_inputs("gemma3")
    assert type(model.model.embed_tokens).__name__.endswith("ScaledWordEmbedding")
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True)
    scale = math.sqrt(model.config.hidden_size)

    kc.compress(model, recipe_of(EXACT_EMBEDDING))

    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, KroneckerEmbedding) and embedding.scale == pytest.approx(scale)
    assert isinstance(head, KroneckerTiedHead) and head.tied_to is embedding
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    _close(out.hidden_states[0], reference.hidden_states[0], 4)  # sqrt(d) * E[t]
    _close(out.logits, reference.logits, model.config.hidden_size)
    if softcap is not None:  # the model's own outputs are capped, and so is what the losses see
        assert out.logits.abs().max() < softcap


def test_scaled_embedding_survives_save_reload_and_dense_export(tmp_path):
    model, inputs = build_tiny("gemma3"), build_inputs("gemma3")
    reference = logits(model, inputs)
    kc.compress(model, recipe_of(EXACT_EMBEDDING, (["role:mlp"], "kronecker", {"b_shape": [2, 2], "rank": 4})))
    folder = kc.save_compressed(model, tmp_path / "tiny-gemma")
    terms = model.config.intermediate_size

    for reloaded in (kc.load_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)):
        assert reloaded.model.embed_tokens.scale == pytest.approx(math.sqrt(model.config.hidden_size))
        assert reloaded.lm_head.tied_to is reloaded.model.embed_tokens
        _close(logits(reloaded, inputs), reference, terms)

    dense = kc.to_dense(kc.load_compressed(folder))
    _close(logits(dense, inputs), reference, terms)
    dense.save_pretrained(tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # Gemma's own scaled embedding class
    assert type(plain.model.embed_tokens).__name__ == "Gemma3TextScaledWordEmbedding"
    _close(logits(plain, inputs), reference, terms)


ROLE_RECIPES = sorted(name for name, _ in list_recipes() if "gemma" in name or name in ("kron-llama", "kron-task", "svd-task",
                                                                                     "layerdrop-task"))


@pytest.mark.parametrize("name", ROLE_RECIPES)
def test_bundled_role_recipes_plan_on_tiny_gemma(name):
    model = build_tiny("gemma3")
    planned = kc.plan(model, name)
    assert planned.rows and planned.params_after < planned.params_before
    assert not any(row.name.endswith("embed_tokens") for row in planned.rows)  # every Gemma recipe keeps it dense


def test_gemma_recipes_cover_kronecker_svd_and_layerdrop():
    assert {"kron-gemma", "svd-gemma", "layerdrop-gemma"} <= set(ROLE_RECIPES)


@pytest.fixture
def tiny_gemma_folder(tmp_path):
    """A tiny Gemma 3 with the byte tokenizer (257 tokens) and a split folder of JSON lines (train / validation)."""
    import random

    from kroncompress.tokenizers import byte_tokenizer

    model = build_tiny("gemma3", vocab_size=257, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    model.config._attn_implementation = "sdpa"  # as from_pretrained gives it: ILKD must switch to eager itself
    folder = tmp_path / "tiny-gemma"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    data = tmp_path / "english"
    data.mkdir()
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    for split, count in (("train", 60), ("validation", 12)):
        rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 400))), "source": "test"} for _ in range(count)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data


@pytest.mark.parametrize("recipe", ["kron-gemma", "layerdrop-gemma", "budget-gemma"])
def test_pipeline_on_tiny_gemma_with_calibration_ilkd_and_reload(recipe, tiny_gemma_folder, tmp_path):
    from kroncompress.pipeline import run_pipeline

    folder, data = tiny_gemma_folder
    output = tmp_path / "run"
    report = run_pipeline(folder, recipe, output, data=str(data), max_steps=2, progress=False, measure_speed=False,
                          cache_dir=tmp_path / "cache")

    assert report["params_after"] < report["params_before"]
    assert report["distill"]["steps"] == 2
    losses = report["distill"]["loss_history"][-1]
    assert {"attention_kl", "hidden_mse", "logits_kl", "ce"} <= set(losses)  # attention maps came back (eager)
    stages = report["perplexity"]
    assert stages["teacher"]["data"] == f"{data} (validation)"  # the folder's held-out split, as `eval --data` scores it
    assert stages["teacher"]["tokens"] == stages["distilled"]["tokens"] <= 16384  # the recipe's max_tokens
    reloaded = kc.load_compressed(output)
    inputs = {"input_ids": torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))}
    assert torch.isfinite(logits(reloaded, inputs)).all()
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_after"]


def test_multimodal_gemma3_roles_reach_its_language_model():
    """Gemma3ForConditionalGeneration (model_type gemma3) keeps the decoder under model.language_model."""
    import transformers

    from conftest import tiny_config

    config = transformers.Gemma3Config(text_config=tiny_config("gemma3").to_dict(), mm_tokens_per_image=4,
                                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, image_size=28, patch_size=14))
    with torch.device("meta"):
        model = transformers.Gemma3ForConditionalGeneration(config)
    planned = kc.plan(model, recipe_of((["role:attention", "role:mlp"], "kronecker", {"b_shape": [2, 2], "rank": 1})))
    assert len(planned.rows) == 14
    assert all(row.name.startswith("model.language_model.layers.") for row in planned.rows)  # not the vision tower
