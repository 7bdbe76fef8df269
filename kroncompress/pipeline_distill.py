"""The distillation stage of a `kroncompress compress` run: the evaluation cadence, the checkpoints folder,
the engine call and the summary the report keeps (see kroncompress.pipeline for the whole run)."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any

from kroncompress.pipeline_data import _DistillData

CHECKPOINTS = "checkpoints"
EVALS_PER_RUN = 10  # validation points on the plot when the recipe gives no train.eval_every
TRAINING_EVAL_BLOCKS = 64  # the periodic evaluations during distillation score the first blocks of that sample


def _eval_every(config, train_blocks: int) -> int:
    """train.eval_every, else about EVALS_PER_RUN evaluations over the run."""
    train = config.train
    if train.eval_every:
        return train.eval_every
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = math.ceil(train_blocks / (train.batch_size * world)) // train.grad_accum or 1
    steps = train.max_steps or max(1, math.ceil(per_epoch * train.epochs))
    return max(1, steps // EVALS_PER_RUN)


def _distill(model, teacher, config, data: _DistillData, target: Path, *, recipe, resume: bool, overwrite: bool,
             progress: bool | None, main: bool, max_tokens: int | None = None) -> dict[str, Any]:
    from kroncompress.distill.checkpoints import fingerprint
    from kroncompress.distill.trainer import distill
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
    config.train = dataclasses.replace(config.train, eval_every=_eval_every(config, len(train)))
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
