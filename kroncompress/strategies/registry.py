"""Strategy registry: built-ins register by decorator, third parties also by entry point."""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from kroncompress.strategies.base import Strategy

ENTRY_POINT_GROUP = "kroncompress.strategies"
_REGISTRY: dict[str, type[Strategy]] = {}
_entry_points_loaded = False


def register_strategy(name: str):
    """Class decorator: `@register_strategy("mine") class Mine(Strategy): ...`."""

    def decorator(cls: type[Strategy]) -> type[Strategy]:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"register_strategy({name!r}) expects a subclass of kroncompress.Strategy, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"a strategy named {name!r} is already registered ({existing.__module__}.{existing.__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


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
            raise ValueError(f"{where} failed to load: {exc}; fix or uninstall the package that provides it") from exc
        try:
            register_strategy(ep.name)(cls)
        except TypeError as exc:
            raise TypeError(f"{where}: {exc}") from exc
    # Only after every plugin loaded: a broken one keeps failing loudly instead of vanishing.
    _entry_points_loaded = True


def get_strategy(name: str) -> type[Strategy]:
    """The registered strategy class called `name` (built-ins, decorated classes, entry points)."""
    if not isinstance(name, str):
        raise ValueError(f"a strategy name must be a string, got {type(name).__name__} ({str(name)[:40]!r}); "
                         f"known: {', '.join(list_strategies())}")
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown strategy {name!r}; {hint}known: {', '.join(list_strategies())}")
    return _REGISTRY[name]


def list_strategies() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)
