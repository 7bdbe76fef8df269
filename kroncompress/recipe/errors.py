"""RecipeError, its message format (`<source>: <yaml path>: <problem>; <fix>`) and bounded value reprs."""

from __future__ import annotations

from typing import Any

from kroncompress.errors import RecipeError

__all__ = ["REPR_LIMIT", "RecipeError", "short_repr"]


REPR_LIMIT = 200  # characters of a value quoted in an error message


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """repr(value) cut to about `limit` characters, without building the whole repr of a huge value."""
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = shortener.maxlong = limit
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 8
    shortener.maxlevel = 3
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

