"""The evaluate stage: every evaluation of a run under one protocol (teacher, compressed, distilled), and the
forward throughput a language-model run records.

Perplexity protocol (a language-model run, `Scorer`): `kroncompress.evaluate.evaluate_perplexity` (what
`kroncompress eval` runs) on the recipe's `evaluate.perplexity` text when no `data` override is given; otherwise
on the override's test split (else validation split), as `kroncompress eval --data` scores it; only text with a
single split is scored on the validation blocks held out from the distillation data. Block size, stride and
`max_tokens` are the recipe's (a block size beyond the model's positions is clipped to them, the stride keeping
its ratio to the block). A task run scores the task's metrics on its evaluation split(s)
(`kroncompress.tasks.modeling.evaluate_task`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from kroncompress.pipeline.record import Run
from kroncompress.pipeline.text import RunText, clip_block, data_override

logger = logging.getLogger("kroncompress.pipeline")

SPEED_BATCH = 8


def evaluate(name: str) -> Callable[[Run], None]:
    """The stage that scores the run's model as `name` ("teacher", "compressed", "distilled", "quantized"); the
    distilled model only when the run distilled, the quantized one only when it was quantized."""

    def evaluate_stage(run: Run) -> None:
        if (name == "distilled" and not run.distills) or (name == "quantized" and run.quantization is None):
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
    """Perplexity under one protocol for every stage, `kroncompress.evaluate.evaluate_perplexity` (what
    `kroncompress eval` runs): the recipe's `evaluate.perplexity` text when there is no data override, else
    the override's held-out split (test, else validation: what `kroncompress eval --data` scores by
    default); only text with a single split (files, in-memory data) is scored on the validation blocks
    held out from the distillation data, which `kroncompress eval` cannot know."""

    def __init__(self, recipe, data, distill_data: RunText, tokenizer, cache_dir, limit: int | None,
                 max_tokens: int | None = None, progress: Callable[[int, int, str], None] | None = None):
        spec = recipe.evaluate.perplexity if recipe.evaluate is not None else None
        self.spec = spec if data is None else None
        self.data = data
        self._held_out: tuple | None = None
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
        elif self.tokenizer is not None and self.held_out()[1] is not None:
            # the override as `kroncompress eval --data` reads it: its own text settings, BOS as the tokenizer adds it
            spec, split = self.held_out()
            result = evaluate_perplexity(model, self.tokenizer, spec, split=split, block_size=self.block_size,
                                         stride=self.stride, max_tokens=self.max_tokens, cache_dir=self.cache_dir,
                                         progress=bar)
            text = spec.describe(split) + (f" ({split})" if spec.kind == "files" else "")  # files: a split folder's
        elif self.distill_data.available:
            validation, bos = self.distill_data.blocks()[1], self.distill_data.bos
            # BOS-led blocks: their text as one stream again, every window led by BOS (BOS is never scored)
            ids = (validation if bos is None else validation[:, 1:]).reshape(-1)
            result = perplexity(model, ids, block_size=self.block_size, stride=self.stride, max_tokens=self.max_tokens,
                                progress=bar, bos_token_id=bos)
            text = "validation blocks held out from the distillation data (the text has no test or validation split)"
        else:
            logger.info("no evaluate.perplexity and no data: %s perplexity not measured", stage)
            return None
        out = {**result.to_dict(), "data": text, "seconds": round(time.perf_counter() - start, 3)}
        logger.info("%s: %s", stage, result)
        return out

    def held_out(self) -> tuple[Any, str | None]:
        """(the override's text spec, its held-out split or None), worked out once."""
        if self._held_out is None:
            from kroncompress.distill.data import held_out_split, in_memory, text_spec

            if self.data is None or in_memory(self.data):
                self._held_out = (None, None)
            else:
                spec = text_spec(data_override(self.data))
                self._held_out = (spec, held_out_split(spec))
        return self._held_out


def describe_spec(spec) -> str:
    if spec.dataset:
        return f"{spec.dataset}" + (f":{spec.config}" if spec.config else "") + f" [{spec.split}]"
    if spec.files:
        return ", ".join(spec.files)
    return f"{spec.source or 'default corpus'} [{spec.split}]"
