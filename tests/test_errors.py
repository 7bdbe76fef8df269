"""kroncompress.errors: one base class, its subclasses, the one message format, the old import paths, the CLI's exit 2."""

import pickle

import pytest

import kroncompress as kc
from kroncompress.errors import (
    CheckpointError, DataError, KroncompressError, OptionError, OutputError, OutputExistsError, RecipeError,
)


def test_message_is_where_problem_fix_and_the_parts_stay_on_the_error():
    error = RecipeError("unknown key 'ratoi'", where="recipe.yaml: rules[0]", fix="did you mean 'ratio'?")
    assert str(error) == "recipe.yaml: rules[0]: unknown key 'ratoi'; did you mean 'ratio'?"
    assert (error.where, error.problem, error.fix) == ("recipe.yaml: rules[0]", "unknown key 'ratoi'", "did you mean 'ratio'?")
    assert str(DataError("the whole message")) == "the whole message"
    assert str(CheckpointError("bad", fix="compress again")) == "bad; compress again"


def test_option_error_keeps_its_signature_and_fields():
    error = OptionError("kronecker", "ratio", "must be in (0, 1], got 2")
    assert str(error) == "strategy 'kronecker', option 'ratio': must be in (0, 1], got 2"
    assert (error.strategy, error.field, error.problem) == ("kronecker", "ratio", "must be in (0, 1], got 2")
    assert str(OptionError("svd", None, "no rank")) == "strategy 'svd': no rank"
    from kroncompress.strategies.base import config_error  # the builder plugins used before: now the class itself

    assert config_error is OptionError


@pytest.mark.parametrize("error", [
    RecipeError("p", where="w", fix="f"), OptionError("svd", "rank", "p"), CheckpointError("p"), DataError("p"),
    OutputError("p", where="out"), OutputExistsError("exists", where="out", fix="pass --overwrite"),
])
def test_every_error_is_a_value_error_and_pickles_whole(error):
    assert isinstance(error, KroncompressError) and isinstance(error, ValueError)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error) and again.__dict__ == error.__dict__


def test_the_old_import_paths_name_the_same_classes():
    from kroncompress.distill.checkpoints import ResumeError
    from kroncompress.distill.trainer import NonFiniteWeightsError
    from kroncompress.outputs import OutputError as outputs_error
    from kroncompress.outputs import OutputExistsError as outputs_exists
    from kroncompress.recipe import RecipeError as recipe_error
    from kroncompress.strategies import OptionError as strategies_option

    assert (recipe_error, strategies_option, outputs_error, outputs_exists) == (
        RecipeError, OptionError, OutputError, OutputExistsError)
    assert issubclass(ResumeError, CheckpointError) and issubclass(NonFiniteWeightsError, CheckpointError)
    assert issubclass(OutputExistsError, FileExistsError)
    for name in ("KroncompressError", "RecipeError", "OptionError", "CheckpointError", "DataError", "OutputError"):
        assert getattr(kc, name) is getattr(__import__("kroncompress.errors", fromlist=[name]), name)
        assert name in kc.__all__


def test_the_cli_maps_every_error_to_one_line_and_exit_2():
    import click

    from cli.errors import UserError, user_errors

    @user_errors
    def command():
        raise DataError("two\nlines", where="data.txt", fix="fix it")

    with pytest.raises(UserError) as caught:
        command()
    assert isinstance(caught.value, click.ClickException) and caught.value.exit_code == 2
    assert caught.value.message == "data.txt: two lines; fix it"
