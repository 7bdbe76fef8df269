"""Surgery: target matching, planning (also on the meta device), compress, tied heads, layerdrop."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import kroncompress as kc
from kroncompress.aliases import ROLES, aliases_for
from kroncompress.layers import FactorizedLinear, KroneckerEmbedding, KroneckerTiedHead
from kroncompress.recipe import Recipe, RecipeError, match_pattern
from kroncompress.surgery import count_params

from conftest import ARCHITECTURES, build_inputs, build_tiny, logits, recipe_of

EXACT_KRONECKER = ("kronecker", {"b_shape": [2, 2], "rank": 4})  # rank = min(m1 n1, m2 n2): exact
FULL_RANK_SVD = ("svd", {"rank": 64})  # every tiny matrix has min(m, n) = 64




# -- near-lossless compression on every architecture --------------------------------------------

LOSSLESS_CASES = [(arch, setting) for arch in ARCHITECTURES for setting in (EXACT_KRONECKER, FULL_RANK_SVD)]


@pytest.mark.parametrize("arch, setting", LOSSLESS_CASES, ids=[f"{a}-{s[0]}" for a, s in LOSSLESS_CASES])
def test_near_lossless_recipe_keeps_outputs(arch, setting):
    strategy, options = setting
    model, inputs = build_tiny(arch), build_inputs(arch)
    reference = logits(model, inputs)
    targets = ["role:attention", "role:mlp"]
    if strategy == "kronecker" and arch != "vit":
        targets.append("role:embedding")
    planned = kc.plan(model, recipe_of((targets, strategy, options)))

    report = kc.compress(model, recipe_of((targets, strategy, options)))

    out = logits(model, inputs)
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4), (out - reference).abs().max()
    assert len(report.rows) == len(planned.rows) >= 8
    assert all(row.rel_error < 1e-5 for row in report.rows)
    for row in report.rows:
        assert isinstance(model.get_submodule(row.name), (FactorizedLinear, KroneckerEmbedding))
    assert report.params_after == count_params(model) == planned.params_after
    assert model.config.kroncompress["modules"].keys() == {row.name for row in report.rows}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_plan_on_meta_device_matches_the_real_model(arch):
    recipe = recipe_of((["role:attention", "role:mlp"], *EXACT_KRONECKER))
    meta_plan = kc.plan(build_tiny(arch, device="meta"), recipe)
    real_plan = kc.plan(build_tiny(arch), recipe)
    assert meta_plan.to_dict() == real_plan.to_dict()
    json.dumps(meta_plan.to_dict())  # JSON-able


# -- GPT-2 small numbers (meta device) -----------------------------------------------------------

GPT2_SMALL_PLANS = [
    ("kn-gpt2", 124_439_808, 83_907_506),
    ("distilgpt2", 124_439_808, 81_912_576),
]


@pytest.mark.parametrize("recipe_name, before, after", GPT2_SMALL_PLANS)
def test_gpt2_small_plans_on_meta(recipe_name, before, after):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(GPT2Config())
    result = kc.plan(model, kc.load_recipe(recipe_name))
    assert (result.params_before, result.params_after) == (before, after)
    assert result.to_dict()["params_after"] == after


def test_kn_gpt2_plan_rows_and_tied_head():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(GPT2Config())
    result = kc.plan(model, "kn-gpt2")
    names = [row.name for row in result.rows]
    assert names[0] == "transformer.wte" and len(names) == 1 + 6 * 4
    assert result.rows[0].tied == [{"name": "lm_head", "as": "head"}]
    assert all(".h.0." not in n and ".h.2." not in n for n in names)
    assert result.rows[0].plan.spec == {"a_shape": [50257, 384], "b_shape": [1, 2], "rank": 1}


# -- tied heads ----------------------------------------------------------------------------------

TIED_CASES = [("gpt2", {}, "transformer.wte", "lm_head"),
              ("llama", {"tie_word_embeddings": True}, "model.embed_tokens", "lm_head"),
              ("bert", {}, "bert.embeddings.word_embeddings", "cls.predictions.decoder")]


@pytest.mark.parametrize("arch, overrides, embedding_name, head_name", TIED_CASES, ids=[c[0] for c in TIED_CASES])
def test_tied_head_follows_the_compressed_embedding(arch, overrides, embedding_name, head_name):
    model, inputs = build_tiny(arch, **overrides), build_inputs(arch)
    assert model.get_submodule(head_name).weight is model.get_submodule(embedding_name).weight
    before = count_params(model)
    report = kc.compress(model, recipe_of(([embedding_name], "kronecker", {"b_shape": [1, 2]})))

    embedding, head = model.get_submodule(embedding_name), model.get_submodule(head_name)
    assert isinstance(head, KroneckerTiedHead) and head.tied_to is embedding
    assert not any(name.startswith(head_name + ".") and not name.endswith("bias") for name, _ in model.named_parameters())
    assert report.params_after == count_params(model) == before - 128 * 64 + (128 * 32 + 2)
    assert model.config.tie_word_embeddings is False
    assert model.config.kroncompress["tied_head"]["head"] == head_name
    model.tie_weights()  # transformers' own tying must leave the factorized head alone
    assert model.get_submodule(head_name) is head
    hidden_logits = logits(model, inputs)
    assert torch.isfinite(hidden_logits).all()


def test_targeting_a_tied_head_alone_is_an_error():
    model = build_tiny("gpt2")
    with pytest.raises(RecipeError, match=r"lm_head shares its weight with transformer\.wte"):
        kc.plan(model, recipe_of((["lm_head"], "svd", {"rank": 8})))


# -- errors for targets --------------------------------------------------------------------------

def test_unmatched_pattern_names_the_closest_modules():
    model = build_tiny("gpt2")
    with pytest.raises(RecipeError) as caught:
        kc.plan(model, recipe_of((["transformer.h.*.attn.c_atn"], "svd", {"rank": 8})))
    message = str(caught.value)
    assert "compress[0].targets[0]" in message and "'transformer.h.*.attn.c_atn' matches no module" in message
    assert "transformer.h.0.attn.c_attn" in message


UNSUPPORTED_CASES = [
    (["transformer.ln_f"], "kronecker", {"ratio": 2}, r"transformer\.ln_f \(LayerNorm\).*linear, conv1d, embedding"),
    (["transformer.h.0"], "svd", {"rank": 8}, r"transformer\.h\.0 \(GPT2Block\).*transformer\.h\.0\.\*"),
    (["transformer.h.0.attn.c_attn"], "layerdrop", {"keep": [0]}, r"Conv1D.*compresses layers modules; target the nn\.ModuleList of blocks"),
]


@pytest.mark.parametrize("targets, strategy, options, message", UNSUPPORTED_CASES, ids=["layernorm", "block", "layerdrop-linear"])
def test_unsupported_module_kind_is_a_clear_error(targets, strategy, options, message):
    with pytest.raises(RecipeError, match=message):
        kc.plan(build_tiny("gpt2"), recipe_of((targets, strategy, options)))


def test_unknown_role_lists_known_roles():
    with pytest.raises(RecipeError, match=r"role 'attn.q' is not defined for model type 'gpt2'; known roles: .*attn.qkv"):
        kc.plan(build_tiny("gpt2"), recipe_of((["role:attn.q"], "svd", {"rank": 8})))


def test_pattern_matching_only_ignored_modules_is_an_error():
    with pytest.raises(RecipeError, match="matches only ignored modules"):
        kc.plan(build_tiny("gpt2"), recipe_of((["transformer.h.1.mlp.*"], "svd", {"rank": 8}), ignore=["transformer.h.1"]))


def test_first_rule_wins_and_says_so():
    model = build_tiny("gpt2")
    result = kc.plan(model, recipe_of((["transformer.h.0.mlp.c_fc"], "svd", {"rank": 8}),
                                      (["transformer.h.*.mlp.c_fc"], "kronecker", {"ratio": 2})))
    rows = {row.name: row for row in result.rows}
    assert rows["transformer.h.0.mlp.c_fc"].strategy == "svd"
    assert "also matched by compress[1]" in rows["transformer.h.0.mlp.c_fc"].to_dict()["note"]
    assert rows["transformer.h.1.mlp.c_fc"].strategy == "kronecker"


def test_overrides_and_ignore_apply_per_module():
    recipe = Recipe.from_dict({"version": 1, "name": "t", "ignore": ["transformer.h.1.attn.c_proj"], "compress": [
        {"targets": ["transformer.h.*.attn.*"], "strategy": "svd", "options": {"rank": 8},
         "overrides": [{"targets": ["*.c_attn"], "options": {"rank": 4}}]}]})
    rows = {row.name: row.plan.spec["rank"] for row in kc.plan(build_tiny("gpt2"), recipe).rows}
    assert rows == {"transformer.h.0.attn.c_attn": 4, "transformer.h.0.attn.c_proj": 8, "transformer.h.1.attn.c_attn": 4}


def test_progress_is_reported_per_module():
    calls = []
    kc.compress(build_tiny("gpt2"), recipe_of((["role:mlp"], "svd", {"rank": 8})), progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert calls[0][2] == "transformer.h.0.mlp.c_fc"


def test_compress_refuses_a_meta_model():
    with pytest.raises(ValueError, match="meta device"):
        kc.compress(build_tiny("gpt2", device="meta"), recipe_of((["role:mlp"], "svd", {"rank": 8})))


# -- aliases -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_role_of_the_architecture_matches_a_module(arch):
    model = build_tiny(arch, device="meta")
    aliases = aliases_for(model)
    assert set(aliases) == set(ROLES[model.config.model_type])
    names = {n: m for n, m in model.named_modules()}
    for role in aliases:
        assert any(match_pattern(f"role:{role}", n, m, aliases) for n, m in names.items()), role
    layers = [n for n, m in names.items() if match_pattern("role:layers", n, m, aliases)]
    assert len(layers) == 1 and isinstance(names[layers[0]], torch.nn.ModuleList)


def test_aliases_work_on_a_bare_base_model():
    from transformers import GPT2Model

    from conftest import tiny_config

    aliases = aliases_for(GPT2Model(tiny_config("gpt2")))
    assert aliases["layers"] == ["h"] and aliases["attn.qkv"] == ["h.*.attn.c_attn"]


# -- layerdrop -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layerdrop_keeps_blocks_and_updates_the_config(arch):
    model = build_tiny(arch, **({"n_layer": 4} if arch == "gpt2" else {"num_hidden_layers": 4}))
    inputs = build_inputs(arch)
    layers_name = aliases_for(model)["layers"][0]
    kept_blocks = [model.get_submodule(layers_name)[i] for i in (0, 2, 3)]
    report = kc.compress(model, recipe_of((["role:layers"], "layerdrop", {"keep": [0, 2, 3]})))

    layers = model.get_submodule(layers_name)
    assert list(layers) == kept_blocks
    assert model.config.num_hidden_layers == 3
    indices = [m.layer_idx for block in layers for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(indices)) == ([0, 1, 2] if arch != "vit" else [])  # ViT blocks keep no index
    assert report.params_after == count_params(model)
    assert report.rows[0].params_before - report.rows[0].params_after == report.params_before - report.params_after
    if arch in ("gpt2", "llama", "opt", "gpt_neox"):  # a KV cache indexes layers by layer_idx
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        assert len(out.past_key_values) == 3
    else:
        assert torch.isfinite(logits(model, inputs)).all()


def test_layerdrop_every_and_bad_indices():
    result = kc.plan(build_tiny("gpt2", n_layer=5), recipe_of((["transformer.h"], "layerdrop", {"every": 2})))
    assert result.rows[0].plan.spec["keep"] == [0, 2, 4]
    with pytest.raises(ValueError, match=r"indices \[7\] do not exist: the model has 2 blocks"):
        kc.plan(build_tiny("gpt2"), recipe_of((["transformer.h"], "layerdrop", {"keep": [0, 7]})))
    with pytest.raises(RecipeError, match="strictly increasing"):
        recipe_of((["transformer.h"], "layerdrop", {"keep": [2, 0]}))
    assert "layerdrop" in kc.list_strategies()


def test_layerdrop_with_factorized_blocks_renumbers_the_saved_plan():
    model = build_tiny("gpt2", n_layer=4)
    recipe = recipe_of((["transformer.h"], "layerdrop", {"keep": [0, 2, 3]}), (["role:mlp"], "svd", {"rank": 8}))
    planned = kc.plan(model, recipe)
    assert planned.skipped == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    report = kc.compress(model, recipe)
    assert report.params_after == count_params(model) == planned.params_after
    saved = model.config.kroncompress["modules"]
    assert sorted(saved) == sorted(f"transformer.h.{i}.mlp.{n}" for i in range(3) for n in ("c_fc", "c_proj"))
    for name in saved:
        assert isinstance(model.get_submodule(name), FactorizedLinear)


# The kroncompress section of config.json as format_version 1 writes it (frozen here, so a change to how
# rules hold their options cannot silently stop load_compressed from reading folders saved before it).
SAVED_SECTION_V1 = {
    "attn_implementation": "eager", "format_version": 1, "kroncompress_version": "0.1.0",
    "modules": {
        "transformer.h.1.mlp.c_fc": {
            "options": {"rank": 4}, "strategy": "svd", "tied": [],
            "plan": {"flops_after": 2560, "flops_before": 32768, "kind": "conv1d", "note": "", "params_after": 1536,
                     "params_before": 16640, "shape": [256, 64], "spec": {"rank": 4}, "strategy": "svd"}},
        "transformer.wte": {
            "options": {"b_shape": [1, 2]}, "strategy": "kronecker", "tied": [{"as": "head", "name": "lm_head"}],
            "plan": {"flops_after": 128, "flops_before": 64, "kind": "embedding", "note": "shape chosen by explicit",
                     "params_after": 4098, "params_before": 8192, "shape": [128, 64],
                     "spec": {"a_shape": [128, 32], "b_shape": [1, 2], "rank": 1}, "strategy": "kronecker"}},
    },
    "params_after": 93186, "params_before": 112384, "shared_parameters": [], "structural": [],
    "tied_head": {"embedding": "transformer.wte", "head": "lm_head", "tie_word_embeddings": True},
    "recipe": {"compress": [{"options": {"b_shape": [1, 2]}, "strategy": "kronecker", "targets": ["transformer.wte"]},
                            {"options": {"rank": 4}, "strategy": "svd", "targets": ["transformer.h.1.mlp.c_fc"]}],
               "description": "", "ignore": ["lm_head"], "name": "t", "version": 1},
}


def test_load_reads_the_saved_plan_format_v1(tmp_path):
    model = build_tiny("gpt2")
    recipe = Recipe.from_dict(SAVED_SECTION_V1["recipe"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kc.compress(model, recipe)
    kc.save_compressed(model, tmp_path / "out")
    config_file = tmp_path / "out" / "config.json"
    config = json.loads(config_file.read_text())
    written = {k: v for k, v in config["kroncompress"].items() if k != "kroncompress_version"}
    assert written == {k: v for k, v in SAVED_SECTION_V1.items() if k != "kroncompress_version"}  # the frozen format
    config["kroncompress"] = SAVED_SECTION_V1
    config_file.write_text(json.dumps(config))
    loaded = kc.load_compressed(tmp_path / "out")
    inputs = build_inputs("gpt2")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
