"""Strategy registry: built-ins register by decorator, third parties also by entry point."""

from __future__ import annotations

import difflib
import inspect
from importlib.metadata import entry_points

from kroncompress.errors import KroncompressError, RecipeError
from kroncompress.strategies.base import BaseStrategy, Strategy, StructuralStrategy

ENTRY_POINT_GROUP = "kroncompress.strategies"
_REGISTRY: dict[str, type[BaseStrategy]] = {}
_entry_points_loaded = False


def register_strategy(name: str):
    """Class decorator: `@register_strategy("mine") class Mine(Strategy): ...` (or `StructuralStrategy`)."""

    def decorator(cls: type[BaseStrategy]) -> type[BaseStrategy]:
        if not (isinstance(cls, type) and issubclass(cls, (Strategy, StructuralStrategy))):
            raise TypeError(f"register_strategy({name!r}) expects a subclass of kroncompress.Strategy or "
                            f"kroncompress.StructuralStrategy, got {cls!r}")
        if issubclass(cls, Strategy):
            _check_takes_stats(name, cls)
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise KroncompressError(f"a strategy named {name!r} is already registered "
                                    f"({existing.__module__}.{existing.__qualname__})", fix="pick another name")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _check_takes_stats(name: str, cls: type[Strategy]) -> None:
    """The contract passes `stats=` to plan and decompose, always (None when there are none): refuse a
    class whose methods would fail on it (or misspell it) at registration, not in the middle of a run."""
    for method in ("plan", "decompose"):
        parameters = inspect.signature(getattr(cls, method)).parameters.values()
        if not any(p.name == "stats" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            raise TypeError(f"register_strategy({name!r}): {cls.__qualname__}.{method}() has no `stats` parameter; "
                            f"the surgery always passes stats= (None when there are no statistics): add "
                            f"`stats=None` to its parameters")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:  # built-ins (and earlier registrations) win
            continue
        where = f"entry point {ep.name!r} ({getattr(ep, 'value', '?')}) in group {ENTRY_POINT_GROUP!r}"
        try:
            cls = ep.load()
        except Exception as exc:
            raise KroncompressError(f"failed to load: {exc}", where=where,
                                    fix="fix or uninstall the package that provides it") from exc
        try:
            register_strategy(ep.name)(cls)
        except TypeError as exc:
            raise TypeError(f"{where}: {exc}") from exc
    # Only after every plugin loaded: a broken one keeps failing loudly instead of vanishing.
    _entry_points_loaded = True


def get_strategy(name: str) -> type[BaseStrategy]:
    """The registered strategy class called `name` (built-ins, decorated classes, entry points)."""
    if not isinstance(name, str):
        raise RecipeError(f"a strategy name must be a string, got {type(name).__name__} ({str(name)[:40]!r})",
                          fix=f"known: {', '.join(list_strategies())}")
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"unknown strategy {name!r}", fix=f"{hint}known: {', '.join(list_strategies())}")
    return _REGISTRY[name]


def list_strategies() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)
