"""The evaluate stage: every evaluation of a run under one protocol (teacher, compressed, distilled), and the
forward throughput a language-model run records.

Perplexity protocol (a language-model run): the recipe's `evaluate.perplexity` (dataset, block size, stride)
when it has one and no `data` override is given; otherwise the held-out validation text of the distillation
data, scored with the recipe's block size, stride and `max_tokens` (a block size beyond the model's positions
is clipped to them, the stride keeping its ratio to the block). A task run scores the task's metrics on its
evaluation split(s) (`kroncompress.tasks.modeling.evaluate_task`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from kroncompress.pipeline.record import Run
from kroncompress.pipeline.text import RunText, clip_block

logger = logging.getLogger("kroncompress.pipeline")

SPEED_BATCH = 8


def evaluate(name: str) -> Callable[[Run], None]:
    """The stage that scores the run's model as `name` ("teacher", "compressed", "distilled"); the distilled
    model is scored only when the run distilled."""

    def evaluate_stage(run: Run) -> None:
        if name == "distilled" and not run.distills:
            return
        with run.stage(f"evaluate_{name}"):
            if run.task is not None:
                from kroncompress.tasks.modeling import evaluate_task

                run.scores[name] = evaluate_task(run.model, run.tokenizer, run.task)
            elif run.settings.main:
                run.scores[name] = run.scorer(run.model, name)

    evaluate_stage.__name__ = f"evaluate_{name}"
    return evaluate_stage


def speed(name: str) -> Callable[[Run], None]:
    """The stage that measures forward throughput (`measure_speed`), on the main process only; after the
    teacher's, the ratio and the protocol."""

    def speed_stage(run: Run) -> None:
        if not (run.settings.measure_speed and run.settings.main):
            return
        with run.stage(f"speed_{name}"):
            run.speed[f"{name}_tokens_per_s"] = throughput(run.model)
        if name != "teacher":
            run.speed["ratio"] = round(run.speed[f"{name}_tokens_per_s"] / run.speed["teacher_tokens_per_s"], 3)
            run.speed["protocol"] = f"forward, {SPEED_BATCH} sequences x {speed_length(run.model)} tokens, median of 10"

    speed_stage.__name__ = f"speed_{name}"
    return speed_stage


def speed_length(model) -> int:
    from kroncompress.evaluate import max_positions

    return min(128, max_positions(model) or 128)


def throughput(model) -> float:
    from kroncompress.evaluate import throughput as measure

    return round(measure(model, batch_size=SPEED_BATCH, seq_len=speed_length(model)), 1)


class Scorer:
    """Perplexity under one protocol for every stage: the recipe's `evaluate.perplexity` when there is no
    data override, else the validation blocks of the distillation data."""

    def __init__(self, recipe, data, distill_data: RunText, tokenizer, cache_dir, limit: int | None,
                 max_tokens: int | None = None, progress: Callable[[int, int, str], None] | None = None):
        spec = recipe.evaluate.perplexity if recipe.evaluate is not None else None
        self.spec = spec if data is None else None
        self.distill_data, self.tokenizer, self.cache_dir = distill_data, tokenizer, cache_dir
        self.block_size = clip_block(spec.block_size if spec is not None else distill_data.block_size, limit)
        # a clipped block keeps the protocol's stride / block ratio (1024/512 on a 64-position model: 64/32)
        ratio = spec.stride / spec.block_size if spec is not None else 0.5
        self.stride = max(1, min(self.block_size, round(self.block_size * ratio)))
        # the cap on the ids scored, in every stage and whichever text: the run's (eval_tokens), else the recipe's
        self.max_tokens = max_tokens if max_tokens is not None else spec.max_tokens if spec is not None else None
        self.progress = progress

    def __call__(self, model, stage: str) -> dict[str, Any] | None:
        from kroncompress.evaluate import evaluate_perplexity, perplexity

        start = time.perf_counter()
        bar = (lambda done, total: self.progress(done, total, stage)) if self.progress is not None else None
        if self.tokenizer is None and not self.distill_data.distilling:
            logger.warning("the model has no tokenizer: %s perplexity not measured", stage)
            return None
        if self.spec is not None:
            result = evaluate_perplexity(model, self.tokenizer, self.spec, block_size=self.block_size, stride=self.stride,
                                         max_tokens=self.max_tokens, cache_dir=self.cache_dir, progress=bar)
            text = describe_spec(self.spec)
        elif self.distill_data.available:
            validation, bos = self.distill_data.blocks()[1], self.distill_data.bos
            # BOS-led blocks: their text as one stream again, every window led by BOS (BOS is never scored)
            ids = (validation if bos is None else validation[:, 1:]).reshape(-1)
            result = perplexity(model, ids, block_size=self.block_size, stride=self.stride, max_tokens=self.max_tokens,
                                progress=bar, bos_token_id=bos)
            text = "validation part of the distillation data"
        else:
            logger.info("no evaluate.perplexity and no data: %s perplexity not measured", stage)
            return None
        out = {**result.to_dict(), "data": text, "seconds": round(time.perf_counter() - start, 3)}
        logger.info("%s: %s", stage, result)
        return out


def describe_spec(spec) -> str:
    if spec.dataset:
        return f"{spec.dataset}" + (f":{spec.config}" if spec.config else "") + f" [{spec.split}]"
    if spec.files:
        return ", ".join(spec.files)
    return f"{spec.source or 'default corpus'} [{spec.split}]"
