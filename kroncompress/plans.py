"""The plan and report of a compression, and the section of config.json they are saved in.

`kc.plan` returns a CompressionPlan (one PlanRow per target module), `kc.compress` a CompressionReport
(one ReportRow per module). `compress` records what it did in `model.config.kroncompress` (CONFIG_KEY):
the per-module plans, the blocks dropped, the tied head and the recipe, which is exactly what
`save_compressed` writes to config.json and `load_compressed` rebuilds the modules from.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kroncompress.recipe import Recipe
from kroncompress.strategies import LayerPlan, Strategy, StructuralStrategy, get_strategy

CONFIG_KEY = "kroncompress"  # the section of model.config (and config.json) holding the saved plan
FORMAT_VERSION = 1


@dataclass
class PlanRow:
    """One module's plan: which rule and strategy, with which options, and the strategy's LayerPlan."""

    name: str
    strategy: str
    options: dict[str, Any]
    plan: LayerPlan
    rule: int
    tied: list[dict[str, Any]] = field(default_factory=list)  # modules sharing this weight: {"name", "as"}
    note: str = ""
    config: Any = field(default=None, repr=False)  # the parsed strategy config
    impl: Strategy | None = field(default=None, repr=False, compare=False)  # the strategy instance
    bytes_before: int | None = None  # weight bytes, the recipe's `quantize` section included (kc.plan sets them)
    bytes_after: int | None = None

    @property
    def strategy_impl(self) -> Strategy:
        if self.impl is None:
            self.impl = get_strategy(self.strategy)(config=self.config)
        return self.impl

    @property
    def structural(self) -> bool:
        return isinstance(self.strategy_impl, StructuralStrategy)

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        notes = "; ".join(n for n in (plan.note, self.note) if n)
        return {
            "name": self.name, "strategy": self.strategy, "rule": self.rule, "kind": plan.kind,
            "shape": list(plan.shape), "spec": jsonable(plan.spec), "options": jsonable(self.options),
            "params_before": plan.params_before, "params_after": plan.params_after,
            "flops_before": plan.flops_before, "flops_after": plan.flops_after,
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "tied": [dict(t) for t in self.tied], "note": notes,
        }


@dataclass
class CompressionPlan:
    """What `compress` would do: one row per target module, and the whole model's parameter counts."""

    rows: list[PlanRow]
    params_before: int
    params_after: int
    recipe: str = ""
    model_type: str = ""
    skipped: list[str] = field(default_factory=list)  # targets inside blocks that layerdrop removes
    source: Recipe | None = field(default=None, repr=False, compare=False)  # the recipe it was planned from
    calibrated: bool = False  # planned with calibration statistics (data-aware shape choice)
    bytes_before: int | None = None  # weight bytes (kroncompress.quantization.weight_bytes), quantize section included
    bytes_after: int | None = None
    allocation: dict | None = None  # the recipe's budget: what each module got and why (kroncompress.budget)
    notes: list[str] = field(default_factory=list)  # what the recipe names but this model has not (see surgery)
    blocks: dict[str, int] = field(default_factory=dict)  # block list (ModuleList) name -> its length, for `compressed`

    @property
    def compressed(self) -> str:
        """The modules compressed, blocks grouped: `transformer.wte; transformer.h blocks 1, 3, 5 of 6 (0-5):
        attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj` (from the rows: what is done, not what the recipe says)."""
        return describe_modules([row.name for row in self.rows], self.blocks)

    @property
    def ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: totals and a `modules` list of rows."""
        return {
            "recipe": self.recipe, "model_type": self.model_type,
            "params_before": self.params_before, "params_after": self.params_after, "ratio": round(self.ratio, 4),
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "modules": [row.to_dict() for row in self.rows], "skipped": list(self.skipped),
            "compressed": self.compressed, "notes": list(self.notes),
            **({"allocation": self.allocation} if self.allocation is not None else {}),
        }

    def module_plans(self) -> dict[str, dict[str, Any]]:
        """{module name: {"strategy", "options", "plan", "tied"}} for the factorized modules: what
        `load_compressed` needs to rebuild them (JSON-able; stored in config.json by compress)."""
        return {
            row.name: {"strategy": row.strategy, "options": jsonable(row.options), "plan": jsonable(row.plan.to_dict()),
                       "tied": [dict(t) for t in row.tied]}
            for row in self.rows if not row.structural
        }

    def summary_by_strategy(self) -> dict[str, dict[str, int]]:
        """{strategy: {"modules", "params_before", "params_after"}} over the rows."""
        out: dict[str, dict[str, int]] = {}
        for row in self.rows:
            entry = out.setdefault(row.strategy, {"modules": 0, "params_before": 0, "params_after": 0})
            entry["modules"] += 1
            entry["params_before"] += row.plan.params_before
            entry["params_after"] += row.plan.params_after
        return out


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


@dataclass
class ReportRow:
    """What happened to one module."""

    name: str
    strategy: str
    kind: str
    spec: dict[str, Any]
    params_before: int
    params_after: int
    rel_error: float | None  # ||W - W^||_F / ||W||_F; None for structural strategies
    seconds: float
    note: str = ""
    output_error: float | None = None  # sqrt(tr(D C D^T) / tr(W C W^T)) on calibration inputs, when given
    output_error_before_refit: float | None = None  # the same before the refit stage (kroncompress.refit)


@dataclass
class CompressionReport:
    """The result of `compress`: one row per module and the whole model's parameter counts."""

    rows: list[ReportRow]
    params_before: int
    params_after: int
    seconds: float
    recipe: str = ""
    bytes_before: int | None = None  # weight bytes (kroncompress.quantization.weight_bytes)
    bytes_after: int | None = None
    allocation: dict | None = None  # the recipe's budget, as planned (see CompressionPlan.allocation)
    compressed: str = ""  # the plan's `compressed`: the modules, blocks grouped
    notes: list[str] = field(default_factory=list)  # the plan's notes

    @property
    def ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: totals and a `modules` list of rows."""
        return {
            "recipe": self.recipe, "params_before": self.params_before, "params_after": self.params_after,
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "ratio": round(self.ratio, 4), "seconds": round(self.seconds, 3),
            "modules": [jsonable(dataclasses.asdict(r)) for r in self.rows],
            "compressed": self.compressed, "notes": list(self.notes),
            **({"allocation": jsonable(self.allocation)} if self.allocation is not None else {}),
        }


_BLOCK = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)(?:\.(?P<rest>.+))?$")


def describe_modules(names: list[str], blocks: dict[str, int] | None = None) -> str:
    """Module names in a line, the blocks of a block list grouped: `transformer.wte; transformer.h blocks
    1, 3, 5 of 6 (0-5): attn.c_attn, mlp.c_fc`. `blocks` gives a block list's length (shown when known)."""
    blocks = blocks or {}
    singles: list[str] = []
    grouped: dict[str, dict[int, list[str]]] = {}
    for name in names:
        match = _BLOCK.match(name)
        if match is None:
            singles.append(name)
            continue
        grouped.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append(match["rest"] or "")
    parts = list(singles)
    for prefix, by_index in grouped.items():
        by_parts: dict[tuple[str, ...], list[int]] = {}
        for index, rest in sorted(by_index.items()):
            by_parts.setdefault(tuple(rest), []).append(index)
        for rest, indices in by_parts.items():
            count = blocks.get(prefix)
            of = f" of {count} (0-{count - 1})" if count else ""
            what = ", ".join(r for r in rest if r) or "the whole block"
            word = "block" if len(indices) == 1 else "blocks"
            parts.append(f"{prefix} {word} {', '.join(map(str, indices))}{of}: {what}")
    return "; ".join(parts)


def renumber(modules: dict[str, Any], layers_name: str, keep: list[int]) -> dict[str, Any]:
    """Rename `<layers>.<old index>.*` entries to the kept block's new index."""
    new_index = {old: new for new, old in enumerate(keep)}
    prefix = f"{layers_name}."
    out = {}
    for name, entry in modules.items():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index.isdigit():
                if int(index) not in new_index:
                    continue
                name = f"{prefix}{new_index[int(index)]}" + (f".{rest}" if rest else "")
                entry = {**entry, "tied": [{**t, "name": _renumber_name(t["name"], prefix, new_index)} for t in entry.get("tied", [])]}
        out[name] = entry
    return out


def _renumber_name(name: str, prefix: str, new_index: dict[int, int]) -> str:
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    if not index.isdigit() or int(index) not in new_index:
        return name
    return f"{prefix}{new_index[int(index)]}" + (f".{rest}" if rest else "")


def set_tie_word_embeddings(model: nn.Module, value: bool) -> None:
    """Set tie_word_embeddings on the config (and its text config) and refresh transformers' tie mapping."""
    configs = [model.config]
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None and text_config is not model.config:
        configs.append(text_config)
    for config in configs:
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = value
    if hasattr(model, "get_expanded_tied_weights_keys") and hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def module_entries(model, the_plan: CompressionPlan) -> dict[str, dict[str, Any]]:
    """The saved plan of each factorized module (plus its embedding padding_idx)."""
    entries = the_plan.module_plans()
    for name, entry in entries.items():
        padding_idx = getattr(model.get_submodule(name), "padding_idx", None)
        if padding_idx is not None:
            entry["padding_idx"] = padding_idx
    return entries


def record_plan(model, the_plan: CompressionPlan, entries: dict[str, dict[str, Any]], before: int, after: int) -> None:
    """Record what compress did in `model.config.kroncompress`: the section of config.json that
    save_compressed writes and load_compressed rebuilds the modules from (per-module plans, blocks
    dropped, the tied head, the recipe). A model compressed twice accumulates both."""
    from kroncompress import __version__

    section = dict(getattr(model.config, CONFIG_KEY, None) or {})
    modules = {**section.get("modules", {}), **entries}
    structural = list(section.get("structural", []))
    for row in the_plan.rows:
        if row.structural:
            modules = renumber(modules, row.name, row.plan.spec["keep"])
            structural.append({"name": row.name, "strategy": row.strategy, "spec": jsonable(row.plan.spec)})
    tied_head = section.get("tied_head")
    heads = [t for row in the_plan.rows for t in row.tied if t["as"] == "head"]
    if heads:
        embedding_name = next(name for name, entry in modules.items() if entry.get("tied"))
        tied_head = {"head": heads[0]["name"], "embedding": embedding_name,
                     "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", True))}
        # The checkpoint needs this: with tie_word_embeddings true, transformers would re-tie lm_head to a
        # dense embedding weight that no longer exists (on tie_weights(), save_pretrained, from_pretrained)
        # and expect lm_head.weight in the file. The original value is kept in `tied_head` for to_dense.
        set_tie_word_embeddings(model, False)
    recipe = the_plan.source
    section.update({
        "format_version": FORMAT_VERSION, "kroncompress_version": __version__,
        "recipe": recipe.to_dict() if recipe is not None else section.get("recipe"),
        "modules": modules, "structural": structural, "tied_head": tied_head,
        "params_before": section.get("params_before", before), "params_after": after,
    })
    setattr(model.config, CONFIG_KEY, section)
