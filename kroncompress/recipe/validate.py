"""Validation of a parsed recipe: each section checked at its YAML path, with did-you-mean for unknown keys."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from kroncompress.recipe.errors import REPR_LIMIT, RecipeError, short_repr
from kroncompress.recipe.patterns import ROLE_NAME, pattern_kind
from kroncompress.recipe.schema import (
    RECIPE_VERSION, BudgetConfig, CalibrationConfig, DataConfig, DistillConfig, EvaluateConfig, LogitsKL, LossWeights, Override,
    PerplexityConfig, QuantizeConfig, Rule, TrainConfig, training_argument_names,
)

_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}


class RecipeNode:
    """A value in the parsed YAML with its path, so every error can name where it happened."""

    def __init__(self, value: Any, path: str, source: str):
        self.value, self.path, self.source = value, path, source

    def child(self, key: str | int) -> "RecipeNode":
        value = self.value[key]
        if isinstance(key, int):
            return RecipeNode(value, f"{self.path}[{key}]", self.source)
        return RecipeNode(value, f"{self.path}.{key}" if self.path else key, self.source)

    def where(self, key: str | None = None) -> str:
        """`<source>: <yaml path>` of this value (or of its `key`), for a RecipeError's `where`."""
        path = (f"{self.path}.{key}" if self.path else key) if key else (self.path or "top level")
        return f"{self.source}: {path}"

    def mapping(self, allowed: Iterable[str], required: Iterable[str] = ()) -> "RecipeNode":
        """Check this is a mapping with only `allowed` keys (did-you-mean) and all `required` ones."""
        allowed = list(allowed)
        if not isinstance(self.value, Mapping):
            raise RecipeError(f"expected a mapping with keys {', '.join(allowed)}, got {_describe(self.value)}",
                              where=self.where(),
                              fix="write it as `key: value` lines")
        for key in self.value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                fix = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
                raise RecipeError(f"unknown key {short_repr(key)}",
                                  where=self.where(key[:REPR_LIMIT] if isinstance(key, str) else short_repr(key)),
                                  fix=fix)
        for key in required:
            if self.value.get(key) is None:
                raise RecipeError(f"missing required key {key!r}", where=self.where(),
                                  fix=f"add `{key}:` here ({', '.join(allowed)})")
        return self

    def get(self, key: str, kinds: tuple[type, ...], default: Any = None, check: "_Check | None" = None) -> Any:
        """The value under `key` (or `default` when absent or null), type-checked and range-checked."""
        if key not in self.value or self.value[key] is None:
            return default
        node = self.child(key)
        value = node.value
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            wanted = "a number" if float in kinds else " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise RecipeError(f"expected {wanted}, got {_describe(value)}", where=node.where(),
                              fix=f"write {key} as {wanted}")
        if check is not None and not check.holds(value):
            raise RecipeError(f"must be {check.requirement}, got {short_repr(value)}", where=node.where(),
                              fix=f"set {key} to {check.requirement}" if check.requirement.startswith("one of")
                             else f"set {key} to a value {check.requirement}")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return value

    def string_list(self, key: str, required: bool = False) -> list[str]:
        """A list of non-empty strings (a single string is accepted as a one-item list)."""
        if key not in self.value or self.value[key] is None:
            if required:
                raise RecipeError(f"missing required key {key!r}", where=self.where(),
                                  fix=f'add `{key}: ["pattern", ...]`')
            return []
        node = self.child(key)
        items = [node.value] if isinstance(node.value, str) else node.value
        if not isinstance(items, list):
            raise RecipeError(f"expected a list of strings, got {_describe(node.value)}", where=node.where(),
                              fix=f'write {key}: ["...", "..."]')
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                raise RecipeError(f"expected a non-empty string, got {_describe(item)}",
                                  where=RecipeNode(item, f"{node.path}[{i}]", self.source).where(),
                                  fix="quote the pattern")
        if required and not items:
            raise RecipeError("is empty", where=node.where(), fix="list at least one pattern")
        return list(items)


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{kind} ({short_repr(value)})" if not isinstance(value, (list, dict)) else kind


@dataclass(frozen=True)
class _Check:
    holds: Callable[[Any], bool]
    requirement: str  # reads after "must be" and after "set <key>"


_positive = _Check(lambda v: v > 0, "> 0")
_at_least_one = _Check(lambda v: v >= 1, ">= 1")
_non_negative = _Check(lambda v: v >= 0, ">= 0")
_unit_open_closed = _Check(lambda v: 0 < v <= 1, "in (0, 1]")
_unit_closed_open = _Check(lambda v: 0 <= v < 1, "in [0, 1)")
_SCHEDULES = ("cosine", "linear", "constant")
_schedule = _Check(lambda v: v in _SCHEDULES, f"one of {', '.join(_SCHEDULES)}")
_bos = _Check(lambda v: v == "auto" or isinstance(v, bool), "one of auto, true, false")
_not_blank = _Check(lambda v: bool(v.strip()), "a non-empty string")


def _check_targets(node: RecipeNode, key: str, required: bool) -> list[str]:
    patterns = node.string_list(key, required=required)
    for i, pattern in enumerate(patterns):
        where = RecipeNode(pattern, f"{node.path}.{key}[{i}]" if node.path else f"{key}[{i}]", node.source)
        kind = pattern_kind(pattern)
        if kind == "regex":
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise RecipeError(f"invalid regular expression {pattern[3:]!r} ({exc})", where=where.where(),
                                  fix="fix the regex; in YAML prefer single quotes so backslashes stay literal") from None
        elif kind == "role" and not ROLE_NAME.fullmatch(pattern[5:]):
            raise RecipeError(f"invalid role pattern {pattern!r}", where=where.where(),
                              fix="write role:<name>, e.g. role:attention or role:mlp")
    return patterns


def _check_options(strategy_cls, options: dict, node: RecipeNode, override_options: dict | None = None,
                   override_node: RecipeNode | None = None):
    """The strategy's Config for options (merged with an override's); errors re-raised at their YAML path."""
    from kroncompress.strategies import OptionError

    merged = {**options, **(override_options or {})}
    try:
        return strategy_cls.parse_options(dict(merged))
    except OptionError as exc:
        field_name, problem = exc.field, exc.problem
        fix = None if ";" in problem else f"see the options of strategy {strategy_cls.name!r} (`kroncompress strategies`)"
        if override_node is None or field_name in (override_options or {}):
            owner = override_node or node
            path = f"{owner.path}.{field_name}" if field_name else owner.path
        else:  # the rule's options alone were valid, so the override's merge is what breaks them
            path = override_node.path
            problem = f"merged with {node.path}, option {field_name!r}: {problem}" if field_name else problem
            fix = (fix + "; " if fix else "") + "an override may clear a rule option with null (e.g. ratio: null)"
        raise RecipeError(problem, where=f"{node.source}: {path}", fix=fix) from None


def _parse_options(parent: RecipeNode) -> tuple[dict, RecipeNode]:
    if "options" not in parent.value or parent.value["options"] is None:
        return {}, RecipeNode({}, f"{parent.path}.options", parent.source)
    node = parent.child("options")
    if not isinstance(node.value, Mapping):
        raise RecipeError(f"expected a mapping of strategy options, got {_describe(node.value)}", where=node.where(),
                          fix="e.g. options: {ratio: 2}")
    return dict(node.value), node


def _parse_rule(node: RecipeNode, index: int) -> Rule:
    from kroncompress.strategies import get_strategy  # late: recipes load without touching torch until here

    node.mapping(["targets", "strategy", "options", "overrides"], required=["targets", "strategy"])
    targets = _check_targets(node, "targets", required=True)
    strategy = node.get("strategy", (str,))
    try:
        strategy_cls = get_strategy(strategy)
    except ValueError as exc:
        raise RecipeError(str(exc), where=node.child("strategy").where(),
                          fix="pick one of the registered strategies") from None
    options, options_node = _parse_options(node)
    config = _check_options(strategy_cls, options, options_node)

    overrides = []
    if node.value.get("overrides") is not None:
        list_node = node.child("overrides")
        if not isinstance(list_node.value, list):
            raise RecipeError(f"expected a list, got {_describe(list_node.value)}", where=list_node.where(),
                              fix="write overrides: [{targets: [...], options: {...}}]")
        for j in range(len(list_node.value)):
            item = list_node.child(j).mapping(["targets", "options"], required=["targets", "options"])
            override_options, override_node = _parse_options(item)
            merged = _check_options(strategy_cls, options, options_node, override_options, override_node)
            overrides.append(Override(targets=_check_targets(item, "targets", required=True), options=override_options,
                                      config=merged))
    return Rule(targets=targets, strategy=strategy, options=options, overrides=overrides, index=index, config=config)


def _parse_losses(node: RecipeNode) -> LossWeights:
    names = [f.name for f in dataclasses.fields(LossWeights)]
    node.mapping(names)
    defaults = LossWeights()
    weights = {n: node.get(n, (int, float), getattr(defaults, n), _non_negative) for n in names if n != "logits_kl"}
    logits_kl = LogitsKL()
    if node.value.get("logits_kl") is not None:
        kl = node.child("logits_kl")
        if isinstance(kl.value, Mapping):
            kl.mapping(["weight", "temperature"])
            logits_kl = LogitsKL(weight=kl.get("weight", (int, float), 0.0, _non_negative),
                                 temperature=kl.get("temperature", (int, float), 2.0, _positive))
        else:
            logits_kl = LogitsKL(weight=node.get("logits_kl", (int, float), 0.0, _non_negative))
    losses = LossWeights(logits_kl=logits_kl, **weights)
    if not any([losses.ce, losses.logits_kl.weight, losses.hidden_mse, losses.attention_kl, losses.embedding_mse]):
        raise RecipeError("all loss weights are zero", where=node.where(),
                          fix="give at least one loss a positive weight, e.g. ce: 1.0")
    return losses


def _parse_data(node: RecipeNode) -> DataConfig:
    node.mapping([f.name for f in dataclasses.fields(DataConfig)])
    data = DataConfig(
        dataset=node.get("dataset", (str,)), config=node.get("config", (str,)), split=node.get("split", (str,), "train"),
        fraction=node.get("fraction", (int, float), 1.0, _unit_open_closed), files=node.string_list("files"),
        source=node.get("source", (str,)), block_size=node.get("block_size", (int,), 1024, _at_least_one),
        streaming=node.get("streaming", (bool,), False),
        validation_fraction=node.get("validation_fraction", (int, float), 0.0, _unit_closed_open),
        column=node.get("column", (str,), "text"),
        bos=node.get("bos", (str, bool), "auto", _bos),
    )
    _check_one_text_source(node, data)
    return data


def _check_one_text_source(node: RecipeNode, section) -> None:
    given = [k for k in ("dataset", "files", "source") if getattr(section, k)]
    if len(given) > 1:
        raise RecipeError(f"gives {' and '.join(given)}", where=node.where(),
                          fix="give only one text source: dataset, files or source")
    if section.config and not section.dataset:
        raise RecipeError("config is set without dataset", where=node.where(),
                          fix="add dataset (config names a configuration of a hub dataset)")


def _parse_train(node: RecipeNode) -> TrainConfig:
    node.mapping([f.name for f in dataclasses.fields(TrainConfig)])
    d = TrainConfig()
    return TrainConfig(
        epochs=node.get("epochs", (int, float), d.epochs, _positive),
        max_steps=node.get("max_steps", (int,), None, _at_least_one),
        lr=node.get("lr", (int, float), d.lr, _positive),
        warmup_ratio=node.get("warmup_ratio", (int, float), d.warmup_ratio, _unit_closed_open),
        schedule=node.get("schedule", (str,), d.schedule, _schedule),
        batch_size=node.get("batch_size", (int,), d.batch_size, _at_least_one),
        grad_accum=node.get("grad_accum", (int,), d.grad_accum, _at_least_one),
        # an explicit null turns clipping off
        max_grad_norm=None if "max_grad_norm" in node.value and node.value["max_grad_norm"] is None
        else node.get("max_grad_norm", (int, float), d.max_grad_norm, _positive),
        weight_decay=node.get("weight_decay", (int, float), d.weight_decay, _non_negative),
        seed=node.get("seed", (int,), d.seed, _non_negative),
        eval_every=node.get("eval_every", (int,), None, _at_least_one),
        save_every=node.get("save_every", (int,), None, _at_least_one),
        bf16=node.get("bf16", (bool,), d.bf16),
        gradient_checkpointing=node.get("gradient_checkpointing", (bool,), d.gradient_checkpointing),
        training_args=_parse_training_args(node),
    )


def report_to_problem(value: Any) -> str | None:
    """What is wrong with a TrainingArguments `report_to` value (a name, or a list of names, of transformers'
    logging integrations, or "all" / "none"), or None. Checked when the recipe loads, so a misspelt
    integration stops the run before the model loads, not after compression."""
    import difflib

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known = [*sorted(INTEGRATION_TO_CALLBACK), "all", "none"]
    names = [value] if isinstance(value, str) else value
    if value is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return f"expected an integration name or a list of them, got {_describe(value)}"
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            return f"unknown integration {name!r}; " + (f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}")
    return None


def _parse_training_args(node: RecipeNode) -> dict[str, Any]:
    """`train.training_args`: a mapping of TrainingArguments keyword arguments (unknown keys: did-you-mean;
    `report_to` names known integrations)."""
    if node.value.get("training_args") is None:
        return {}
    child = node.child("training_args").mapping(training_argument_names())
    problem = report_to_problem(child.value.get("report_to"))
    if problem:
        raise RecipeError(problem, where=child.child("report_to").where(), fix="e.g. report_to: [tensorboard], or none")
    return dict(child.value)


def _parse_distill(node: RecipeNode) -> DistillConfig:
    node.mapping(["teacher", "losses", "layer_map", "data", "train"])
    layer_map = None
    if node.value.get("layer_map") is not None:
        lm = node.child("layer_map")
        if not isinstance(lm.value, list) or not lm.value:
            raise RecipeError(f"expected a non-empty list of teacher layer indices, got {_describe(lm.value)}",
                              where=lm.where(),
                              fix="e.g. layer_map: [0, 2, 4, 7, 9, 11]")
        for i, v in enumerate(lm.value):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RecipeError(f"expected a teacher layer index >= 0, got {_describe(v)}", where=lm.child(i).where(),
                                  fix="one teacher layer per student layer")
        layer_map = list(lm.value)
    section = lambda key, parse, default: parse(node.child(key)) if node.value.get(key) is not None else default()
    return DistillConfig(
        teacher=node.get("teacher", (str,), "original"),
        losses=section("losses", _parse_losses, LossWeights),
        layer_map=layer_map,
        data=section("data", _parse_data, DataConfig),
        train=section("train", _parse_train, TrainConfig),
    )


def _parse_perplexity(node: RecipeNode) -> PerplexityConfig:
    node.mapping([f.name for f in dataclasses.fields(PerplexityConfig)])
    ppl = PerplexityConfig(
        dataset=node.get("dataset", (str,)), config=node.get("config", (str,)), split=node.get("split", (str,), "test"),
        files=node.string_list("files"), source=node.get("source", (str,)),
        block_size=node.get("block_size", (int,), 1024, _at_least_one),
        stride=node.get("stride", (int,), 512, _at_least_one),
        max_tokens=node.get("max_tokens", (int,), None, _at_least_one),
    )
    if ppl.stride > ppl.block_size:
        raise RecipeError(f"stride {ppl.stride} exceeds block_size {ppl.block_size} (tokens would be skipped)",
                          where=node.child("stride").where(),
                          fix="use a stride <= block_size, e.g. half of it")
    _check_one_text_source(node, ppl)
    return ppl


def _parse_evaluate(node: RecipeNode) -> EvaluateConfig:
    node.mapping(["perplexity"])
    perplexity = _parse_perplexity(node.child("perplexity")) if node.value.get("perplexity") is not None else None
    return EvaluateConfig(perplexity=perplexity)


def _parse_calibration(node: RecipeNode) -> CalibrationConfig:
    node.mapping(["data", "tokens", "block_size", "damping", "refit", "sequential"])
    d = CalibrationConfig()
    data = _parse_data(node.child("data")) if node.value.get("data") is not None else DataConfig()
    return CalibrationConfig(
        data=data, tokens=node.get("tokens", (int,), d.tokens, _at_least_one),
        block_size=node.get("block_size", (int,), d.block_size, _at_least_one),
        damping=node.get("damping", (int, float), d.damping, _non_negative),
        refit=node.get("refit", (bool,), d.refit),
        sequential=node.get("sequential", (bool,), d.sequential),
    )


def recipe_fields(data: Any, source: str) -> dict[str, Any]:
    """The checked fields of a Recipe (its keyword arguments) from parsed recipe data; raises RecipeError
    naming the YAML path. `Recipe.from_dict` builds the Recipe from them."""
    return _parse_recipe(RecipeNode(data, "", source))


def _parse_quantize(node: RecipeNode) -> QuantizeConfig:
    node.mapping(["bits", "group_size", "dense"])
    bits = node.get("bits", (int,), 8, _Check(lambda v: v in (4, 8), "one of 4, 8"))
    return QuantizeConfig(bits=bits, group_size=node.get("group_size", (int,), None, _at_least_one),
                          dense=node.get("dense", (bool,), False))


BUDGET_STRATEGIES = ("svd", "kronecker")  # what kroncompress.budget can draw error curves for


def _parse_budget(node: RecipeNode, rules: list) -> BudgetConfig:
    node.mapping(["keep", "params", "strategies", "sensitivity", "rules"])
    keep = node.get("keep", (int, float), None)
    params = node.get("params", (int,), None, _at_least_one)
    if (keep is None) == (params is None):
        raise RecipeError("give exactly one of keep (a fraction of the parameters kept) and params (a count)", where=node.where(), fix="write e.g. budget: {keep: 0.5}")
    if keep is not None and not 0 < keep < 1:
        raise RecipeError(f"must be a fraction between 0 and 1 (exclusive), got {keep}", where=node.child("keep").where(), fix="write e.g. keep: 0.5 to keep half of the parameters")
    strategies = node.string_list("strategies") or None
    for i, name in enumerate(strategies or []):
        if name not in BUDGET_STRATEGIES:
            raise RecipeError(f"{name!r} cannot be allocated by a budget", where=node.child("strategies").child(i).where(), fix=f"use some of {list(BUDGET_STRATEGIES)}")
    sensitivity = node.get("sensitivity", (str,), "measured")
    if sensitivity not in ("measured", "uniform"):
        raise RecipeError(f"unknown sensitivity {sensitivity!r}", where=node.child("sensitivity").where(), fix="use measured or uniform")
    chosen = None
    if node.value.get("rules") is not None:
        chosen = node.get("rules", (list,))
        for i, index in enumerate(chosen):
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(rules):
                raise RecipeError(f"{index!r} is not the index of a compress rule", where=node.child("rules").child(i).where(), fix=f"use 0..{len(rules) - 1}")
    covered = [rules[i] for i in chosen] if chosen is not None else [r for r in rules if r.strategy in BUDGET_STRATEGIES]
    wrong = [r for r in covered if r.strategy not in BUDGET_STRATEGIES]
    if wrong:
        raise RecipeError(f"compress[{wrong[0].index}] uses {wrong[0].strategy}, which a budget cannot "
                                        "allocate", where=node.child("rules").where(), fix=f"list only rules of {list(BUDGET_STRATEGIES)}")
    if not covered:
        raise RecipeError("no compress rule uses a strategy the budget can allocate", where=node.where(), fix=f"add a rule with strategy {' or '.join(BUDGET_STRATEGIES)}")
    return BudgetConfig(keep=keep, params=params, strategies=strategies, sensitivity=sensitivity, rules=chosen)


def _parse_recipe(root: RecipeNode) -> dict[str, Any]:
    root.mapping(["version", "name", "description", "compress", "ignore", "distill", "evaluate", "calibration", "budget",
                  "task", "quantize"],
                 required=["version", "name", "compress"])
    version = root.get("version", (int,))
    if version != RECIPE_VERSION:
        raise RecipeError(f"unsupported recipe version {version}", where=root.child("version").where(),
                          fix=f"this kroncompress reads version {RECIPE_VERSION}; write version: {RECIPE_VERSION}")
    name = root.get("name", (str,), check=_not_blank)
    description = root.get("description", (str,), "")
    if "\n" in description.strip():
        raise RecipeError("spans several lines", where=root.child("description").where(),
                          fix="keep the description to one line")
    rules_node = root.child("compress")
    if not isinstance(rules_node.value, list) or not rules_node.value:
        raise RecipeError(f"expected a non-empty list of rules, got {_describe(rules_node.value)}",
                          where=rules_node.where(),
                          fix="add a rule: - {targets: [...], strategy: kronecker, options: {ratio: 2}}")
    rules = [_parse_rule(rules_node.child(i), i) for i in range(len(rules_node.value))]
    ignore = _check_targets(root, "ignore", required=False)
    distill = _parse_distill(root.child("distill")) if root.value.get("distill") is not None else None
    evaluate = _parse_evaluate(root.child("evaluate")) if root.value.get("evaluate") is not None else None
    calibration = _parse_calibration(root.child("calibration")) if root.value.get("calibration") is not None else None
    task = _parse_task(root.child("task")) if root.value.get("task") is not None else None
    quantize = _parse_quantize(root.child("quantize")) if root.value.get("quantize") is not None else None
    budget = _parse_budget(root.child("budget"), rules) if root.value.get("budget") is not None else None
    return dict(version=version, name=name, description=description.strip(), compress=rules, ignore=ignore,
                distill=distill, evaluate=evaluate, calibration=calibration, budget=budget, task=task, quantize=quantize,
                source=root.source)


def _parse_task(node: RecipeNode) -> dict[str, Any]:
    """The `task:` section: a GLUE name, or a mapping of task fields that kroncompress.tasks checks."""
    if isinstance(node.value, str):
        return {"glue": node.value}
    if not isinstance(node.value, Mapping):
        raise RecipeError(f"expected a GLUE task name or a mapping of task fields, got {_describe(node.value)}",
                          where=node.where(),
                          fix="write e.g. task: {glue: sst2} or task: {text: sentence, label: label, labels: [neg, pos]}")
    return dict(node.value)
