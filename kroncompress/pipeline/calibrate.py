"""The calibrate stage: the input statistics of the plan's data-aware modules, for data-aware initialisation.

A language-model run reads its calibration text (`calibration_data`, else the recipe's `calibration.data`,
else the run's own text); a task run its training examples, each one sequence as the model will see it.
Saved statistics (loaded by the plan stage) are only described here. `kroncompress calibrate` is this stage
on its own, after `require_calibration`, so its statistics equal those a `compress` run without `data`
would collect.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from kroncompress.models import TOKENIZER_HINT
from kroncompress.pipeline.record import Run
from kroncompress.pipeline.text import calibration_text


def calibrate(run: Run) -> None:
    from kroncompress.calibration import calibrate as collect_text, describe

    settings = run.settings
    if run.stats is not None:  # saved statistics, loaded with the plan
        run.calibration = describe(run.stats)
        if run.stats.path is not None:
            run.calibration["file"] = str(run.stats.path)
        return
    if not settings.calibrates:
        return
    if run.task is not None:
        with run.stage("calibrate"):
            run.stats = calibrate_on_task(run.model, run.plan, run.tokenizer, run.task,
                                          tokens=settings.calibration_tokens, section=settings.recipe.calibration)
        return
    if run.tokenizer is None:
        if settings.calibration_data is not None:
            raise ValueError(f"data-aware initialisation needs the model's tokenizer, but none was found next "
                             f"to the model; {TOKENIZER_HINT}, save the tokenizer with the model, or drop the "
                             "calibration data")
        warnings.warn(f"recipe {settings.recipe.name!r} asks for calibration, but the model has no tokenizer: "
                      f"weight-only initialisation instead ({TOKENIZER_HINT}, or save the tokenizer next to the model)")
        return
    with run.stage("calibrate"):
        text = calibration_text(settings.recipe, settings.calibration_data, settings.data)
        run.stats = collect_text(run.model, run.plan, run.tokenizer, data=text, tokens=settings.calibration_tokens,
                                 progress=settings.calibration_progress, cache_dir=settings.cache_dir)
    run.calibration = describe(run.stats)
    section = settings.recipe.calibration
    if section is not None and section.sequential and run.text is not None:  # the compress run: as modules are compressed
        from kroncompress.calibration import calibration_blocks
        from kroncompress.sequential import SequentialStatistics

        blocks = calibration_blocks(run.model, run.plan, run.tokenizer, data=text, tokens=settings.calibration_tokens,
                                    cache_dir=settings.cache_dir)
        original = run.teacher if run.teacher is not None and run.text.config.teacher == "original" \
            else copy.deepcopy(run.model)
        run.sequential = SequentialStatistics(original, blocks, damping=section.damping)
        run.calibration["sequential"] = True


def require_calibration(run: Run) -> None:
    """A run whose whole point is the statistics: the plan must have a data-aware module and the model a
    tokenizer."""
    from kroncompress.calibration import calibration_targets

    recipe = run.settings.recipe
    if not calibration_targets(run.model, run.plan):
        raise ValueError(f"recipe {recipe.name!r} compresses no module with a data-aware strategy (none of its "
                         "strategies uses calibration statistics), so there is nothing to calibrate; use a recipe "
                         "with e.g. kronecker or svd targets")
    if run.tokenizer is None:
        raise ValueError(f"calibration needs the model's tokenizer, but none was found next to the model; "
                         f"{TOKENIZER_HINT}, or save the tokenizer with the model")


def calibrate_on_task(model: torch.nn.Module, recipe: Any, tokenizer: Any, data: Any, *,
                      tokens: int | None = None, section: Any = None):
    """Input statistics of the data-aware targets of `recipe` (a recipe, or its CompressionPlan from
    `kc.plan`, then with the recipe's calibration `section`) from the task's own training examples (each
    example one sequence, as the model will see it), up to `tokens` tokens (default: `calibration.tokens`)."""
    from kroncompress.calibration import calibration_targets, collect_statistics
    from kroncompress.surgery import CompressionPlan
    from kroncompress.surgery import plan as plan_model
    from kroncompress.tasks.modeling import encode

    planned = recipe if isinstance(recipe, CompressionPlan) else plan_model(model, recipe)
    section = section if section is not None else planned.source.calibration
    budget = int(tokens or section.tokens)
    encoded = encode(data.train, tokenizer, data.spec.max_length)
    blocks, examples, total = [], [], 0
    for item in encoded:
        if total >= budget:
            break
        ids = torch.tensor(item["input_ids"], dtype=torch.long)
        blocks.append(ids)
        examples.append(item)
        total += ids.numel()
    names = calibration_targets(model, planned)
    if not names:
        return None
    stats = collect_statistics(model, blocks, names, damping=section.damping)
    budget_section = planned.source.budget if planned.source is not None else None
    if budget_section is not None and budget_section.sensitivity == "measured":
        # the Fisher weight of the task's own loss on the gold labels, from the same examples
        from kroncompress.sensitivity import measure_sensitivity
        from kroncompress.tasks.loss import summed_task_loss

        stats.sensitivity = measure_sensitivity(model, examples, planned.allocation["group"],
                                                loss=summed_task_loss(data.spec.kind == "regression"))
    return stats
