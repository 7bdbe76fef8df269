"""Finding a recipe: a bundled name, a YAML file path, a mapping; and the list of bundled recipes."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping

import yaml

from kroncompress.recipe.errors import RecipeError
from kroncompress.recipe.loading import RecipeLoader, parse_yaml, read_recipe_text
from kroncompress.recipe.recipe import Recipe


def _bundled_dir():
    """The bundled recipes folder: the kroncompress.recipes package, or a checkout's recipes/."""
    from importlib import resources

    try:
        return resources.files("kroncompress.recipes")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "recipes"


def _bundled_files() -> dict[str, Any]:
    return {entry.name[:-5]: entry for entry in _bundled_dir().iterdir() if entry.name.endswith(".yaml")}


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every bundled recipe, sorted by name (read without validating strategies)."""
    out = []
    for name, entry in sorted(_bundled_files().items()):
        try:
            data = yaml.load(entry.read_text(encoding="utf-8"), Loader=RecipeLoader) or {}
        except yaml.YAMLError:
            data = {}
        description = data.get("description", "") if isinstance(data, Mapping) else ""
        out.append((name, str(description).strip()))
    return out


def load_recipe(name_or_path: "str | Path | Mapping | Recipe") -> Recipe:
    """A validated Recipe from a bundled name (`kn-gpt2` or `kn-gpt2.yaml`), a path to a YAML file, or a
    dict shaped like the YAML (e.g. `load_recipe("kn-gpt2").to_dict()` after edits).

    An existing file path wins over a bundled recipe of the same name.
    """
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return Recipe.from_dict(name_or_path)
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return parse_yaml(read_recipe_text(path), source=str(path))
    bundled = _bundled_files()
    bare = text[:-5] if text.endswith(".yaml") else text[:-4] if text.endswith(".yml") else text
    if isinstance(name_or_path, str) and "/" not in text and bare in bundled:
        entry = bundled[bare]
        return parse_yaml(entry.read_text(encoding="utf-8"), source=f"{bare}.yaml (bundled)")
    close = difflib.get_close_matches(bare, list(bundled), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    problem = "is a folder, not a recipe file" if path.is_dir() else "no such recipe file, and no bundled recipe of that name"
    raise RecipeError(problem, where=text,
                      fix=f"{hint}give a path to a YAML file or a bundled recipe: {', '.join(sorted(bundled))}")


def as_recipe(recipe: Any) -> Recipe:
    """A Recipe passes through; a name, path or dict is loaded (the one place the public API loads one)."""
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
