"""The runs: each a list of stages over one run record, run in order (llm-compressor's oneshot reads the
same way: pre-process, modifiers, post-process).

    COMPRESS       kroncompress compress       kc.run_pipeline
    COMPRESS_TASK  kroncompress compress-task  kc.tasks.run_task_pipeline
    CALIBRATE      kroncompress calibrate      run_calibration

A stage is a function of the run record (kroncompress.pipeline.record.Run); the stages live one per module
(load, plan, evaluate, calibrate, compress, distill, save, report) and serve every run: a stage asks the
record whether it holds a language-model run's text or a task's examples where the two differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from kroncompress.pipeline.calibrate import calibrate, require_calibration
from kroncompress.pipeline.compress import compress, quantize
from kroncompress.pipeline.distill import distill
from kroncompress.pipeline.evaluate import evaluate, speed
from kroncompress.pipeline.load import check_language_model, keep_teacher, load, load_task, load_text
from kroncompress.pipeline.plan import check_statistics, plan
from kroncompress.pipeline.record import Run
from kroncompress.pipeline.report import report
from kroncompress.pipeline.save import save
from kroncompress.pipeline.settings import CalibrationSettings, PipelineSettings, TaskSettings

Stage = Callable[[Run], None]


def check_output(run: Run) -> None:
    """The output folder may be written: a path that cannot destroy anything (no link, home, root or current
    folder), new, empty, or replaced / resumed as the settings allow (nothing of the user's is ever deleted)."""
    from kroncompress.outputs import check_output_path, check_output_state

    settings = run.settings
    settings.output_dir = check_output_path(settings.output_dir)
    check_output_state(settings.output_dir, overwrite=settings.overwrite, resume=settings.resume)


COMPRESS: tuple[Stage, ...] = (
    check_output, load, check_language_model, plan, check_statistics, load_text, evaluate("teacher"), speed("teacher"), keep_teacher,
    calibrate, compress, evaluate("compressed"), distill, evaluate("distilled"), quantize, evaluate("quantized"),
    speed("compressed"), report, save,
)
COMPRESS_TASK: tuple[Stage, ...] = (
    check_output, load_task, plan, evaluate("teacher"), keep_teacher, calibrate, compress, evaluate("compressed"),
    distill, evaluate("distilled"), report, save,
)
CALIBRATE: tuple[Stage, ...] = (load, plan, require_calibration, calibrate)


def run(settings: Any, stages: Sequence[Stage]) -> Run:
    """Run `stages` in order on a fresh record of `settings`; returns the record."""
    record = Run(settings)
    for stage in stages:
        stage(record)
    return record


def run_stages(settings: PipelineSettings) -> dict[str, Any]:
    """The `kroncompress compress` run of a PipelineSettings; returns the report (see `run_pipeline`)."""
    return run(settings, COMPRESS).report


def run_pipeline(model_name_or_path: str | os.PathLike, recipe: Any, output_dir: str | os.PathLike, *,
                 data: Any = None, max_steps: int | None = None, resume: bool = False, overwrite: bool = False,
                 progress: bool | None = None, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 compress_progress: Callable[[int, int, str], None] | None = None,
                 calibration_data: Any = None, calibration_tokens: int | None = None,
                 calibration_progress: Callable[[int, int], None] | None = None, calibration_stats: Any = None,
                 measure_speed: bool = True, distill: bool = True, tokenizer: Any = None,
                 training_args: dict[str, Any] | None = None, eval_tokens: int | None = None,
                 eval_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Run every stage the recipe has on a model and save the result in `output_dir`; returns the report.

    `model_name_or_path` may also be a model object (an nn.Module / PreTrainedModel, compressed in place),
    as llm-compressor's `oneshot(model, recipe, dataset)` takes it.
    `tokenizer` (an object, a folder written by save_pretrained, or a hub id) tokenises every text of the run
    and is saved into `output_dir`; it must fit the model's embedding. Without it: the model folder's, else
    the fallbacks of `kc.load_model` (a model object: the one saved with its `name_or_path`).
    `data` overrides the recipe's distillation text: a packaged corpus name, a file path/glob, a hub
    dataset name (`name` or `name:config`), a dict of data keys, a DataConfig, a `datasets.Dataset` /
    `IterableDataset` (column "text"), a list of strings or token ids (see kroncompress.distill.data); it then also provides
    the perplexity text (its validation part). `max_steps` caps the distillation steps. `resume=True`
    continues an interrupted run from `<output_dir>/checkpoints`; `overwrite=True` replaces a finished
    folder (or an unfinished run's checkpoints). Under torchrun / accelerate launch every process
    compresses and distils; only the main process evaluates and writes. `device` (default: the
    process's GPU, else CPU) and `dtype` are where and how the model is loaded; `compress_progress` is
    passed to `kc.compress` as its per-module progress callback; `cache_dir` holds tokenised text.
    Data-aware initialisation runs when the recipe has a `calibration` section or `calibration_data` is
    given (`calibration_tokens` overrides the section's count). `calibration_stats` (a `CalibrationStats`, or
    the path of a file `stats.save` or `kroncompress calibrate` wrote) replaces the calibration pass: a file is
    checked (header) at once and loaded, and checked against the model's modules, right after planning;
    report.json's `calibration.file` names it. It excludes `calibration_data` and `calibration_tokens`.
    With `measure_speed`, forward throughput
    (tokens/s, 8 sequences) of the original and the final model is recorded under `speed`.
    `distill=False` skips the recipe's distillation stage (decompose, evaluate and save only).
    `training_args` (e.g. `{"report_to": ["tensorboard"], "logging_steps": 5}`) are passed to the
    distillation's TrainingArguments over the recipe's `distill.train.training_args`.
    `eval_tokens` caps the token ids every perplexity stage scores (teacher, compressed, distilled; over
    the recipe's `evaluate.perplexity.max_tokens`, and for the held-out part of `data` too);
    `eval_progress(windows done, windows, stage)` is called after each of their forward passes.
    The same run from a `PipelineSettings`: `run_stages(settings)`.

    The output folder is a `save_compressed` folder (config.json, model.safetensors, recipe.yaml, README.md,
    tokenizer) whose report.json also carries `perplexity`, `distill` (steps, losses, validation history)
    and `timings`; plus perplexity.png (validation perplexity over the distillation steps, the teacher's as
    a horizontal line) when matplotlib is installed (the `plot` extra). While distillation runs, checkpoints live in
    `<output>/checkpoints`; `resume=True` continues from the newest one; the finished folder replaces them.
    """
    return run_stages(PipelineSettings(
        model_name_or_path, recipe, Path(output_dir), data=data, max_steps=max_steps, resume=resume,
        overwrite=overwrite, progress=progress, cache_dir=cache_dir, device=device, dtype=dtype,
        compress_progress=compress_progress, calibration_data=calibration_data, calibration_tokens=calibration_tokens,
        calibration_progress=calibration_progress, calibration_stats=calibration_stats, measure_speed=measure_speed,
        distill=distill, tokenizer=tokenizer,
        training_args=training_args, eval_tokens=eval_tokens, eval_progress=eval_progress))


def run_task_pipeline(model: Any, recipe: Any, output_dir: str | os.PathLike, *, task: Any = None, data: Any = None,
                      tokenizer: Any = None, max_steps: int | None = None, distill: bool = True,
                      calibration_tokens: int | None = None, eval_every: int | None = None, overwrite: bool = False,
                      device: str | torch.device | None = None, max_examples: int | None = None,
                      max_eval_examples: int | None = None) -> dict[str, Any]:
    """Compress a fine-tuned model with `recipe`, distil it on the task and save it in `output_dir`.

        report = run_task_pipeline("runs/bert-sst2", "kron-task", "runs/kron-sst2", task="sst2", data="glue/sst2")
        report["scores"]   # {"teacher": {...}, "compressed": {...}, "distilled": {...}}, each with "score"

    `model`: a folder of a model fine-tuned on the task (e.g. by `finetune`), or a *ForSequenceClassification
    module with `tokenizer`. `tokenizer` (an object, a folder or a hub id) replaces the folder's and is saved
    with the result; it must fit the model's embedding. `task` / `data`: as for `load_task`; the task
    defaults to the recipe's `task` section, else the task.json `finetune` saved next to the model; the data
    to the section's `data`. A task recipe is an ordinary recipe plus a `task:` section (the TaskSpec fields
    and optionally `data:`); arguments given here win over it. Data-aware initialisation runs when the recipe
    has a `calibration` section, on the task's own training text (`calibration_tokens` or the section's
    `tokens`). `max_steps` caps the distillation steps; `distill=False` stops after compressing. `max_examples`
    keeps the first examples of every split; `max_eval_examples` scores each evaluation split on a seeded
    sample of that many examples (`cap_eval_splits`: the same examples for the teacher, the compressed and the
    distilled model, and on every run), recorded in the report with the split sizes it was drawn from.

    Returns the report (also in report.json, which holds `task`, `scores`, `distill` (steps, loss terms, the
    score history) and `timings`); the output folder is a `save_compressed` folder (reloads with
    `kc.load_compressed`) plus task.json (the spec, labels included) and score.png (the score over the
    distillation steps, the teacher's as a line).
    """
    settings = TaskSettings(model, recipe, output_dir, task=task, data=data, tokenizer=tokenizer, max_steps=max_steps,
                            distill=distill, calibration_tokens=calibration_tokens, eval_every=eval_every,
                            overwrite=overwrite, device=device, max_examples=max_examples,
                            max_eval_examples=max_eval_examples)
    return run(settings, COMPRESS_TASK).report


def run_calibration(model: Any, recipe: Any, *, calibration_data: Any = None, tokens: int | None = None,
                    tokenizer: Any = None, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, progress: Callable[[int, int], None] | None = None,
                    cache_dir: str | os.PathLike | None = None):
    """`kroncompress calibrate`'s run: load `model` (a name, path or model object), plan `recipe` on it and
    return the CalibrationStats of the plan's data-aware modules, so they can be saved once and reused by many
    runs (`run_pipeline(..., calibration_stats=file)`):

        stats = run_calibration("path/to/gpt2", "kn-gpt2-mlp", calibration_data="shakespeare", tokens=16384)
        stats.save("gpt2.calibration.safetensors")

    The model is loaded and planned as `run_pipeline` does, and the same text is read (the explicit data, else
    the recipe's `calibration.data`, else its `distill.data`, else the packaged corpus), so the statistics equal
    those a `compress` run without `data` would collect. Raises ValueError when the recipe has no data-aware
    module or there is no tokenizer.
    """
    settings = CalibrationSettings(model, recipe, calibration_data=calibration_data, calibration_tokens=tokens,
                                   tokenizer=tokenizer, device=device, dtype=dtype, calibration_progress=progress,
                                   cache_dir=cache_dir)
    return run(settings, CALIBRATE).stats
