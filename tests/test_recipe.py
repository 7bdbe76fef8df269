"""Recipes: bundled recipes load and round-trip; bad recipes fail with the YAML path and the fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from torch import nn

from kroncompress import list_strategies
from kroncompress.recipe import (
    DistillConfig, Recipe, RecipeError, list_recipes, load_recipe, match_pattern, parse_yaml,
)
from kroncompress.strategies import get_strategy

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
BUNDLED = ["budget-gemma", "budget-task", "distilgpt2", "kn-gpt2", "kn-gpt2-mlp", "kron-bert", "kron-gemma", "kron-llama", "kron-task", "layerdrop-gemma",
           "layerdrop-task", "svd-gemma", "svd-gpt2", "svd-task", "tt-gpt2", "tucker-gpt2"]


def skip_unless_strategies_registered(name: str) -> None:
    """Some bundled recipes use strategies that land separately (tucker, tt, layerdrop)."""
    data = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    missing = sorted({rule["strategy"] for rule in data["compress"]} - set(list_strategies()))
    if missing:
        pytest.skip(f"strategy {', '.join(missing)} not registered yet")


# -- bundled recipes -----------------------------------------------------------------------------

def test_list_recipes_names_every_bundled_file_with_a_one_line_description():
    listed = dict(list_recipes())
    assert sorted(listed) == BUNDLED
    for name, description in listed.items():
        assert description and "\n" not in description, name


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("spelling", ["bare", "yaml", "path"])
def test_bundled_recipe_loads_by_name_and_by_path(name, spelling):
    skip_unless_strategies_registered(name)
    ref = {"bare": name, "yaml": f"{name}.yaml", "path": str(RECIPES_DIR / f"{name}.yaml")}[spelling]
    recipe = load_recipe(ref)
    assert recipe.name == name and recipe.version == 1 and recipe.compress
    for rule in recipe.compress:
        get_strategy(rule.strategy).parse_options(rule.options)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_round_trips_through_yaml(name):
    skip_unless_strategies_registered(name)
    recipe = load_recipe(name)
    again = Recipe.from_dict(yaml.safe_load(recipe.to_yaml()), source="again")
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()


def test_a_path_object_and_a_local_file_load(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("version: 1\nname: mine\ncompress:\n  - {targets: ['*.c_fc'], strategy: svd, options: {ratio: 2}}\n")
    recipe = load_recipe(path)
    assert recipe.name == "mine" and recipe.description == "" and recipe.distill is None
    assert recipe.source == str(path)


def test_an_edited_dict_loads_and_is_validated():
    data = load_recipe("kn-gpt2").to_dict()
    data["compress"][1]["options"] = {"b_shape": [1, 4]}
    recipe = load_recipe(data)
    assert recipe.compress[1].options == {"b_shape": [1, 4]} and recipe.name == "kn-gpt2"
    data["compress"][1]["options"] = {"b_shap": [1, 4]}
    with pytest.raises(RecipeError, match="b_shape"):
        load_recipe(data)


# GPT-2 small, as (name, (out, in), kind, bias): every compressible matrix. Lets the tests check the
# recipes' parameter budgets with the strategies' own plan(), without building a 124M model.
GPT2_SMALL_PARAMS = 124_439_808


def gpt2_small_modules():
    yield "transformer.wte", (50257, 768), "embedding", False
    for block in range(12):
        for suffix, shape in [("attn.c_attn", (2304, 768)), ("attn.c_proj", (768, 768)),
                              ("mlp.c_fc", (3072, 768)), ("mlp.c_proj", (768, 3072))]:
            yield f"transformer.h.{block}.{suffix}", shape, "conv1d", True


def planned_params(recipe: Recipe) -> int:
    total = GPT2_SMALL_PARAMS
    for name, shape, kind, bias in gpt2_small_modules():
        rule = recipe.rule_for(name)
        if rule is not None:
            strategy = get_strategy(rule.strategy)(**rule.options_for(name))
            plan = strategy.plan(shape, kind, bias=bias)
            total -= plan.params_before - plan.params_after
    return total


def test_kn_gpt2_plans_gpt2_small_to_the_papers_count():
    recipe = load_recipe("kn-gpt2")
    assert planned_params(recipe) == 83_907_506
    assert recipe.is_ignored("lm_head")
    assert recipe.rule_for("transformer.h.0.attn.c_attn") is None
    assert recipe.rule_for("transformer.h.11.mlp.c_proj") is recipe.compress[1]


@pytest.mark.parametrize("name", ["svd-gpt2", "tucker-gpt2", "tt-gpt2"])
def test_baselines_match_the_kn_gpt2_budget_within_one_percent(name):
    skip_unless_strategies_registered(name)
    baseline, kn = planned_params(load_recipe(name)), planned_params(load_recipe("kn-gpt2"))
    assert abs(baseline - kn) / kn < 0.01, (baseline, kn)


# -- bad recipes ---------------------------------------------------------------------------------

GOOD = {
    "version": 1, "name": "t", "description": "test",
    "compress": [
        {"targets": ["transformer.wte"], "strategy": "kronecker", "options": {"b_shape": [1, 2]}},
        {"targets": ["re:.*mlp.*"], "strategy": "kronecker", "options": {"ratio": 2},
         "overrides": [{"targets": ["*.h.0.*"], "options": {"ratio": 4}}]},
    ],
    "ignore": ["lm_head"],
    "distill": {"losses": {"ce": 1.0, "logits_kl": {"weight": 0.5, "temperature": 2.0}},
                "data": {"source": "shakespeare", "fraction": 0.5, "block_size": 64},
                "train": {"lr": 1e-3, "schedule": "linear", "max_steps": 10}},
    "evaluate": {"perplexity": {"source": "shakespeare", "block_size": 64, "stride": 32}},
}


def with_change(path: str, value, delete: bool = False) -> dict:
    """GOOD with one value set (or deleted) at a dotted path; list indices as [i]."""
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
    node = data
    for key in keys[:-1]:
        node = node[key]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


def test_the_good_recipe_is_valid():
    recipe = Recipe.from_dict(GOOD)
    assert isinstance(recipe.distill, DistillConfig)
    assert recipe.distill.losses.hidden_mse == 1.0  # ILKD defaults fill what is not given
    assert recipe.distill.train.lr == 1e-3 and recipe.distill.data.split == "train"
    assert recipe.evaluate.perplexity.stride == 32


BAD = [
    # (change at path, value, expected fragments of the message)
    ("compress[1].options.ratio", 1, ["compress[1].options.ratio", "> 1"]),
    ("compress[1].options.ratio", 0.5, ["compress[1].options.ratio", "> 1"]),
    ("compress[1].options.rank", "many", ["compress[1].options.rank", "positive int"]),
    ("compress[1].options.ratoi", 2, ["compress[1].options.ratoi", "did you mean 'ratio'"]),
    ("compress[1].overrides[0].options.ratio", 0, ["compress[1].overrides[0].options.ratio", "> 1"]),
    ("compress[1].strategy", "kroneker", ["compress[1].strategy", "did you mean 'kronecker'"]),
    ("compress[1].strategy", 3, ["compress[1].strategy", "expected a string"]),
    ("compress[0].targets", [], ["compress[0].targets", "at least one"]),
    ("compress[0].targets", [3], ["compress[0].targets[0]", "non-empty string"]),
    ("compress[0].targets", ["re:(unclosed"], ["compress[0].targets[0]", "invalid regular expression"]),
    ("compress[0].targets", ["role:"], ["compress[0].targets[0]", "role:<name>"]),
    ("compress[0].targest", ["x"], ["compress[0].targest", "did you mean 'targets'"]),
    ("compress[0].options", [1, 2], ["compress[0].options", "expected a mapping"]),
    ("compress[1].overrides", {"targets": ["x"]}, ["compress[1].overrides", "expected a list"]),
    ("compress[1].overrides[0].option", {}, ["compress[1].overrides[0].option", "did you mean 'options'"]),
    ("compress", [], ["compress", "non-empty list"]),
    ("compres", [], ["compres", "did you mean 'compress'"]),
    ("version", 2, ["version", "unsupported recipe version 2", "version: 1"]),
    ("version", "1", ["version", "expected an integer"]),
    ("name", ["x"], ["name", "expected a string"]),
    ("ignore", [None], ["ignore[0]", "non-empty string"]),
    ("distill.losses.ce", -1, ["distill.losses.ce", ">= 0"]),
    ("distill.losses.ce", "high", ["distill.losses.ce", "expected"]),
    ("distill.losses.hiden_mse", 1.0, ["distill.losses.hiden_mse", "did you mean 'hidden_mse'"]),
    ("distill.losses.logits_kl", {"weight": 1, "temprature": 2}, ["distill.losses.logits_kl.temprature", "did you mean 'temperature'"]),
    ("distill.losses.logits_kl", {"weight": 1, "temperature": 0}, ["distill.losses.logits_kl.temperature", "> 0"]),
    ("distill.losses", {"ce": 0, "hidden_mse": 0, "attention_kl": 0, "embedding_mse": 0}, ["distill.losses", "all loss weights are zero"]),
    ("distill.data.fraction", 1.5, ["distill.data.fraction", "(0, 1]"]),
    ("distill.data.fraction", 0, ["distill.data.fraction", "(0, 1]"]),
    ("distill.data.validation_fraction", 1.0, ["distill.data.validation_fraction", "[0, 1)"]),
    ("distill.data.block_size", 0, ["distill.data.block_size", ">= 1"]),
    ("distill.data.streaming", "yes", ["distill.data.streaming", "true/false"]),
    ("distill.data.dataset", "openwebtext", ["distill.data", "only one text source"]),
    ("distill.data.files", "*.txt", ["distill.data", "only one text source"]),
    ("distill.train.schedule", "cosin", ["distill.train.schedule", "cosine, linear, constant"]),
    ("distill.train.lr", 0, ["distill.train.lr", "> 0"]),
    ("distill.train.batch_size", 2.5, ["distill.train.batch_size", "expected an integer"]),
    ("distill.train.bf16", 1, ["distill.train.bf16", "true/false"]),
    ("distill.train.learning_rate", 1e-3, ["distill.train.learning_rate", "unknown key"]),
    ("distill.layer_map", [0, -1], ["distill.layer_map[1]", ">= 0"]),
    ("distill.teachr", "original", ["distill.teachr", "did you mean 'teacher'"]),
    ("evaluate.perplexity.stride", 128, ["evaluate.perplexity.stride", "exceeds block_size"]),
    ("evaluate.perplexity.strid", 8, ["evaluate.perplexity.strid", "did you mean 'stride'"]),
    ("evaluate.perplexty", {}, ["evaluate.perplexty", "did you mean 'perplexity'"]),
    ("evaluate.ppl", {}, ["evaluate.ppl", "allowed keys: perplexity"]),
]


@pytest.mark.parametrize("path, value, expected", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_value_names_the_yaml_path_and_the_fix(path, value, expected):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(with_change(path, value), source="bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml: ")
    for fragment in expected:
        assert fragment in message, message
    assert "; " in message, message  # what is wrong; the fix


@pytest.mark.parametrize("path, expected", [
    ("compress[0].targets", "missing required key 'targets'"),
    ("compress[0].strategy", "missing required key 'strategy'"),
    ("version", "missing required key 'version'"),
    ("name", "missing required key 'name'"),
])
def test_missing_required_key_is_named(path, expected):
    with pytest.raises(RecipeError, match=expected):
        Recipe.from_dict(with_change(path, None, delete=True))


def test_override_merges_with_the_rule_and_is_checked_merged():
    recipe = Recipe.from_dict(GOOD)
    rule = recipe.compress[1]
    assert rule.options_for("transformer.h.0.mlp.c_fc") == {"ratio": 4}
    assert rule.options_for("transformer.h.1.mlp.c_fc") == {"ratio": 2}
    # b_shape alone is fine for the rule, but merged with the rule's ratio it is not
    with pytest.raises(RecipeError, match=r"compress\[1\]\.overrides\[0\]\.options"):
        Recipe.from_dict(with_change("compress[1].overrides[0].options", {"b_shape": [1, 2]}))
    # an explicit null clears the rule's ratio
    fixed = Recipe.from_dict(with_change("compress[1].overrides[0].options", {"ratio": None, "b_shape": [1, 2]}))
    assert fixed.compress[1].options_for("transformer.h.0.mlp.c_fc") == {"ratio": None, "b_shape": [1, 2]}


@pytest.mark.parametrize("text, expected", [
    ("version: 1\nname: x\ncompress: [\n", "line "),
    ("version: 1\nname: x\n  bad indent: 1\n", "line 3"),
    ("version: 1\nname: x\nname: y\ncompress: []\n", "duplicate key 'name'"),
    ("", "the recipe is empty"),
    ("- just\n- a list\n", "top level: expected a mapping"),
])
def test_yaml_problems_name_the_file_and_line(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path)) and expected in str(info.value), str(info.value)


def test_yaml_reads_exponent_floats_without_a_dot():
    recipe = parse_yaml(textwrap.dedent("""\
        version: 1
        name: x
        compress: [{targets: [a], strategy: svd, options: {rank: 4}}]
        distill: {train: {lr: 1e-4}}
    """))
    assert recipe.distill.train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("ref, expected", [
    ("kn-gtp2", ["did you mean 'kn-gpt2'", "kn-gpt2-mlp", "distilgpt2"]),
    ("no/such/file.yaml", ["no/such/file.yaml", "no such recipe file", "kn-gpt2"]),
])
def test_missing_recipe_names_the_path_and_lists_bundled(ref, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe(ref)
    for fragment in expected:
        assert fragment in str(info.value)


# -- target patterns -----------------------------------------------------------------------------

class Conv1D(nn.Module):
    pass


MATCH = [
    # (pattern, name, module, aliases, matches)
    ("transformer.wte", "transformer.wte", None, None, True),
    ("transformer.wte", "transformer.wpe", None, None, False),
    ("transformer.h.*.mlp.c_fc", "transformer.h.10.mlp.c_fc", None, None, True),
    ("*.c_fc", "transformer.h.0.mlp.c_fc", None, None, True),
    ("*.c_fc", "transformer.h.0.mlp.c_fc.extra", None, None, False),
    ("transformer.h.[13].attn.c_attn", "transformer.h.3.attn.c_attn", None, None, True),
    ("Transformer.wte", "transformer.wte", None, None, False),  # class name, not a glob
    (r"re:transformer\.h\.(1|3)\.mlp\.c_fc", "transformer.h.3.mlp.c_fc", None, None, True),
    (r"re:transformer\.h\.(1|3)\.mlp\.c_fc", "transformer.h.13.mlp.c_fc", None, None, False),  # fullmatch
    (r"re:.*\.c_proj", "transformer.h.0.attn.c_proj", None, None, True),
    ("Linear", "model.layers.0.self_attn.q_proj", nn.Linear(2, 2), None, True),
    ("Linear", "model.layers.0.self_attn.q_proj", None, None, False),
    ("Conv1D", "transformer.h.0.mlp.c_fc", Conv1D(), None, True),
    ("Conv1D", "transformer.h.0.mlp.c_fc", nn.Linear(2, 2), None, False),
    ("role:attention", "model.layers.0.self_attn.q_proj", None, None, False),
    ("role:attention", "model.layers.0.self_attn.q_proj", None, {"attention": ["*.self_attn.*_proj"]}, True),
    ("role:attention", "model.layers.0.mlp.up_proj", None, {"attention": ["*.self_attn.*_proj"]}, False),
    ("role:mlp", "model.layers.0.mlp.up_proj", None, {"attention": ["*.self_attn.*_proj"]}, False),
    ("role:mlp", "model.layers.0.mlp.up_proj", None, {"mlp": [r"re:.*\.mlp\.(up|down|gate)_proj"]}, True),
]


@pytest.mark.parametrize("pattern, name, module, aliases, expected", MATCH, ids=[f"{m[0]}~{m[1]}" for m in MATCH])
def test_match_pattern(pattern, name, module, aliases, expected):
    assert match_pattern(pattern, name, module, aliases) is expected


# -- typed options: a rule holds its strategy's Config ----------------------------------------------

def test_rules_hold_their_parsed_config_once():
    from kroncompress.strategies.kronecker import KroneckerConfig

    recipe = load_recipe("kn-gpt2")
    assert recipe.compress[1].config == KroneckerConfig(b_shape=[1, 2])
    assert recipe.compress[1].config_for("transformer.h.1.mlp.c_fc") is recipe.compress[1].config


def test_recipes_can_be_built_in_python_from_config_objects():
    from kroncompress.recipe import Override, Rule
    from kroncompress.strategies.kronecker import KroneckerConfig
    from kroncompress.strategies.svd import SVDConfig

    recipe = Recipe(name="mine", compress=[
        Rule(targets=["role:mlp"], strategy="kronecker", config=KroneckerConfig(ratio=2),
             overrides=[Override(targets=["transformer.h.0.*"], config=KroneckerConfig(b_shape=[1, 4]))]),
        Rule(targets=["role:attention"], strategy="svd", config=SVDConfig(rank=8)),
    ])
    assert [rule.index for rule in recipe.compress] == [0, 1]
    assert recipe.compress[0].options == {"ratio": 2}
    assert recipe.compress[0].config_for("transformer.h.0.mlp.c_fc") == KroneckerConfig(b_shape=[1, 4])
    # the YAML written from it reads back to the same rules and configs (the override clears ratio)
    again = parse_yaml(recipe.to_yaml())
    assert again == recipe
    assert again.compress[0].config_for("transformer.h.0.mlp.c_fc") == KroneckerConfig(b_shape=[1, 4])
    assert again.compress[1].config == SVDConfig(rank=8)


@pytest.mark.parametrize("make, expected", [
    (lambda: __import__("kroncompress").Rule(targets=["x"], strategy="svd", options={"rank": 0}),
     r"compress\[0\]\.options\.rank: must be a positive int"),
    (lambda: __import__("kroncompress").Rule(targets=["x"], strategy="nope"), r"compress\[0\]\.strategy: unknown strategy 'nope'"),
    (lambda: Recipe(name="x", compress=[]), r"compress: is empty"),
])
def test_python_built_rules_are_validated_with_their_field(make, expected):
    with pytest.raises(RecipeError, match=expected):
        make()


def test_option_errors_carry_their_field():
    from kroncompress.strategies import OptionError

    with pytest.raises(OptionError) as caught:
        get_strategy("kronecker").parse_options({"ratio": 2, "sweeps": -1})
    assert caught.value.field == "sweeps" and "int >= 0" in caught.value.problem
