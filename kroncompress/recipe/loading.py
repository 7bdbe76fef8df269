"""Recipe YAML text to a Recipe, within safety limits: size, alias expansion, nesting depth, UTF-8."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kroncompress.recipe.errors import RecipeError
from kroncompress.recipe.recipe import Recipe

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; anything near this is not one
MAX_YAML_NODES = 10_000  # values after expanding YAML aliases (the bundled recipes have a few hundred)


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1 wants 1.0e-4) and refuses duplicate keys."""


RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: RecipeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _expanded_nodes(root: yaml.Node, source: str) -> int:
    """How many values the YAML graph stands for once its aliases are expanded, stopping past
    MAX_YAML_NODES (an alias bomb expands exponentially); RecipeError for a recursive alias."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise RecipeError("a YAML alias refers to a value that contains it",
                              where=f"{source}: line {node.start_mark.line + 1}",
                              fix="write the value out instead of the recursive alias")
        open_nodes.add(key)
        total = 1
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) else [])
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                break
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


def _load_yaml(text: str, source: str) -> Any:
    """yaml.load with RecipeLoader, refusing oversized text and alias-heavy documents before building them."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"is {len(text):,} characters long, not a recipe (at most {MAX_RECIPE_BYTES:,})",
                          where=source,
                          fix="give a recipe YAML file")
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, source) > MAX_YAML_NODES:
            raise RecipeError(f"its YAML aliases (*name) expand to more than {MAX_YAML_NODES:,} values", where=source,
                              fix="a recipe needs no such nesting: write the values out, or use fewer aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str = "<string>") -> Recipe:
    """Parse and validate recipe YAML text; syntax errors name the source and line."""
    try:
        data = _load_yaml(text, source)
    except RecursionError:
        raise RecipeError("the YAML is nested too deeply", where=source,
                          fix="a recipe is a few levels of mappings and lists") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"invalid YAML: {problem}", where=f"{source}: {where}",
                          fix="fix the syntax (indentation, colons, quotes) there") from None
    if data is None:
        raise RecipeError("the recipe is empty", where=source, fix="start with `version: 1`, `name:` and `compress:`")
    return Recipe.from_dict(data, source=source)


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file; RecipeError naming the file when it is oversized or not UTF-8."""
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"is {size:,} bytes, not a recipe (at most {MAX_RECIPE_BYTES:,})", where=str(path),
                          fix="give a recipe YAML file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"is not UTF-8 text (byte 0x{data[exc.start]:02x})", where=f"{str(path)}: byte {exc.start}",
                          fix="save the recipe as UTF-8") from None
