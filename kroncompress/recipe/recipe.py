"""The Recipe: its compress rules, global ignore list and the distill / evaluate / calibration / task sections,
checked on the way in (`from_dict`, through kroncompress.recipe.validate) and written back out (`to_dict`,
`to_yaml`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import yaml

from kroncompress.recipe.errors import RecipeError
from kroncompress.recipe.patterns import match_any
from kroncompress.recipe.schema import (
    RECIPE_VERSION, BudgetConfig, CalibrationConfig, DistillConfig, EvaluateConfig, QuantizeConfig, Rule,
)
from kroncompress.recipe.validate import recipe_fields


@dataclass
class Recipe:
    """A validated recipe. Build it with `load_recipe` or `Recipe.from_dict`."""

    version: int = RECIPE_VERSION
    name: str = "custom"
    description: str = ""
    compress: list[Rule] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    distill: DistillConfig | None = None
    evaluate: EvaluateConfig | None = None
    calibration: CalibrationConfig | None = None
    budget: BudgetConfig | None = None
    # a downstream task (kroncompress.tasks validates its fields): the columns, labels and metric to score
    task: dict[str, Any] | None = None
    quantize: QuantizeConfig | None = None
    source: str = field(default="<python>", compare=False)

    def __post_init__(self):
        if not self.compress:
            raise RecipeError("is empty", where=f"{self.source}: compress",
                              fix="add a rule, e.g. Rule(targets=[...], strategy=\"kronecker\", config=KroneckerConfig(ratio=2))")
        for i, rule in enumerate(self.compress):
            rule.index = i

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Recipe":
        """Validate a parsed recipe (e.g. from `yaml.safe_load`); raises RecipeError."""
        return cls(**recipe_fields(data, source))

    def is_ignored(self, module_name: str, module: Any = None, aliases: Mapping[str, Iterable[str]] | None = None) -> bool:
        """Whether the global `ignore` list excludes the module."""
        return match_any(self.ignore, module_name, module, aliases)

    def rule_for(self, module_name: str, module: Any = None,
                 aliases: Mapping[str, Iterable[str]] | None = None) -> Rule | None:
        """The first rule matching the module, or None (also None when the module is ignored)."""
        if self.is_ignored(module_name, module, aliases):
            return None
        return next((r for r in self.compress if r.matches(module_name, module, aliases)), None)

    def to_dict(self) -> dict:
        """Plain data (lists, dicts, scalars) that `from_dict` turns back into an equal Recipe."""
        out: dict[str, Any] = {"version": self.version, "name": self.name, "description": self.description}
        out["compress"] = []
        for rule in self.compress:
            entry: dict[str, Any] = {"targets": list(rule.targets), "strategy": rule.strategy, "options": _plain(rule.options)}
            if rule.overrides:
                entry["overrides"] = [{"targets": list(o.targets), "options": _plain(o.options)} for o in rule.overrides]
            out["compress"].append(entry)
        out["ignore"] = list(self.ignore)
        if self.distill is not None:
            out["distill"] = _plain(dataclasses.asdict(self.distill))
        if self.evaluate is not None:
            out["evaluate"] = _plain(dataclasses.asdict(self.evaluate))
        if self.calibration is not None:
            out["calibration"] = _plain(dataclasses.asdict(self.calibration))
        if self.budget is not None:
            out["budget"] = {k: _plain(v) for k, v in dataclasses.asdict(self.budget).items() if v is not None}
        if self.task is not None:
            out["task"] = _plain(self.task)
        if self.quantize is not None:
            out["quantize"] = _plain(dataclasses.asdict(self.quantize))
        return out

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (defaults written out), loadable by `load_recipe`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=120)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
