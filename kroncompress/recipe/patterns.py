"""Target patterns: globs on the full dotted module name, `re:` regexes, class names and `role:` aliases."""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable, Mapping

CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*")
ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def pattern_kind(pattern: str) -> str:
    """'regex', 'role', 'class' or 'glob': how `match_pattern` reads a target pattern."""
    if pattern.startswith("re:"):
        return "regex"
    if pattern.startswith("role:"):
        return "role"
    if CLASS_NAME.fullmatch(pattern):
        return "class"
    return "glob"


def match_pattern(pattern: str, name: str, module: Any = None,
                  aliases: Mapping[str, Iterable[str]] | None = None) -> bool:
    """Whether a target pattern selects the module called `name` (full dotted name).

    Globs use `fnmatch` (case-sensitive) on the full name, `re:` patterns `re.fullmatch`, a class
    name compares with `type(module).__name__` (False when `module` is None). `role:<role>` is only
    resolvable with `aliases`, a mapping role -> patterns of the model's architecture (supplied by the
    surgery); without it, or for an unknown role, it matches nothing.
    """
    kind = pattern_kind(pattern)
    if kind == "regex":
        return re.fullmatch(pattern[3:], name) is not None
    if kind == "class":
        return module is not None and type(module).__name__ == pattern
    if kind == "role":
        role_patterns = (aliases or {}).get(pattern[5:], ())
        if isinstance(role_patterns, str):
            role_patterns = [role_patterns]
        return any(pattern_kind(p) != "role" and match_pattern(p, name, module) for p in role_patterns)
    return fnmatch.fnmatchcase(name, pattern)


def match_any(patterns: Iterable[str], name: str, module: Any = None,
              aliases: Mapping[str, Iterable[str]] | None = None) -> bool:
    """Whether any of `patterns` selects the module (see `match_pattern`)."""
    return any(match_pattern(p, name, module, aliases) for p in patterns)
