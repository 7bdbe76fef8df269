"""YAML recipes: which modules get which strategy, plus the distill and evaluate sections.

A recipe is parsed and fully validated on load, before any model is touched:

    recipe = load_recipe("kn-gpt2")            # bundled name, "kn-gpt2.yaml", or a path
    recipe = Recipe.from_dict({...}, source="my-recipe")

Every error is a `RecipeError` whose message reads
`<source>: <yaml path>: <what is wrong>; <the fix>`, e.g.
`kn.yaml: compress[1].options.ratio: must be a number > 1 ...`.

Targets (in `compress[*].targets`, `overrides[*].targets` and `ignore`) are:

- a glob on the full dotted module name (`transformer.h.*.mlp.c_fc`),
- `re:<regex>`, matched with `re.fullmatch` on the full name,
- a bare identifier starting with an uppercase letter: the module's class name (`Conv1D`),
- `role:<role>`: a per-architecture alias (`role:attention`, `role:mlp`) resolved by the surgery.

Import every name from `kroncompress.recipe`; the code lives in submodules by responsibility: `recipe`
(the Recipe), `schema` (its sections' dataclasses), `patterns` (target matching), `validate` (checks at YAML paths, did-you-mean errors),
`loading` (YAML text within safety limits), `lookup` (bundled names and files, `as_recipe`), `errors` (RecipeError).
"""

from __future__ import annotations

from kroncompress.recipe.errors import REPR_LIMIT, RecipeError, short_repr
from kroncompress.recipe.loading import MAX_RECIPE_BYTES, MAX_YAML_NODES, parse_yaml, read_recipe_text
from kroncompress.recipe.lookup import as_recipe, list_recipes, load_recipe
from kroncompress.recipe.patterns import CLASS_NAME, ROLE_NAME, match_any, match_pattern, pattern_kind
from kroncompress.recipe.schema import (
    RECIPE_VERSION, BudgetConfig, CalibrationConfig, DataConfig, DistillConfig, EvaluateConfig, LogitsKL, LossWeights,
    Override, PerplexityConfig, QuantizeConfig, Rule, TrainConfig, training_argument_names,
)
from kroncompress.recipe.recipe import Recipe
from kroncompress.recipe.validate import report_to_problem

# in the order the reference page lists them
__all__ = [
    "RECIPE_VERSION", "CLASS_NAME", "ROLE_NAME", "RecipeError", "REPR_LIMIT", "MAX_RECIPE_BYTES", "MAX_YAML_NODES",
    "short_repr", "pattern_kind", "match_pattern", "match_any",
    "Override", "Rule", "LogitsKL", "LossWeights", "DataConfig", "TrainConfig", "training_argument_names",
    "DistillConfig", "PerplexityConfig", "EvaluateConfig", "CalibrationConfig", "BudgetConfig", "QuantizeConfig", "Recipe",
    "report_to_problem", "parse_yaml", "list_recipes", "read_recipe_text", "load_recipe", "as_recipe",
]
