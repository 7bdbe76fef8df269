"""The sections of a typed recipe: its compress Rules and Overrides, and the distill / evaluate / calibration
sections (the Recipe that holds them: kroncompress.recipe.recipe)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


from kroncompress.recipe.errors import RecipeError
from kroncompress.recipe.patterns import match_any

RECIPE_VERSION = 1


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
    refit: bool = True  # re-solve each module's free factor on the statistics after truncation (kroncompress.refit)
    sequential: bool = False  # each module's statistics taken with the modules before it compressed (kroncompress.sequential)


@dataclass
class BudgetConfig:
    """The `budget` section: one parameter budget for the modules of some compress rules (`rules`, indices;
    default: every rule whose strategy can be allocated). Exactly one of `keep` (the fraction of their weight
    parameters kept) and `params` (a count). `strategies`: what each module may become besides dense
    (default: the strategies of those rules); `sensitivity`: "measured" (the loss's Fisher weight of each
    module's output error, from the calibration text) or "uniform". See kroncompress.budget."""

    keep: float | None = None
    params: int | None = None
    strategies: list[str] | None = None
    sensitivity: str = "measured"
    rules: list[int] | None = None


@dataclass
class QuantizeConfig:
    """The `quantize` section: after compression (and distillation), store the factor matrices as `bits`-bit
    integers (4 or 8) with one scale per channel (group_size null) or per `group_size` entries; `dense` also
    quantizes the remaining nn.Linear / Conv1D weights (see kc.quantize)."""

    bits: int = 8
    group_size: int | None = None
    dense: bool = False
