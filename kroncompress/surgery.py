"""Model surgery: match a recipe's targets to modules, plan each one, and swap in the compressed modules.

    plan = kc.plan(model, recipe)        # dry run: shapes and parameter counts, works on the meta device
    report = kc.compress(model, plan)    # decompose and swap in place; per-module rows and totals
    report = kc.compress(model, recipe)  # the same in one call (plans, then compresses that plan)

With calibration the order is plan -> calibrate(plan) -> compress(model, plan, calibration=stats): the
plan says which modules need statistics, and compress uses that very plan.

Targets are matched against the full dotted names of the model's modules (see `kroncompress.recipe`).
Compressible modules are nn.Linear, GPT-2's Conv1D and nn.Embedding (exact classes, or subclasses that
keep their forward); structural strategies (`layerdrop`) target the nn.ModuleList of blocks. The first
rule that matches a module wins. A weight shared by several modules (GPT-2's wte and lm_head) is compressed
once, through the embedding: the head becomes a KroneckerTiedHead that computes logits from the same
factors, and the tie survives save/load.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kroncompress.aliases import aliases_for
from kroncompress.layers.kronecker import KroneckerTiedHead
from kroncompress.budget import allocate_recipe
from kroncompress.linalg.refit import CrossMoments, cross_output_error
from kroncompress.refit import refit_layer
from kroncompress.recipe import Recipe, RecipeError, Rule, as_recipe, match_pattern, pattern_kind
from kroncompress.strategies import LayerPlan, OptionError, Strategy, StructuralStrategy, get_strategy
from kroncompress.plans import (  # noqa: F401  (re-exported: the plan and report types live with the saved section)
    CONFIG_KEY, FORMAT_VERSION, CompressionPlan, CompressionReport, PlanRow, ReportRow, jsonable, module_entries,
    record_plan, renumber, set_tie_word_embeddings,
)
from kroncompress.strategies.base import replacement, weight_and_bias



# -- what a module is ------------------------------------------------------------------------------

def module_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'embedding', 'layers' (an nn.ModuleList of blocks), or None (not compressible)."""
    if type(module) is Conv1D:
        return "conv1d"
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Embedding) and (type(module).forward is nn.Embedding.forward or embedding_scale(module) is not None):
        return "embedding"
    if isinstance(module, nn.ModuleList):
        return "layers"
    return None


def embedding_scale(module: nn.Module) -> float | None:
    """The constant a transformers `*ScaledWordEmbedding` (Gemma, BART, M2M100, ...) multiplies its rows by
    (`embed_scale`, sqrt(d) in Gemma), or None for any other module. Its replacement keeps the scale; a tied
    head does not use it."""
    if not (isinstance(module, nn.Embedding) and type(module).__name__.endswith("ScaledWordEmbedding")):
        return None
    scale = getattr(module, "scalar_embed_scale", None)  # a float; embed_scale may still be on the meta device
    scale = getattr(module, "embed_scale", None) if scale is None else scale
    if isinstance(scale, torch.Tensor):
        scale = None if _is_meta(scale) else float(scale)
    return float(scale) if isinstance(scale, (int, float)) else None


def count_params(model: nn.Module) -> int:
    """Parameters of the model, each shared (tied) Parameter counted once; a factor stored as integers
    (kc.quantize) counts its entries."""
    from kroncompress.layers.quantized import QuantizedTensor

    return sum(p.numel() for p in model.parameters()) + sum(m.numel for m in model.modules() if isinstance(m, QuantizedTensor))


def _is_meta(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta"


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def install(model: nn.Module, name: str, new: nn.Module, tied: list[dict[str, Any]] = ()) -> None:
    """Put `new` in place of the module `name`, and give every module that shared its weight (`tied`:
    {"name", "as": "head" | "alias"}) its tied replacement. The one routine that swaps modules, used by
    compress and load_compressed. A scaled embedding's scale carries over to `new` (see embedding_scale)."""
    scale = embedding_scale(model.get_submodule(name))
    if scale is not None and scale != 1.0:
        if not hasattr(new, "scale"):
            raise ValueError(f"{name} is a {type(model.get_submodule(name)).__name__} (rows scaled by {scale:g}); "
                             f"its replacement {type(new).__name__} cannot keep the scale")
        new.scale = scale
    set_submodule(model, name, new)
    for tie in tied:
        old = model.get_submodule(tie["name"])
        set_submodule(model, tie["name"], tied_replacement(new, tie["as"], getattr(old, "bias", None)))


def _weight_sharers(model: nn.Module) -> dict[int, list[str]]:
    """id(weight Parameter) -> names of the modules whose `.weight` it is (tied weights have several)."""
    sharers: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if name and weight is not None:
            names = sharers.setdefault(id(weight), [])
            if name not in names:
                names.append(name)
    return sharers


# -- the plan --------------------------------------------------------------------------------------

def _closest(text: str, names: list[str]) -> str:
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.0)
    return ", ".join(close) if close else "(the model has no named modules)"


def _ignored(name: str, module: nn.Module, recipe: Recipe, aliases: dict) -> bool:
    """Whether the module, or a module containing it, matches the recipe's ignore list."""
    if not recipe.ignore:
        return False
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
    return recipe.is_ignored(name, module, aliases) or any(recipe.is_ignored(p, None, aliases) for p in prefixes)


def _match_rule(rule, modules: list[tuple[str, nn.Module]], recipe: Recipe, aliases: dict,
                strategy_cls: type[Strategy], model_type: str) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) of the modules the rule selects; errors for patterns that select nothing usable."""
    names = [n for n, _ in modules]
    selected: dict[str, tuple[nn.Module, str]] = {}
    for i, pattern in enumerate(rule.targets):
        where = f"{recipe.source}: compress[{rule.index}].targets[{i}]"
        if pattern_kind(pattern) == "role" and pattern[5:] not in aliases:
            known = ", ".join(sorted(aliases)) or "none (no aliases for this architecture; use globs or regexes)"
            raise RecipeError(f"{where}: role {pattern[5:]!r} is not defined for model type {model_type!r}; known roles: {known}")
        matched = [(n, m) for n, m in modules if match_pattern(pattern, n, m, aliases)]
        if not matched:
            raise RecipeError(f"{where}: pattern {pattern!r} matches no module; closest module names: {_closest(pattern.removeprefix('re:'), names)}")
        usable = [(n, m) for n, m in matched if not _ignored(n, m, recipe, aliases)]
        if not usable:
            shown = ", ".join(n for n, _ in matched[:3])
            raise RecipeError(f"{where}: pattern {pattern!r} matches only ignored modules ({shown}); remove it or drop them from ignore")
        supported = [(n, m, module_kind(m)) for n, m in usable if module_kind(m) in strategy_cls.kinds]
        if not supported:
            n, m = usable[0]
            if strategy_cls.kinds == ("layers",):
                fix = "target the nn.ModuleList of blocks, e.g. role:layers"
            elif next(m.children(), None) is not None:
                fix = f"target the layers inside it, e.g. {n}.*"
            else:
                fix = "target nn.Linear, Conv1D or nn.Embedding modules"
            raise RecipeError(f"{where}: pattern {pattern!r} matches {n} ({type(m).__name__}), which strategy "
                              f"{rule.strategy!r} cannot compress; it compresses {', '.join(strategy_cls.kinds)} modules; {fix}")
        for n, m, kind in supported:
            selected.setdefault(n, (m, kind))
    return [(n, m, kind) for n, (m, kind) in selected.items()]


def _stats_for(calibration, name: str, tied=()):
    """A module's statistics: its input second moment, or for an embedding its token counts paired with
    the second moment of the head tied to it (`tied`: the plan row's ties)."""
    if calibration is None or name not in calibration:
        return None
    return calibration.for_module(name, [tie["name"] for tie in tied if tie["as"] == "head"])


def plan(model: nn.Module, recipe: Recipe | str, calibration=None) -> CompressionPlan:
    """Dry run: which module gets which strategy, factor shapes/ranks and parameter counts.

    Needs only shapes, so the model may live on the meta device
    (`with torch.device("meta"): model = AutoModelForCausalLM.from_config(config)`). With real weights,
    strategies that choose shapes from the weights (kronecker with `ratio`) use them, as `compress` will;
    with `calibration` (`kroncompress.calibration.CalibrationStats`) they rank shapes by output error.
    Raises RecipeError for a target that matches no module (naming the 3 closest module names), only
    ignored modules, or only modules the strategy cannot compress, and for options a module's shape
    cannot satisfy (naming the module and the recipe field, e.g. compress[1].options.ratio).
    """
    recipe = as_recipe(recipe)
    aliases = aliases_for(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    modules = [(n, m) for n, m in model.named_modules() if n]
    sharers = _weight_sharers(model)
    budgeted, allocation = allocate_recipe(model, recipe, calibration) if recipe.budget is not None else ({}, None)
    rows: dict[str, PlanRow] = {}
    for rule in recipe.compress:
        strategy_cls = get_strategy(rule.strategy)
        strategies: dict[int, Strategy] = {}  # one instance per parsed config (the rule's, each override's)
        for name, module, kind in _match_rule(rule, modules, recipe, aliases, strategy_cls, model_type):
            if name in rows or (name in budgeted and budgeted[name] is None):  # first rule wins; or kept dense
                if name in rows and rows[name].rule != rule.index:
                    rows[name].note = _join(rows[name].note, f"also matched by compress[{rule.index}] (first rule wins)")
                continue
            if name in budgeted:
                row = _plan_budgeted(model, name, module, kind, rule, budgeted[name], sharers, calibration, recipe)
                row.note = _join(row.note, f"budget: {allocation['modules'][name]['choice']}")
                rows[name] = row
                continue
            config = rule.config_for(name, module, aliases)
            strategy = strategies.setdefault(id(config), strategy_cls(config=config))
            if calibration is not None:
                calibration.check_model(model, [name])
            try:
                row = _plan_module(model, name, module, kind, strategy, sharers, _stats_for(calibration, name))
            except OptionError as exc:
                raise RecipeError(f"{recipe.source}: {rule.option_path(name, module, aliases, exc.field)}: module {name}: "
                                  f"{exc.problem}") from None
            row.options, row.rule = rule.options_for(name, module, aliases), rule.index
            rows[name] = row
    ordered = list(rows.values())
    ordered, skipped = _drop_rows_inside_dropped_blocks(ordered)
    before = count_params(model)
    after = before - sum(r.plan.params_before - r.plan.params_after for r in ordered)
    from kroncompress.quantization import plan_bytes

    bytes_before, bytes_after = plan_bytes(model, ordered, recipe.quantize)
    notes = [note for rule in recipe.compress for i, pattern in enumerate(rule.targets)
             for note in _unmatched_alternatives(pattern, [n for n, _ in modules], f"compress[{rule.index}].targets[{i}]",
                                                 model_type)]
    return CompressionPlan(rows=ordered, params_before=before, params_after=after, recipe=recipe.name,
                           model_type=model_type, skipped=skipped, source=recipe, calibrated=calibration is not None,
                           bytes_before=bytes_before, bytes_after=bytes_after, allocation=allocation,
                           notes=notes, blocks=block_list_sizes(model, [r.name for r in ordered]))


def _plan_budgeted(model, name, module, kind, rule, picked, sharers, calibration, recipe) -> PlanRow:
    """The row of a module whose size the recipe's budget chose: `picked` = (strategy, options)."""
    strategy_name, options = picked
    config = Rule(targets=[name], strategy=strategy_name, options=options).config
    strategy = get_strategy(strategy_name)(config=config)
    if calibration is not None:
        calibration.check_model(model, [name])
    try:
        row = _plan_module(model, name, module, kind, strategy, sharers, _stats_for(calibration, name))
    except OptionError as exc:
        raise RecipeError(f"{recipe.source}: budget: module {name}: {exc.problem}") from None
    row.options, row.rule = options, rule.index
    return row


_NUMBERS = re.compile(r"\((\d+(?:\|\d+)+)\)")  # a regex group of numbers, e.g. (1|3|5|7|9|11): block indices


def _unmatched_alternatives(pattern: str, names: list[str], where: str, model_type: str) -> list[str]:
    """For a `re:` target with a group of numbers, a note naming the numbers that select no module of this
    model (kn-gpt2's blocks 1|3|5|7|9|11 on a 6-block model compress only 1, 3 and 5), else nothing."""
    if pattern_kind(pattern) != "regex":
        return []
    body, notes = pattern[3:], []
    for group in _NUMBERS.finditer(body):
        numbers = group.group(1).split("|")
        present = [n for n in numbers
                   if any(re.fullmatch(f"{body[:group.start()]}({n}){body[group.end():]}", name) for name in names)]
        missing = [n for n in numbers if n not in present]
        if missing and present:
            notes.append(f"{where} names {'|'.join(numbers)}, but this {model_type or 'model'} has no module for "
                         f"{', '.join(missing)}: only {', '.join(present)} {'is' if len(present) == 1 else 'are'} compressed")
    return notes


def block_list_sizes(model: nn.Module, names: list[str]) -> dict[str, int]:
    """{name: length} of the block lists (nn.ModuleList) that the compressed modules sit in."""
    out: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                prefix = ".".join(parts[:i])
                if prefix not in out:
                    try:
                        container = model.get_submodule(prefix)
                    except AttributeError:
                        break
                    if isinstance(container, (nn.ModuleList, nn.Sequential)):
                        out[prefix] = len(container)
                break
    return out


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _module_stats(strategy: Strategy, kind: str, stats):
    """The statistics a strategy receives for a module: only when it declares it uses them for that kind."""
    return stats if stats is not None and strategy.uses_calibration and strategy.wants_statistics(kind) else None


def _plan_layer(strategy: Strategy, module: nn.Module, kind: str, stats=None) -> LayerPlan:
    if isinstance(strategy, StructuralStrategy):
        return strategy.plan_layers([sum(p.numel() for p in block.parameters()) for block in module])
    weight, bias = weight_and_bias(module, kind)
    usable = None if _is_meta(weight) else weight.detach()
    stats = _module_stats(strategy, kind, stats) if usable is not None else None
    try:
        return strategy.plan(tuple(weight.shape), kind, weight=usable, bias=bias is not None, stats=stats)
    except OptionError:
        raise
    except ValueError as exc:  # a strategy's own check without a field: point at the rule's options
        raise OptionError(strategy.name, None, str(exc)) from None


def _plan_module(model, name, module, kind, strategy: Strategy, sharers, stats=None) -> PlanRow:
    layer_plan = _plan_layer(strategy, module, kind, stats)
    if isinstance(strategy, StructuralStrategy):
        return PlanRow(name, strategy.name, {}, layer_plan, 0, config=strategy.config, impl=strategy)
    _check_reduces(name, strategy, layer_plan)
    tied, note = [], ""
    others = [n for n in sharers.get(id(module.weight), []) if n != name]
    for other in others:
        other_kind = module_kind(model.get_submodule(other))
        if kind == "embedding" and other_kind == "linear":
            tied.append({"name": other, "as": "head"})
            note = _join(note, f"{other} is tied to it: logits go through the same factors")
        elif kind == "embedding" and other_kind == "embedding":
            tied.append({"name": other, "as": "alias"})
        else:
            raise RecipeError(
                f"{name} shares its weight with {other} (tied weights); compressing it alone would untie them. "
                f"Compress the embedding instead (the tied head follows it), or add {name!r} to ignore"
            )
    return PlanRow(name, strategy.name, {}, layer_plan, 0, tied=tied, note=note, config=strategy.config, impl=strategy)


def _check_reduces(name: str, strategy: Strategy, layer_plan: LayerPlan) -> None:
    """A factor as large as the weight (a Kronecker A or B of 1 x 1) is the weight itself plus one scalar:
    refused, with the fix. Any other plan that keeps at least the weight's parameters (a full-rank SVD, an
    exact but larger factorisation) is allowed, with a warning: it changes the structure, not the size."""
    spec = layer_plan.spec
    whole = [key for key in ("a_shape", "b_shape") if isinstance(spec.get(key), (list, tuple)) and all(d == 1 for d in spec[key])]
    if whole or layer_plan.params_after < layer_plan.params_before:
        if whole:
            other = "b_shape" if whole[0] == "a_shape" else "a_shape"
            raise OptionError(strategy.name, other if getattr(strategy.config, other, None) is not None else whole[0], (
                f"module {name}: {other} {list(spec[other])} is the whole {' x '.join(map(str, layer_plan.shape))} "
                f"weight ({whole[0]} {list(spec[whole[0]])}), so the plan keeps {layer_plan.params_after:,} parameters "
                f"of {layer_plan.params_before:,}: it does not compress it; pick a b_shape strictly inside the weight's "
                "shape (e.g. ratio: 2 picks one), or leave the module out of the rule's targets"))
        return
    warnings.warn(f"plan: module {name}: {jsonable(spec)} keeps {layer_plan.params_after:,} parameters of the "
                  f"weight's {layer_plan.params_before:,}: it does not compress it (pick a smaller rank or larger "
                  "factors)", UserWarning, stacklevel=4)


def _drop_rows_inside_dropped_blocks(rows: list[PlanRow]) -> tuple[list[PlanRow], list[str]]:
    dropped_prefixes = []
    for row in rows:
        if row.plan.kind == "layers":
            keep = set(row.plan.spec["keep"])
            dropped_prefixes += [f"{row.name}.{i}." for i in range(row.plan.spec["num_layers"]) if i not in keep]
    kept, skipped = [], []
    for row in rows:
        if row.plan.kind != "layers" and any(row.name.startswith(p) for p in dropped_prefixes):
            skipped.append(row.name)
        else:
            kept.append(row)
    return kept, skipped


# -- compress --------------------------------------------------------------------------------------

def compress(model: nn.Module, recipe: "CompressionPlan | Recipe | str",
             progress: Callable[[int, int, str], None] | None = None, calibration=None,
             refit: bool | None = None, sequential=None) -> CompressionReport:
    """Compress `model` in place following a plan (from `kc.plan`) or a recipe; returns a per-module report.

    Each target is decomposed by its strategy and replaced by the strategy's drop-in module. With
    `calibration` (a `CalibrationStats` from `kc.calibrate`), strategies with a data-aware init (kronecker
    `init: als`, svd `init: whitened`, or `auto`) use each module's input second moment and the report
    gives each module's output error; without it they fall back to weight-only init with a warning;
    tied heads follow their embedding; structural strategies (layerdrop) run last. `progress`, if given,
    is called as progress(done, total, module_name) after each module. With statistics, `refit` (default:
    the recipe's `calibration.refit`, else on) re-solves the free factor of each low-rank and Kronecker
    module by least squares on them (kroncompress.refit); the report gives the output error before and after.
    `sequential` (a `kroncompress.sequential.SequentialStatistics`) compresses the modules group by group in
    forward order, each on statistics taken with the modules before it already compressed.

    A plan made without statistics and compressed with them has its data-aware rows' shapes re-chosen
    with the statistics (what `kc.plan(model, recipe, calibration)` would give); every other row is
    compressed exactly as planned. The plan is recorded in `model.config.kroncompress`, the section of
    config.json that `load_compressed` rebuilds the structure from. `kc.compress` (kroncompress.hf) also
    marks the model as a kroncompress checkpoint, so its own save_pretrained writes a loadable folder.
    """
    start = time.perf_counter()
    if any(_is_meta(p) for p in model.parameters()):
        raise ValueError("compress needs the model's weights, but it lives on the meta device; load it with "
                         "from_pretrained (kc.plan works on meta models)")
    if isinstance(recipe, CompressionPlan) and recipe.allocation is not None and calibration is not None \
            and not recipe.calibrated:
        the_plan = plan(model, recipe.source, calibration)  # the budget's preview, allocated anew on the statistics
    elif isinstance(recipe, CompressionPlan):
        the_plan = _with_statistics(model, recipe, calibration) if calibration is not None and not recipe.calibrated else recipe
    else:
        the_plan = plan(model, recipe, calibration)
    from kroncompress.quantization import weight_bytes

    before, bytes_before = count_params(model), weight_bytes(model)
    entries = module_entries(model, the_plan)  # before blocks are dropped: the names are the plan's
    factor_rows = [r for r in the_plan.rows if not r.structural]
    structural_rows = [r for r in the_plan.rows if r.structural]
    check_statistics(model, factor_rows, calibration, will_calibrate=sequential is not None)
    if sequential is None:
        _warn_weight_only(factor_rows, calibration)
    if refit is None:
        section = the_plan.source.calibration if the_plan.source is not None else None
        refit = section.refit if section is not None else True
    total, report_rows = len(the_plan.rows), []
    cross: dict[str, Any] = {}
    ordered, groups = factor_rows, {}
    if sequential is not None:
        group_list = sequential.groups([r.name for r in factor_rows if r.plan.kind != "embedding"])
        groups = {name: group for group in group_list for name in group}
        rank = {name: i for i, name in enumerate(n for g in group_list for n in g)}
        ordered = sorted(factor_rows, key=lambda r: rank.get(r.name, -1))  # ungrouped (embeddings) first
    for row in ordered + structural_rows:
        t0 = time.perf_counter()
        if row.structural:
            row.strategy_impl.apply(model, row.name, row.plan)
            errors, note, before_refit = (None, None), row.plan.note, None
        else:
            if row.name in groups and row.name not in cross:
                cross.update(sequential.collect(model, groups[row.name]))
            moments = cross.pop(row.name, None)
            errors, note, before_refit = _compress_row(model, row, calibration, refit, moments)
        report_rows.append(ReportRow(row.name, row.strategy, row.plan.kind, jsonable(row.plan.spec),
                                     row.plan.params_before, row.plan.params_after, errors[0],
                                     time.perf_counter() - t0, note, errors[1], before_refit))
        if progress is not None:
            progress(len(report_rows), total, row.name)
    after = count_params(model)
    if hasattr(model, "config"):
        record_plan(model, the_plan, entries, before, after)
    return CompressionReport(report_rows, before, after, time.perf_counter() - start, the_plan.recipe,
                             bytes_before=bytes_before, bytes_after=weight_bytes(model),
                             allocation=the_plan.allocation, compressed=the_plan.compressed, notes=list(the_plan.notes))


def _compress_row(model: nn.Module, row: PlanRow, calibration, refit: bool, moments=None):
    """Swap one module; ((weight error, output error), note, output error before the refit or None).

    `moments`: the module's sequential CrossMoments (its init then sees the student's inputs, and the refit
    aims at the teacher's outputs); else its parallel statistics, if any."""
    stats = moments.ss if moments is not None else _stats_for(calibration, row.name, row.tied)
    original = weight_and_bias(model.get_submodule(row.name), row.plan.kind)[0].detach().clone() \
        if isinstance(stats, torch.Tensor) else None
    done = _swap_module(model, row, stats)
    errors, note = (done.error, done.output_error), _join(row.plan.note, row.note, done.init and f"init {done.init}")
    if original is None:
        return errors, note, None
    layer = model.get_submodule(row.name)
    target = moments if moments is not None else CrossMoments.parallel(stats)
    errors = (done.error, cross_output_error(original, layer.dense_weight().detach(), target))
    if moments is not None:
        note = _join(note, "sequential statistics")
    refitted = refit_layer(layer, original, target) if refit else None
    if refitted is None:
        return errors, note, None
    before, after = refitted
    return (_weight_error(layer, original), after), _join(note, f"refit: output error {before:.4g} -> {after:.4g}"), before


def _weight_error(layer: nn.Module, original: torch.Tensor) -> float:
    approx = layer.dense_weight().detach().to(torch.float32)
    reference = original.to(torch.float32)
    return float((approx - reference).norm() / reference.norm().clamp_min(1e-30))


def _with_statistics(model: nn.Module, the_plan: CompressionPlan, calibration) -> CompressionPlan:
    """The plan with each data-aware row re-planned with its statistics (the shape search ranks by output error)."""
    rows = []
    for row in the_plan.rows:
        stats = _stats_for(calibration, row.name)
        if not row.structural and _module_stats(row.strategy_impl, row.plan.kind, stats) is not None:
            module = model.get_submodule(row.name)
            row = dataclasses.replace(row, plan=_plan_layer(row.strategy_impl, module, row.plan.kind, stats))
        rows.append(row)
    after = the_plan.params_before - sum(r.plan.params_before - r.plan.params_after for r in rows)
    return dataclasses.replace(the_plan, rows=rows, params_after=after, calibrated=True)


def check_statistics(model: nn.Module, rows: list[PlanRow], calibration, will_calibrate: bool = False) -> None:
    """Raise ValueError, naming the module, unless the statistics fit the plan: given statistics fit the model
    (`CalibrationStats.check_model`) and cover every module whose init uses them (statistics of another recipe
    would silently leave those weight-only); without statistics (and no calibration pass to come,
    `will_calibrate`), no module asks explicitly for a data-aware init (`init: whitened` / `als`)."""
    wanting = [row for row in rows if not row.structural
               and _module_stats(row.strategy_impl, row.plan.kind, True) is not None]
    if calibration is not None:
        calibration.check_model(model, [row.name for row in rows])
        uncovered = [row.name for row in wanting if _stats_for(calibration, row.name) is None]
        if uncovered:
            source = f" in {calibration.path}" if getattr(calibration, "path", None) is not None else ""
            covered = calibration.modules
            shown = ", ".join(covered[:3]) + (f" and {len(covered) - 3} more" if len(covered) > 3 else "")
            raise ValueError(f"calibration: the statistics{source} have no tokens for {uncovered[0]!r}"
                             + (f" (and {len(uncovered) - 1} more modules)" if len(uncovered) > 1 else "")
                             + f", which the recipe initialises from statistics; they cover {shown or 'no module'}: "
                             "they were collected for another recipe or model. Calibrate this model with this "
                             "recipe (kroncompress calibrate MODEL --recipe R / kc.calibrate), or set init: svd / nkp")
        return
    if will_calibrate:
        return
    explicit = [row for row in wanting if getattr(row.strategy_impl.config, "init", "auto") != "auto"]
    if explicit:
        row = explicit[0]
        raise ValueError(f"module {row.name}: {row.strategy} init: {row.strategy_impl.config.init} needs calibration "
                         "statistics, and none were given: add a `calibration:` section to the recipe, pass "
                         "--calibration-data or --calibration-stats (calibration= in Python), or use init: auto "
                         "(weight-only with a warning when there are none)")


def _warn_weight_only(rows: list[PlanRow], calibration) -> None:
    """Warn once when rules ask for a data-aware init (or auto) but their modules have no statistics."""
    missing = [row.name for row in rows
               if _module_stats(row.strategy_impl, row.plan.kind, True) is not None and _stats_for(calibration, row.name) is None]
    if not missing:
        return
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    why = "no calibration data was given" if calibration is None else "the calibration statistics do not cover them"
    warnings.warn(
        f"compress: {why}, so {shown} use weight-only initialisation (nkp / svd). Data-aware initialisation "
        "(ALS, whitened SVD) is usually far better before distillation: pass calibration=kc.calibrate(...), "
        "add a `calibration:` section to the recipe or --calibration-data on the command line, or set "
        "init: nkp / svd to silence this (see docs/dataaware.md)", UserWarning, stacklevel=3)


def _swap_module(model: nn.Module, row: PlanRow, stats: torch.Tensor | None = None):
    """Decompose, build and install one module (and its tied sharers); returns the base.Replacement."""
    module = model.get_submodule(row.name)
    kind = module_kind(module)
    weight, _ = weight_and_bias(module, row.plan.kind) if kind == row.plan.kind else (None, None)
    if weight is None or tuple(weight.shape) != tuple(row.plan.shape):
        raise ValueError(f"compress: the plan's {row.name} is a {row.plan.kind} of shape {tuple(row.plan.shape)}, but "
                         f"the model's is {type(module).__name__}"
                         + (f" of shape {tuple(weight.shape)}" if weight is not None else "")
                         + "; plan this model (kc.plan(model, recipe)) and compress it with that plan")
    strategy = row.strategy_impl
    done = replacement(strategy, module, row.plan, _module_stats(strategy, row.plan.kind, stats))
    install(model, row.name, done.module, row.tied)
    return done


def tied_replacement(embedding: nn.Module, role: str, bias: nn.Parameter | None = None) -> nn.Module:
    """The module replacing one that shared a weight with `embedding`: the same module ('alias') or a tied head."""
    if role == "alias":
        return embedding
    if not hasattr(embedding, "project"):
        raise ValueError(f"{type(embedding).__name__} has no project(); a tied LM head cannot share its factors")
    head = KroneckerTiedHead(embedding)
    head.bias = bias  # the same Parameter: keeps ties such as BERT's decoder.bias == predictions.bias
    return head
