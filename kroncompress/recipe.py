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
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

RECIPE_VERSION = 1
CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*")
ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class RecipeError(ValueError):
    """An invalid recipe: the message names the source, the YAML path, what is wrong and the fix."""


REPR_LIMIT = 200  # characters of a value quoted in an error message
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; anything near this is not one
MAX_YAML_NODES = 10_000  # values after expanding YAML aliases (the bundled recipes have a few hundred)


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """repr(value) cut to about `limit` characters, without building the whole repr of a huge value."""
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = shortener.maxlong = limit
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 8
    shortener.maxlevel = 3
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(source: str, path: str, problem: str, fix: str | None = None) -> RecipeError:
    where = f"{source}: {path}: " if path else f"{source}: "
    return RecipeError(where + problem + (f"; {fix}" if fix else ""))


# -- target patterns -----------------------------------------------------------------------------

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


# -- the typed recipe ----------------------------------------------------------------------------

@dataclass
class Override:
    """Per-rule options for the modules of a rule that also match `targets` (first match wins).

    `options` are merged over the rule's; `config` is the merged options parsed by the rule's strategy
    (set when the rule is built). In Python, give `config` (a whole Config object) instead of options."""

    targets: list[str]
    options: dict = field(default_factory=dict)
    config: Any = field(default=None, compare=False)


@dataclass
class Rule:
    """One `compress` entry: modules matching `targets` are compressed by `strategy` with `options`.

    `config` is the strategy's Config object built from `options` once, when the rule is made. In Python
    a rule can be written with the Config instead of options:
    `Rule(targets=["re:.*mlp.*"], strategy="kronecker", config=KroneckerConfig(b_shape=[1, 2]))`."""

    targets: list[str]
    strategy: str
    options: dict = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)
    index: int = 0
    config: Any = field(default=None, compare=False)

    def __post_init__(self):
        pending = lambda item: item.config is None or not item.options  # noqa: E731 (built in Python)
        if pending(self) or any(pending(o) for o in self.overrides):
            _configure_rule(self)

    def matches(self, module_name: str, module: Any = None, aliases: Mapping[str, Iterable[str]] | None = None) -> bool:
        """Whether this rule's targets select the module."""
        return match_any(self.targets, module_name, module, aliases)

    def _override_for(self, module_name: str, module: Any, aliases) -> "Override | None":
        return next((o for o in self.overrides if match_any(o.targets, module_name, module, aliases)), None)

    def options_for(self, module_name: str, module: Any = None,
                    aliases: Mapping[str, Iterable[str]] | None = None) -> dict:
        """The rule's options merged with the first override whose targets match the module."""
        override = self._override_for(module_name, module, aliases)
        return {**self.options, **override.options} if override is not None else dict(self.options)

    def config_for(self, module_name: str, module: Any = None, aliases: Mapping[str, Iterable[str]] | None = None):
        """The parsed Config for the module: the first matching override's, else the rule's."""
        override = self._override_for(module_name, module, aliases)
        return override.config if override is not None else self.config

    def option_path(self, module_name: str, module: Any, aliases, field_name: str | None) -> str:
        """The recipe path of an option of this rule as it applies to the module (e.g.
        `compress[1].options.ratio`, or the override's when the override sets that option)."""
        override = self._override_for(module_name, module, aliases)
        base = f"compress[{self.index}]"
        if override is not None and (field_name is None or field_name in override.options):
            base += f".overrides[{self.overrides.index(override)}]"
        return f"{base}.options" + (f".{field_name}" if field_name else "")


def _configure_rule(rule: Rule) -> None:
    """Parse a rule written in Python: its Config from options (or options from its Config), and each
    override's merged Config; errors name the rule's recipe path."""
    from kroncompress.strategies import OptionError, get_strategy

    where = f"<python>: compress[{rule.index}]"
    try:
        strategy_cls = get_strategy(rule.strategy)
    except ValueError as exc:
        raise RecipeError(f"{where}.strategy: {exc}") from None
    try:
        if rule.config is None:
            rule.config = strategy_cls.parse_options(dict(rule.options))
        elif not rule.options:
            if not isinstance(rule.config, strategy_cls.Config):
                raise RecipeError(f"{where}.config: strategy {rule.strategy!r} takes a {strategy_cls.Config.__name__}, "
                                  f"got {type(rule.config).__name__}")
            rule.options = strategy_cls.options_of(rule.config)
        for override in rule.overrides:
            if override.config is None:
                override.config = strategy_cls.parse_options({**rule.options, **override.options})
            elif not override.options:  # a whole Config: write out every rule option it replaces too
                kept = {k: getattr(override.config, k) for k in rule.options}
                override.options = {**kept, **strategy_cls.options_of(override.config)}
    except OptionError as exc:
        raise RecipeError(f"{where}.options" + (f".{exc.field}" if exc.field else "") + f": {exc.problem}") from None


@dataclass
class LogitsKL:
    """Temperature-scaled KL between teacher and student logits (weight 0 turns it off)."""

    weight: float = 0.0
    temperature: float = 2.0


@dataclass
class LossWeights:
    """Weights of the distillation terms; the default is KnGPT2's ILKD (embedding + attention + hidden + CE)."""

    ce: float = 1.0
    logits_kl: LogitsKL = field(default_factory=LogitsKL)
    hidden_mse: float = 1.0
    attention_kl: float = 1.0
    embedding_mse: float = 1.0


@dataclass
class DataConfig:
    """Training text: a hub `dataset` (+ `config`), local `files` (paths/globs) or a bundled `source`
    (e.g. "shakespeare"); at most one of them (none: the distillation engine's offline default)."""

    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    fraction: float = 1.0
    files: list[str] = field(default_factory=list)
    source: str | None = None
    block_size: int = 1024
    streaming: bool = False
    validation_fraction: float = 0.0
    column: str = "text"  # the text column of a dataset
    bos: str | bool = "auto"  # BOS at the start of every block: auto (when the tokenizer adds one), true, false


@dataclass
class TrainConfig:
    """Optimisation settings; `max_steps`, when set, caps `epochs`."""

    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2.5e-4
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    training_args: dict[str, Any] = field(default_factory=dict)  # passed to transformers' TrainingArguments


def training_argument_names() -> list[str]:
    """The keyword arguments transformers' TrainingArguments takes (`train.training_args` keys)."""
    from transformers import TrainingArguments

    return [f.name for f in dataclasses.fields(TrainingArguments) if f.init]


@dataclass
class DistillConfig:
    """The `distill` section: teacher ("original" = the uncompressed model, or a model path), loss
    weights, an optional student-to-teacher `layer_map`, data and training settings."""

    teacher: str = "original"
    losses: LossWeights = field(default_factory=LossWeights)
    layer_map: list[int] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class PerplexityConfig:
    """Sliding-window perplexity: windows of `block_size` tokens advanced by `stride`."""

    dataset: str | None = None
    config: str | None = None
    split: str = "test"
    files: list[str] = field(default_factory=list)
    source: str | None = None
    block_size: int = 1024
    stride: int = 512
    max_tokens: int | None = None


@dataclass
class EvaluateConfig:
    """The `evaluate` section."""

    perplexity: PerplexityConfig | None = None


@dataclass
class CalibrationConfig:
    """The `calibration` section: text for data-aware initialisation (a distill-style data spec), how
    many `tokens` to read, the `block_size` of each forward sequence, and the `damping` of the second moments."""

    data: DataConfig = field(default_factory=DataConfig)
    tokens: int = 16384
    block_size: int = 256
    damping: float = 0.01


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
    # a downstream task (kroncompress.tasks validates its fields): the columns, labels and metric to score
    task: dict[str, Any] | None = None
    source: str = field(default="<python>", compare=False)

    def __post_init__(self):
        if not self.compress:
            raise _error(self.source, "compress", "is empty", "add a rule, e.g. Rule(targets=[...], strategy=\"kronecker\", "
                         "config=KroneckerConfig(ratio=2))")
        for i, rule in enumerate(self.compress):
            rule.index = i

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Recipe":
        """Validate a parsed recipe (e.g. from `yaml.safe_load`); raises RecipeError."""
        return _parse_recipe(_Node(data, "", source))

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
        if self.task is not None:
            out["task"] = _plain(self.task)
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


# -- validation ----------------------------------------------------------------------------------

_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}


class _Node:
    """A value in the parsed YAML with its path, so every error can name where it happened."""

    def __init__(self, value: Any, path: str, source: str):
        self.value, self.path, self.source = value, path, source

    def child(self, key: str | int) -> "_Node":
        value = self.value[key]
        if isinstance(key, int):
            return _Node(value, f"{self.path}[{key}]", self.source)
        return _Node(value, f"{self.path}.{key}" if self.path else key, self.source)

    def error(self, problem: str, fix: str | None = None, key: str | None = None) -> RecipeError:
        path = (f"{self.path}.{key}" if self.path else key) if key else (self.path or "top level")
        return _error(self.source, path, problem, fix)

    def mapping(self, allowed: Iterable[str], required: Iterable[str] = ()) -> "_Node":
        """Check this is a mapping with only `allowed` keys (did-you-mean) and all `required` ones."""
        allowed = list(allowed)
        if not isinstance(self.value, Mapping):
            raise self.error(f"expected a mapping with keys {', '.join(allowed)}, got {_describe(self.value)}",
                             "write it as `key: value` lines")
        for key in self.value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                fix = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
                raise self.error(f"unknown key {short_repr(key)}", fix, key=key[:REPR_LIMIT] if isinstance(key, str) else short_repr(key))
        for key in required:
            if self.value.get(key) is None:
                raise self.error(f"missing required key {key!r}", f"add `{key}:` here ({', '.join(allowed)})")
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
            raise node.error(f"expected {wanted}, got {_describe(value)}", f"write {key} as {wanted}")
        if check is not None and not check.holds(value):
            raise node.error(f"must be {check.requirement}, got {short_repr(value)}", f"set {key} to {check.requirement}" if check.requirement.startswith("one of")
                             else f"set {key} to a value {check.requirement}")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return value

    def string_list(self, key: str, required: bool = False) -> list[str]:
        """A list of non-empty strings (a single string is accepted as a one-item list)."""
        if key not in self.value or self.value[key] is None:
            if required:
                raise self.error(f"missing required key {key!r}", f'add `{key}: ["pattern", ...]`')
            return []
        node = self.child(key)
        items = [node.value] if isinstance(node.value, str) else node.value
        if not isinstance(items, list):
            raise node.error(f"expected a list of strings, got {_describe(node.value)}", f'write {key}: ["...", "..."]')
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                raise _Node(item, f"{node.path}[{i}]", self.source).error(
                    f"expected a non-empty string, got {_describe(item)}", "quote the pattern")
        if required and not items:
            raise node.error("is empty", "list at least one pattern")
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


def _check_targets(node: _Node, key: str, required: bool) -> list[str]:
    patterns = node.string_list(key, required=required)
    for i, pattern in enumerate(patterns):
        where = _Node(pattern, f"{node.path}.{key}[{i}]" if node.path else f"{key}[{i}]", node.source)
        kind = pattern_kind(pattern)
        if kind == "regex":
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise where.error(f"invalid regular expression {pattern[3:]!r} ({exc})",
                                  "fix the regex; in YAML prefer single quotes so backslashes stay literal") from None
        elif kind == "role" and not ROLE_NAME.fullmatch(pattern[5:]):
            raise where.error(f"invalid role pattern {pattern!r}", "write role:<name>, e.g. role:attention or role:mlp")
    return patterns


def _check_options(strategy_cls, options: dict, node: _Node, override_options: dict | None = None,
                   override_node: _Node | None = None):
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
        raise _error(node.source, path, problem, fix) from None


def _parse_options(parent: _Node) -> tuple[dict, _Node]:
    if "options" not in parent.value or parent.value["options"] is None:
        return {}, _Node({}, f"{parent.path}.options", parent.source)
    node = parent.child("options")
    if not isinstance(node.value, Mapping):
        raise node.error(f"expected a mapping of strategy options, got {_describe(node.value)}", "e.g. options: {ratio: 2}")
    return dict(node.value), node


def _parse_rule(node: _Node, index: int) -> Rule:
    from kroncompress.strategies import get_strategy  # late: recipes load without touching torch until here

    node.mapping(["targets", "strategy", "options", "overrides"], required=["targets", "strategy"])
    targets = _check_targets(node, "targets", required=True)
    strategy = node.get("strategy", (str,))
    try:
        strategy_cls = get_strategy(strategy)
    except ValueError as exc:
        raise node.child("strategy").error(str(exc), "pick one of the registered strategies") from None
    options, options_node = _parse_options(node)
    config = _check_options(strategy_cls, options, options_node)

    overrides = []
    if node.value.get("overrides") is not None:
        list_node = node.child("overrides")
        if not isinstance(list_node.value, list):
            raise list_node.error(f"expected a list, got {_describe(list_node.value)}", "write overrides: [{targets: [...], options: {...}}]")
        for j in range(len(list_node.value)):
            item = list_node.child(j).mapping(["targets", "options"], required=["targets", "options"])
            override_options, override_node = _parse_options(item)
            merged = _check_options(strategy_cls, options, options_node, override_options, override_node)
            overrides.append(Override(targets=_check_targets(item, "targets", required=True), options=override_options,
                                      config=merged))
    return Rule(targets=targets, strategy=strategy, options=options, overrides=overrides, index=index, config=config)


def _parse_losses(node: _Node) -> LossWeights:
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
        raise node.error("all loss weights are zero", "give at least one loss a positive weight, e.g. ce: 1.0")
    return losses


def _parse_data(node: _Node) -> DataConfig:
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


def _check_one_text_source(node: _Node, section) -> None:
    given = [k for k in ("dataset", "files", "source") if getattr(section, k)]
    if len(given) > 1:
        raise node.error(f"gives {' and '.join(given)}", "give only one text source: dataset, files or source")
    if section.config and not section.dataset:
        raise node.error("config is set without dataset", "add dataset (config names a configuration of a hub dataset)")


def _parse_train(node: _Node) -> TrainConfig:
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


def _parse_training_args(node: _Node) -> dict[str, Any]:
    """`train.training_args`: a mapping of TrainingArguments keyword arguments (unknown keys: did-you-mean;
    `report_to` names known integrations)."""
    if node.value.get("training_args") is None:
        return {}
    child = node.child("training_args").mapping(training_argument_names())
    problem = report_to_problem(child.value.get("report_to"))
    if problem:
        raise child.child("report_to").error(problem, "e.g. report_to: [tensorboard], or none")
    return dict(child.value)


def _parse_distill(node: _Node) -> DistillConfig:
    node.mapping(["teacher", "losses", "layer_map", "data", "train"])
    layer_map = None
    if node.value.get("layer_map") is not None:
        lm = node.child("layer_map")
        if not isinstance(lm.value, list) or not lm.value:
            raise lm.error(f"expected a non-empty list of teacher layer indices, got {_describe(lm.value)}", "e.g. layer_map: [0, 2, 4, 7, 9, 11]")
        for i, v in enumerate(lm.value):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise lm.child(i).error(f"expected a teacher layer index >= 0, got {_describe(v)}", "one teacher layer per student layer")
        layer_map = list(lm.value)
    section = lambda key, parse, default: parse(node.child(key)) if node.value.get(key) is not None else default()
    return DistillConfig(
        teacher=node.get("teacher", (str,), "original"),
        losses=section("losses", _parse_losses, LossWeights),
        layer_map=layer_map,
        data=section("data", _parse_data, DataConfig),
        train=section("train", _parse_train, TrainConfig),
    )


def _parse_perplexity(node: _Node) -> PerplexityConfig:
    node.mapping([f.name for f in dataclasses.fields(PerplexityConfig)])
    ppl = PerplexityConfig(
        dataset=node.get("dataset", (str,)), config=node.get("config", (str,)), split=node.get("split", (str,), "test"),
        files=node.string_list("files"), source=node.get("source", (str,)),
        block_size=node.get("block_size", (int,), 1024, _at_least_one),
        stride=node.get("stride", (int,), 512, _at_least_one),
        max_tokens=node.get("max_tokens", (int,), None, _at_least_one),
    )
    if ppl.stride > ppl.block_size:
        raise node.child("stride").error(f"stride {ppl.stride} exceeds block_size {ppl.block_size} (tokens would be skipped)",
                                         "use a stride <= block_size, e.g. half of it")
    _check_one_text_source(node, ppl)
    return ppl


def _parse_evaluate(node: _Node) -> EvaluateConfig:
    node.mapping(["perplexity"])
    perplexity = _parse_perplexity(node.child("perplexity")) if node.value.get("perplexity") is not None else None
    return EvaluateConfig(perplexity=perplexity)


def _parse_calibration(node: _Node) -> CalibrationConfig:
    node.mapping(["data", "tokens", "block_size", "damping"])
    d = CalibrationConfig()
    data = _parse_data(node.child("data")) if node.value.get("data") is not None else DataConfig()
    return CalibrationConfig(
        data=data, tokens=node.get("tokens", (int,), d.tokens, _at_least_one),
        block_size=node.get("block_size", (int,), d.block_size, _at_least_one),
        damping=node.get("damping", (int, float), d.damping, _non_negative),
    )


def _parse_recipe(root: _Node) -> Recipe:
    root.mapping(["version", "name", "description", "compress", "ignore", "distill", "evaluate", "calibration", "task"],
                 required=["version", "name", "compress"])
    version = root.get("version", (int,))
    if version != RECIPE_VERSION:
        raise root.child("version").error(f"unsupported recipe version {version}",
                                          f"this kroncompress reads version {RECIPE_VERSION}; write version: {RECIPE_VERSION}")
    name = root.get("name", (str,), check=_not_blank)
    description = root.get("description", (str,), "")
    if "\n" in description.strip():
        raise root.child("description").error("spans several lines", "keep the description to one line")
    rules_node = root.child("compress")
    if not isinstance(rules_node.value, list) or not rules_node.value:
        raise rules_node.error(f"expected a non-empty list of rules, got {_describe(rules_node.value)}",
                               "add a rule: - {targets: [...], strategy: kronecker, options: {ratio: 2}}")
    rules = [_parse_rule(rules_node.child(i), i) for i in range(len(rules_node.value))]
    ignore = _check_targets(root, "ignore", required=False)
    distill = _parse_distill(root.child("distill")) if root.value.get("distill") is not None else None
    evaluate = _parse_evaluate(root.child("evaluate")) if root.value.get("evaluate") is not None else None
    calibration = _parse_calibration(root.child("calibration")) if root.value.get("calibration") is not None else None
    task = _parse_task(root.child("task")) if root.value.get("task") is not None else None
    return Recipe(version=version, name=name, description=description.strip(), compress=rules, ignore=ignore,
                  distill=distill, evaluate=evaluate, calibration=calibration, task=task, source=root.source)


def _parse_task(node: _Node) -> dict[str, Any]:
    """The `task:` section: a GLUE name, or a mapping of task fields that kroncompress.tasks checks."""
    if isinstance(node.value, str):
        return {"glue": node.value}
    if not isinstance(node.value, Mapping):
        raise node.error(f"expected a GLUE task name or a mapping of task fields, got {_describe(node.value)}",
                         "write e.g. task: {glue: sst2} or task: {text: sentence, label: label, labels: [neg, pos]}")
    return dict(node.value)


# -- YAML and bundled recipes --------------------------------------------------------------------

class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1 wants 1.0e-4) and refuses duplicate keys."""


_RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _RecipeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


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
            raise _error(source, f"line {node.start_mark.line + 1}", "a YAML alias refers to a value that contains it",
                         "write the value out instead of the recursive alias")
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
    """yaml.load with _RecipeLoader, refusing oversized text and alias-heavy documents before building them."""
    if len(text) > MAX_RECIPE_BYTES:
        raise _error(source, "", f"is {len(text):,} characters long, not a recipe (at most {MAX_RECIPE_BYTES:,})",
                     "give a recipe YAML file")
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, source) > MAX_YAML_NODES:
            raise _error(source, "", f"its YAML aliases (*name) expand to more than {MAX_YAML_NODES:,} values",
                         "a recipe needs no such nesting: write the values out, or use fewer aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str = "<string>") -> Recipe:
    """Parse and validate recipe YAML text; syntax errors name the source and line."""
    try:
        data = _load_yaml(text, source)
    except RecursionError:
        raise _error(source, "", "the YAML is nested too deeply", "a recipe is a few levels of mappings and lists") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise _error(source, where, f"invalid YAML: {problem}", "fix the syntax (indentation, colons, quotes) there") from None
    if data is None:
        raise _error(source, "", "the recipe is empty", "start with `version: 1`, `name:` and `compress:`")
    return Recipe.from_dict(data, source=source)


def _bundled_dir():
    """The bundled recipes folder: the kroncompress.recipes package, or a checkout's recipes/."""
    from importlib import resources

    try:
        return resources.files("kroncompress.recipes")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "recipes"


def _bundled_files() -> dict[str, Any]:
    return {entry.name[:-5]: entry for entry in _bundled_dir().iterdir() if entry.name.endswith(".yaml")}


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every bundled recipe, sorted by name (read without validating strategies)."""
    out = []
    for name, entry in sorted(_bundled_files().items()):
        try:
            data = yaml.load(entry.read_text(encoding="utf-8"), Loader=_RecipeLoader) or {}
        except yaml.YAMLError:
            data = {}
        description = data.get("description", "") if isinstance(data, Mapping) else ""
        out.append((name, str(description).strip()))
    return out


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file; RecipeError naming the file when it is oversized or not UTF-8."""
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise _error(str(path), "", f"is {size:,} bytes, not a recipe (at most {MAX_RECIPE_BYTES:,})", "give a recipe YAML file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(str(path), f"byte {exc.start}", f"is not UTF-8 text (byte 0x{data[exc.start]:02x})",
                     "save the recipe as UTF-8") from None


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
    raise _error(text, "", problem, f"{hint}give a path to a YAML file or a bundled recipe: {', '.join(sorted(bundled))}")
