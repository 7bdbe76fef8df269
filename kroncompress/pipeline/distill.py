"""The distill stage: the compressed student trained in place against the frozen teacher by the one
distillation engine (kroncompress.distill), on the run's text blocks (a language-model run: checkpoints in
`<output>/checkpoints`, resumable) or on the task's labelled examples (a task run: the task's loss head)."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

from kroncompress.pipeline.record import Run
from kroncompress.pipeline.text import RunText

CHECKPOINTS = "checkpoints"
TRAINING_EVAL_BLOCKS = 64  # the periodic evaluations during distillation score the first blocks of that sample


def distill(run: Run) -> None:
    if not run.distills:
        return
    settings = run.settings
    with run.stage("distill"):
        if run.task is not None:
            from kroncompress.tasks.training import distill_task

            run.distill_summary = distill_task(run.model, run.teacher, run.tokenizer, run.task, settings.recipe.distill,
                                               max_steps=settings.max_steps, eval_every=settings.eval_every,
                                               scratch_near=settings.output_dir)
        else:
            run.distill_summary = distill_text(
                run.model, run.teacher, run.text.config, run.text, settings.output_dir, recipe=settings.recipe,
                resume=settings.resume, overwrite=settings.overwrite, progress=settings.progress, main=settings.main,
                max_tokens=run.scorer.max_tokens)
    run.teacher = None


def distill_text(model, teacher, config, data: RunText, target: Path, *, recipe, resume: bool, overwrite: bool,
                 progress: bool | None, main: bool, max_tokens: int | None = None) -> dict[str, Any]:
    """Distil `model` in place on the run's text blocks (checkpoints in `target`/checkpoints); the summary the
    report keeps."""
    from kroncompress.distill.checkpoints import fingerprint
    from kroncompress.distill.trainer import distill, eval_every
    from kroncompress.evaluate import perplexity

    train, validation = data.blocks()
    # the periodic evaluations score at most the recipe's evaluate.perplexity.max_tokens too (a whole block at least)
    cap = TRAINING_EVAL_BLOCKS if max_tokens is None else min(TRAINING_EVAL_BLOCKS, max(1, max_tokens // validation.shape[1]))
    validation = validation[:cap]
    if config.data is not None and not isinstance(config.data.dataset, (str, type(None))):
        from kroncompress.distill.data import text_spec

        # in-memory data: the run records (and a resume compares) its blocks' hash, not the object
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, dataset=text_spec(config.data).describe()))
    config = copy.deepcopy(config)
    config.train = dataclasses.replace(config.train, eval_every=eval_every(config.train, len(train)))
    checkpoints = target / CHECKPOINTS
    if main and overwrite and not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)
    # resume checks the recipe's compression part here; the engine checks the distillation settings itself,
    # leaving out those that may change between sessions (save_every, eval_every, ...)
    layout = {k: v for k, v in recipe.to_dict().items() if k not in ("distill", "evaluate", "description")}
    result = distill(model, teacher, config, train, validation, output_dir=checkpoints, resume=resume,
                     progress=progress, run_settings={"recipe": f"{recipe.name} ({fingerprint(layout)})"})
    summary = result.to_dict()
    summary["block_size"] = int(train.shape[1])
    summary["train_blocks"], summary["validation_blocks"] = int(train.shape[0]), int(validation.shape[0])
    if main and len(validation):
        # the teacher under the in-training protocol (each validation block scored on its own), for the plot
        size = int(validation.shape[1])
        summary["teacher_validation_perplexity"] = perplexity(teacher, validation, block_size=size, stride=size).perplexity
    return summary
