"""The errors kroncompress raises for bad input, and the one way to build them.

Every one is a `KroncompressError`, itself a ValueError (so `except ValueError` written before this module
existed still catches it); the CLI turns each into one `error: ...` line on stderr and exit code 2.

    raise RecipeError("unknown key 'ratoi'", where="recipe.yaml: rules[0]", fix="did you mean 'ratio'?")
    # recipe.yaml: rules[0]: unknown key 'ratoi'; did you mean 'ratio'?

The message is `<where>: <problem>; <fix>`: where names the file, field, module or option; the problem says
what is wrong (with the bad value); the fix says what to do. `where` and `fix` are optional, and a single
string (`DataError("...")`) is the whole message. The parts stay on the error as `.where`, `.problem`, `.fix`.

This module imports nothing heavy (no torch), so every floor of the package can use it.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "CheckpointError", "DataError", "KroncompressError", "OptionError", "OutputError", "OutputExistsError",
    "RecipeError", "format_message",
]


def format_message(problem: str, where: str | os.PathLike | None = None, fix: str | None = None) -> str:
    """`<where>: <problem>; <fix>` (where and fix left out when None or empty)."""
    text = f"{os.fspath(where) if isinstance(where, os.PathLike) else where}: {problem}" if where else str(problem)
    return text + (f"; {fix}" if fix else "")


class KroncompressError(ValueError):
    """Bad input to kroncompress: the one-line message names where, what is wrong and what to do."""

    where: str | None = None  # (class defaults: a subclass that also derives from RuntimeError keeps its __init__)
    problem: str | None = None
    fix: str | None = None

    def __init__(self, problem: str, *, where: str | os.PathLike | None = None, fix: str | None = None):
        self.where = None if where is None else str(os.fspath(where) if isinstance(where, os.PathLike) else where)
        self.problem, self.fix = problem, fix
        super().__init__(format_message(problem, where, fix))

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (multiprocessing, DDP) as the finished message
        return (_rebuild, (type(self), str(self), self.__dict__))


def _rebuild(cls: type, message: str, state: dict[str, Any]) -> KroncompressError:
    error = cls.__new__(cls)
    ValueError.__init__(error, message)
    error.__dict__.update(state)
    return error


class RecipeError(KroncompressError):
    """An invalid recipe: `where` is `<source>: <yaml path>`."""


class OptionError(KroncompressError):
    """An invalid strategy option; `field` names the option, so a recipe can point at its YAML path.

    Built as `OptionError(strategy, field, problem)`; the message reads
    `strategy 'kronecker', option 'ratio': <problem>` (`strategy 'x': <problem>` when field is None).
    """

    def __init__(self, strategy: str, field: str | None, problem: str, *, fix: str | None = None):
        self.strategy, self.field = strategy, field
        where = f"strategy {strategy!r}, option {field!r}" if field else f"strategy {strategy!r}"
        super().__init__(problem, where=where, fix=fix)


class CheckpointError(KroncompressError):
    """A model folder, checkpoint or weights that cannot be used as they are: damaged, edited, from another
    model or version, holding NaN/inf weights, or a run that cannot be resumed."""


class DataError(KroncompressError):
    """Input data that cannot be used: a corpus, a dataset, a token file, calibration statistics, a tensor
    of the wrong shape or dtype given to a function."""


class OutputError(KroncompressError):
    """A refused output folder: the message is one line naming the folder and the fix."""


class OutputExistsError(FileExistsError, OutputError):
    """The output folder exists and must not be written as asked (finished, unfinished or not ours)."""

    def __init__(self, problem: str, *, where: str | os.PathLike | None = None, fix: str | None = None):
        OutputError.__init__(self, problem, where=where, fix=fix)
