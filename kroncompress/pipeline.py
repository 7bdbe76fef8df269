"""The whole `kroncompress compress` run: load -> evaluate -> compress -> evaluate -> distill -> evaluate -> save.

    report = kc.run_pipeline("path/to/gpt2", "kn-gpt2", "runs/kn-gpt2", data="shakespeare", max_steps=300)
    report["perplexity"]   # {"teacher": {...}, "compressed": {...}, "distilled": {...}}, each with its protocol

The output folder is a `save_compressed` folder (config.json, model.safetensors, recipe.yaml, README.md,
tokenizer) whose report.json also carries `perplexity`, `distill` (steps, losses, validation history)
and `timings`; plus perplexity.png (validation perplexity over the distillation steps, the teacher's as a
horizontal line) when matplotlib is installed (the `plot` extra). While distillation runs, checkpoints live in
`<output>/checkpoints`; `resume=True` continues from the newest one; the finished folder replaces them.

Perplexity protocol: `kroncompress.evaluate.evaluate_perplexity` (what `kroncompress eval` runs) on the recipe's
`evaluate.perplexity` text (dataset, block size, stride) when no `data` override is given; otherwise on the
override's test split (else validation split), as `kroncompress eval --data` scores it; text with a single
split is scored on validation blocks held out from the distillation data. Block size and stride: the
recipe's (a block size beyond the model's positions is clipped to them, the stride keeping its ratio to the
block).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kroncompress.pipeline_data import (  # noqa: F401  (_calibration_data, _merged_data: also used by the tests)
    _calibration_data, _distill_config, _DistillData, _merged_data, _positions, _Scorer,
)
from kroncompress.pipeline_distill import CHECKPOINTS, EVALS_PER_RUN, TRAINING_EVAL_BLOCKS, _distill  # noqa: F401  (re-exported)
from kroncompress.pipeline_model import (
    SPEED_BATCH, _check_language_model, _load, _source_name, _speed, _speed_len, _teacher,
)
from kroncompress.models import TOKENIZER_HINT
from kroncompress.pipeline_output import _card, _hub_dataset, _plot, _save, _write_report  # noqa: F401  (_hub_dataset: tests)

logger = logging.getLogger(__name__)

PLOT_NAME = "perplexity.png"


@dataclass
class PipelineSettings:
    """Everything a `kroncompress compress` run is told (the keyword arguments of `run_pipeline`)."""

    model: Any  # a name or path, or a model object (nn.Module / PreTrainedModel), compressed in place
    recipe: Any  # a Recipe (a name, path or dict is loaded once, in __post_init__)
    output_dir: Path
    data: Any = None
    max_steps: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None
    cache_dir: str | os.PathLike | None = None
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    compress_progress: Callable[[int, int, str], None] | None = None
    calibration_data: Any = None
    calibration_tokens: int | None = None
    calibration_progress: Callable[[int, int], None] | None = None
    calibration_stats: Any = None  # saved statistics (a CalibrationStats or its file) instead of a calibration pass
    measure_speed: bool = True
    distill: bool = True
    tokenizer: Any = None
    training_args: dict[str, Any] | None = None
    eval_tokens: int | None = None  # cap on the ids each perplexity stage scores (over the recipe's max_tokens)
    eval_progress: Callable[[int, int, str], None] | None = None  # (windows done, windows, stage) per forward

    def __post_init__(self):
        from kroncompress.surgery import as_recipe

        self.recipe = as_recipe(self.recipe)
        self.output_dir = Path(self.output_dir)
        self.device = torch.device(self.device) if self.device is not None else _default_device()
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.training_args:  # a misspelt key or integration stops the run here, before the model loads
            from kroncompress.distill.trainer import check_training_args

            check_training_args(self.training_args)
        if self.eval_tokens is not None and self.eval_tokens < 2:
            raise ValueError(f"eval_tokens must be >= 2 (one token and its context), got {self.eval_tokens}")
        if self.calibration_stats is not None:
            _check_calibration_stats(self.calibration_stats, self.calibration_data, self.calibration_tokens)

    @property
    def main(self) -> bool:
        """Whether this is the process that evaluates and writes (rank 0 under torchrun)."""
        return int(os.environ.get("RANK", "0")) == 0

    @property
    def calibrates(self) -> bool:
        return (self.recipe.calibration is not None or self.calibration_data is not None
                or self.calibration_stats is not None)


@dataclass
class _Run:
    """What the stages hand each other."""

    settings: PipelineSettings
    timings: dict[str, float] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    plan: Any = None
    distill_config: Any = None
    data: "_DistillData | None" = None
    score: "_Scorer | None" = None
    teacher: Any = None
    sequential: Any = None  # kroncompress.sequential.SequentialStatistics when calibration.sequential is set
    stats: Any = None
    calibration: dict | None = None
    compression: Any = None
    distill_summary: dict | None = None
    quantization: dict | None = None  # kc.quantize's summary, when the recipe has a `quantize` section
    perplexity: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str):
        return _Stopwatch(self.timings)(name)


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
    the perplexity text (its test split, else validation split: see the module docs). `max_steps` caps the distillation steps. `resume=True`
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
    the recipe's `evaluate.perplexity.max_tokens`, and for the held-out text of `data` too);
    `eval_progress(windows done, windows, stage)` is called after each of their forward passes.
    The same run from a `PipelineSettings`: `run_stages(settings)`.
    """
    return run_stages(PipelineSettings(
        model_name_or_path, recipe, Path(output_dir), data=data, max_steps=max_steps, resume=resume,
        overwrite=overwrite, progress=progress, cache_dir=cache_dir, device=device, dtype=dtype,
        compress_progress=compress_progress, calibration_data=calibration_data, calibration_tokens=calibration_tokens,
        calibration_progress=calibration_progress, calibration_stats=calibration_stats, measure_speed=measure_speed,
        distill=distill, tokenizer=tokenizer,
        training_args=training_args, eval_tokens=eval_tokens, eval_progress=eval_progress))


def run_stages(settings: PipelineSettings) -> dict[str, Any]:
    """load -> plan -> evaluate teacher -> calibrate -> compress -> evaluate -> distill -> evaluate -> save.

    The plan comes right after loading, so a recipe error that needs the model (a target matching
    nothing, a shape that does not divide) is raised before any expensive stage; the same plan is then
    calibrated and compressed."""
    _check_output(settings.output_dir, resume=settings.resume, overwrite=settings.overwrite)
    run = _Run(settings)
    _load_stage(run)
    _evaluate_stage(run, "teacher", speed=True)
    if run.distill_config is not None:
        run.teacher = _teacher(run.model, run.distill_config.teacher, settings.device)
    _calibrate_stage(run)
    with run.stage("compress"):
        from kroncompress.surgery import compress

        run.compression = compress(run.model, run.plan, progress=settings.compress_progress, calibration=run.stats,
                                   sequential=run.sequential)
    run.stats = run.sequential = None  # the statistics can be large: free them before distillation
    _evaluate_stage(run, "compressed")
    if run.distill_config is not None:
        _distill_stage(run)
        _evaluate_stage(run, "distilled")
    run.teacher = None
    if settings.recipe.quantize is not None:  # last: the factors train in float, then are stored as integers
        with run.stage("quantize"):
            from kroncompress.quantization import quantize

            options = settings.recipe.quantize
            run.quantization = quantize(run.model, options.bits, options.group_size, dense=options.dense).to_dict()
            run.compression.bytes_after = run.quantization["bytes_after"]
        _evaluate_stage(run, "quantized")
    if settings.measure_speed and settings.main:
        _speed_stage(run, "compressed")
    return _save_stage(run)


def _load_stage(run: _Run) -> None:
    """Load the model and tokenizer, plan the recipe on it, and set up the data and the scoring protocol."""
    from kroncompress.surgery import check_statistics, plan

    settings = run.settings
    with run.stage("load"):
        run.model, run.tokenizer = _load(settings.model, settings.device, settings.dtype, settings.tokenizer)
    _check_language_model(run.model, _source_name(settings.model))
    with run.stage("plan"):
        run.plan = plan(run.model, settings.recipe)
    if settings.calibration_stats is not None:  # a damaged file or another model's statistics: before any expensive stage
        run.stats = load_calibration_stats(settings.calibration_stats, settings.device)
    # statistics of another recipe, or an explicit data-aware init without any: before any expensive stage
    check_statistics(run.model, run.plan.rows, run.stats, will_calibrate=settings.calibrates)
    # built with distillation off too: its data settings block the held-out text the same way either way
    config = _distill_config(settings.recipe, settings.data, settings.max_steps, settings.training_args)
    run.distill_config = config if settings.distill else None
    limit = _positions(run.model)
    run.data = _DistillData(config, settings.data, run.tokenizer, settings.cache_dir, limit, distills=settings.distill)
    run.score = _Scorer(settings.recipe, settings.data, run.data, run.tokenizer, settings.cache_dir, limit,
                        settings.eval_tokens, settings.eval_progress)


def _evaluate_stage(run: _Run, name: str, speed: bool = False) -> None:
    with run.stage(f"evaluate_{name}"):
        if run.settings.main:
            run.perplexity[name] = run.score(run.model, name)
    if speed and run.settings.measure_speed and run.settings.main:
        _speed_stage(run, name)


def _speed_stage(run: _Run, name: str) -> None:
    with run.stage(f"speed_{name}"):
        run.speed[f"{name}_tokens_per_s"] = _speed(run.model)
    if name != "teacher":
        run.speed["ratio"] = round(run.speed[f"{name}_tokens_per_s"] / run.speed["teacher_tokens_per_s"], 3)
        run.speed["protocol"] = f"forward, {SPEED_BATCH} sequences x {_speed_len(run.model)} tokens, median of 10"


def _calibrate_stage(run: _Run) -> None:
    """Input statistics of the plan's data-aware modules, when the recipe or the run asks for calibration
    (saved statistics were loaded with the plan: only described here)."""
    from kroncompress.calibration import calibrate, describe

    settings = run.settings
    if run.stats is not None:  # saved statistics, loaded with the plan
        run.calibration = describe(run.stats)
        if run.stats.path is not None:
            run.calibration["file"] = str(run.stats.path)
        return
    if not settings.calibrates:
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
        text = _calibration_data(settings.recipe, settings.calibration_data, settings.data)
        run.stats = calibrate(run.model, run.plan, run.tokenizer, data=text, tokens=settings.calibration_tokens,
                              progress=settings.calibration_progress, cache_dir=settings.cache_dir)
    run.calibration = describe(run.stats)
    section = settings.recipe.calibration
    if section is not None and section.sequential:
        from kroncompress.calibration import calibration_blocks
        from kroncompress.sequential import SequentialStatistics

        blocks = calibration_blocks(run.model, run.plan, run.tokenizer, data=text, tokens=settings.calibration_tokens,
                                    cache_dir=settings.cache_dir)
        original = run.teacher if run.teacher is not None and run.distill_config.teacher == "original" \
            else _teacher(run.model, "original", settings.device)
        run.sequential = SequentialStatistics(original, blocks, damping=section.damping)
        run.calibration["sequential"] = True


def _distill_stage(run: _Run) -> None:
    settings = run.settings
    with run.stage("distill"):
        run.distill_summary = _distill(run.model, run.teacher, run.distill_config, run.data, settings.output_dir,
                                       recipe=settings.recipe, resume=settings.resume, overwrite=settings.overwrite,
                                       progress=settings.progress, main=settings.main, max_tokens=run.score.max_tokens)


def _save_stage(run: _Run) -> dict[str, Any]:
    settings, compression = run.settings, run.compression
    report = {
        "model": _source_name(settings.model), "recipe": settings.recipe.name, "output_dir": str(settings.output_dir),
        "params_before": compression.params_before, "params_after": compression.params_after,
        "perplexity": run.perplexity, "distill": run.distill_summary, "timings": run.timings, "speed": run.speed,
        "calibration": run.calibration, "tokenizer": _tokenizer_source(run.tokenizer),
        "compression": compression.to_dict(),  # per-module rows (report.json has them under "report")
        "bytes_before": compression.bytes_before, "bytes_after": compression.bytes_after,
        "quantization": run.quantization,
    }
    if not settings.main:
        return report

    def finish(folder: Path) -> None:  # into the temporary folder: part of the atomic save
        report["plot"] = _plot(folder / PLOT_NAME, run.distill_summary, run.perplexity)
        _write_report(folder, report)

    with run.stage("save"):
        _save(run.model, settings.output_dir, settings.recipe, compression, run.tokenizer, report, card=_card(run),
              extra=finish)
    return report


# -- helpers ---------------------------------------------------------------------------------------

class _Stopwatch:
    """`with stage("name"):` adds the block's wall time, in seconds, to `timings["name"]`."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)


def _tokenizer_source(tokenizer) -> str | None:
    """Where the run's tokenizer came from (it is saved into the output folder too); None without one."""
    from kroncompress.models import tokenizer_name

    return tokenizer_name(tokenizer) if tokenizer is not None else None


def load_calibration_stats(stats: Any, device: str | torch.device | None = None):
    """`stats` as a CalibrationStats: a CalibrationStats as it is, a path loaded (onto `device`, default: the
    run's default device) with every field checked."""
    from kroncompress.calibration import CalibrationStats

    if isinstance(stats, CalibrationStats):
        return stats
    return CalibrationStats.load(stats, device=device if device is not None else _default_device())


def _check_calibration_stats(stats: Any, data: Any, tokens: int | None) -> None:
    """Saved statistics exclude a calibration pass; a file's header is checked before the model loads."""
    from kroncompress.calibration import CalibrationStats

    if not isinstance(stats, (CalibrationStats, str, os.PathLike)):
        raise TypeError(f"calibration_stats: expected a CalibrationStats or the path of a saved one, got {type(stats).__name__}")
    if data is not None or tokens is not None:
        given = "calibration_data" if data is not None else "calibration_tokens"
        raise ValueError(f"calibration_stats and {given} exclude each other: the statistics were collected already; "
                         f"drop {given}, or drop calibration_stats to calibrate in this run")
    if isinstance(stats, (str, os.PathLike)):
        from kroncompress.io.calibration import check_calibration_file

        check_calibration_file(stats)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _check_output(target: Path, *, resume: bool, overwrite: bool) -> None:
    from kroncompress.outputs import check_output_path, check_output_state

    check_output_state(check_output_path(target), overwrite=overwrite, resume=resume)
