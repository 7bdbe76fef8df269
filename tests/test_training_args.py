"""Training arguments pass through to transformers' TrainingArguments: a recipe's
`distill.train.training_args` mapping (validated against TrainingArguments' fields), `training_args=` of
kc.distill.distill / run_pipeline, and `--report-to` of `kroncompress compress`; report_to defaults to none."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kroncompress.pipeline import text as pipeline_text
from kroncompress.cli.main import cli
from kroncompress.distill.trainer import training_arguments
from kroncompress.recipe import Recipe, RecipeError


def _recipe(train):
    return Recipe.from_dict({"version": 1, "name": "t", "compress": [
        {"targets": ["role:mlp"], "strategy": "svd", "options": {"ratio": 2}}],
        "distill": {"data": {"source": "shakespeare"}, "train": train}})


def _reports(args) -> list[str]:
    return [] if args.report_to in ("none", ["none"], [], None) else list(args.report_to)


def test_recipe_training_args_reach_the_trainer(tmp_path):
    recipe = _recipe({"max_steps": 2, "training_args": {"report_to": ["tensorboard"], "logging_steps": 3,
                                                        "run_name": "mine"}})
    assert recipe.distill.train.training_args == {"report_to": ["tensorboard"], "logging_steps": 3, "run_name": "mine"}
    args = training_arguments(recipe.distill, tmp_path)
    assert _reports(args) == ["tensorboard"] and args.logging_steps == 3 and args.run_name == "mine"
    assert Recipe.from_dict(recipe.to_dict()).distill.train.training_args == recipe.distill.train.training_args


def test_report_to_defaults_to_none_and_the_api_overrides_the_recipe(tmp_path):
    assert _reports(training_arguments(_recipe({}).distill, tmp_path)) == []
    config = _recipe({"training_args": {"report_to": ["tensorboard"], "logging_steps": 3}}).distill
    args = training_arguments(config, tmp_path, training_args={"report_to": "none", "logging_steps": 7})
    assert _reports(args) == [] and args.logging_steps == 7


def test_unknown_training_args_are_named_with_a_did_you_mean(tmp_path):
    with pytest.raises(RecipeError, match=r"distill\.train\.training_args\.report_too.*did you mean 'report_to'"):
        _recipe({"training_args": {"report_too": ["wandb"]}})
    with pytest.raises(ValueError, match=r"unknown TrainingArguments key 'logging_step'; did you mean 'logging_steps'"):
        training_arguments(_recipe({}).distill, tmp_path, training_args={"logging_step": 3})
    with pytest.raises(ValueError, match="logging_step"):
        pipeline_text.distill_config(_recipe({}), None, None, {"logging_step": 3})


def test_run_pipeline_merges_training_args_over_the_recipe():
    recipe = _recipe({"training_args": {"report_to": ["tensorboard"], "logging_steps": 3}})
    config = pipeline_text.distill_config(recipe, None, None, {"logging_steps": 9})
    assert config.train.training_args == {"report_to": ["tensorboard"], "logging_steps": 9}
    assert recipe.distill.train.training_args["logging_steps"] == 3  # the recipe itself is unchanged


@pytest.mark.parametrize("flag, expected", [
    ([], None), (["--report-to", "tensorboard,wandb"], {"report_to": ["tensorboard", "wandb"]}),
    (["--report-to", "none"], {"report_to": "none"}),
])
def test_cli_report_to_flag(tmp_path, monkeypatch, flag, expected):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr("kroncompress.pipeline.run_pipeline", fake)
    result = CliRunner().invoke(cli, ["compress", "--recipe", "kn-gpt2", "--output", str(tmp_path / "o"), *flag])
    assert "stop here" in result.output and seen["training_args"] == expected


def test_cli_report_to_refuses_an_unknown_integration(tmp_path):
    result = CliRunner().invoke(cli, ["compress", "--recipe", "kn-gpt2", "--output", str(tmp_path / "o"),
                                      "--report-to", "tensorbord"])
    assert result.exit_code == 2 and "did you mean 'tensorboard'" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("report_to, message", [
    (["tensorbord"], r"distill\.train\.training_args\.report_to: unknown integration 'tensorbord'; did you mean 'tensorboard'"),
    ("wandbb", r"training_args\.report_to: unknown integration 'wandbb'; did you mean 'wandb'"),
    ([3], r"training_args\.report_to: expected an integration name or a list of them"),
], ids=["list", "string", "not a name"])
def test_recipe_report_to_names_known_integrations_when_the_recipe_loads(report_to, message):
    with pytest.raises(RecipeError, match=message):
        _recipe({"training_args": {"report_to": report_to}})


@pytest.mark.parametrize("report_to", [["tensorboard", "wandb"], "all", "none", []])
def test_known_report_to_values_load(report_to):
    assert _recipe({"training_args": {"report_to": report_to}}).distill.train.training_args["report_to"] == report_to


def test_api_report_to_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    import kroncompress as kc

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kroncompress.pipeline.load.load_model_and_tokenizer", never)
    with pytest.raises(ValueError, match=r"training_args\.report_to: unknown integration 'tensorbord'"):
        kc.run_pipeline("shakespeare-gpt2", "kn-gpt2", tmp_path / "o", training_args={"report_to": ["tensorbord"]})
    assert not (tmp_path / "o").exists()
