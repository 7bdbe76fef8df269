"""The whole `kroncompress compress` run: load -> evaluate -> compress -> evaluate -> distill -> evaluate -> save.

    report = kc.run_pipeline("path/to/gpt2", "kn-gpt2", "runs/kn-gpt2", data="shakespeare", max_steps=300)
    report["perplexity"]   # {"teacher": {...}, "compressed": {...}, "distilled": {...}}, each with its protocol

The output folder is a `save_compressed` folder (config.json, model.safetensors, recipe.yaml, README.md,
tokenizer) whose report.json also carries `perplexity`, `distill` (steps, losses, validation history)
and `timings`; plus perplexity.png (validation perplexity over the distillation steps, the teacher's as a
horizontal line) when matplotlib is installed. While distillation runs, checkpoints live in
`<output>/checkpoints`; `resume=True` continues from the newest one; the finished folder replaces them.

Perplexity protocol: the recipe's `evaluate.perplexity` (dataset, block size, stride) when it has one
and no `data` override is given; otherwise the held-out validation text of the distillation data,
scored with the recipe's block size and stride (a block size beyond the model's positions is clipped to
them, the stride keeping its ratio to the block).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PLOT_NAME = "perplexity.png"
FALLBACK_VALIDATION_FRACTION = 0.05  # held out when the data has no validation split of its own
EVALS_PER_RUN = 10  # validation points on the plot when the recipe gives no train.eval_every
MAX_VALIDATION_BLOCKS = 256  # validation is a fixed sample of the held-out blocks: evaluating stays cheap
TRAINING_EVAL_BLOCKS = 64  # the periodic evaluations during distillation score the first blocks of that sample
# The held-out split and the validation sample do not follow the training seed: runs that differ only in
# their seed are scored on the same text.
EVALUATION_SEED = 0
# Keys that describe the text itself: a `data` override replaces all of them (a recipe's validation_fraction
# suits its own corpus; the override's own validation split, e.g. Shakespeare's held-out plays, is used instead).
_SOURCE_KEYS = ("dataset", "config", "files", "source", "split", "fraction", "streaming", "validation_fraction")


@dataclass
class PipelineSettings:
    """Everything a `kroncompress compress` run is told (the keyword arguments of `run_pipeline`)."""

    model: str | os.PathLike
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
    measure_speed: bool = True
    distill: bool = True

    def __post_init__(self):
        from kroncompress.surgery import as_recipe

        self.recipe = as_recipe(self.recipe)
        self.output_dir = Path(self.output_dir)
        self.device = torch.device(self.device) if self.device is not None else _default_device()
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    @property
    def main(self) -> bool:
        """Whether this is the process that evaluates and writes (rank 0 under torchrun)."""
        return int(os.environ.get("RANK", "0")) == 0

    @property
    def calibrates(self) -> bool:
        return self.recipe.calibration is not None or self.calibration_data is not None


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
    stats: Any = None
    calibration: dict | None = None
    compression: Any = None
    distill_summary: dict | None = None
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
                 calibration_progress: Callable[[int, int], None] | None = None,
                 measure_speed: bool = True, distill: bool = True) -> dict[str, Any]:
    """Run every stage the recipe has on a model and save the result in `output_dir`; returns the report.

    `data` overrides the recipe's distillation text: a packaged corpus name, a file path/glob, a hub
    dataset name (`name` or `name:config`), a dict of data keys, or a DataConfig; it then also provides
    the perplexity text (its validation part). `max_steps` caps the distillation steps. `resume=True`
    continues an interrupted run from `<output_dir>/checkpoints`; `overwrite=True` replaces a finished
    folder (or an unfinished run's checkpoints). Under torchrun / accelerate launch every process
    compresses and distils; only the main process evaluates and writes. `device` (default: the
    process's GPU, else CPU) and `dtype` are where and how the model is loaded; `compress_progress` is
    passed to `kc.compress` as its per-module progress callback; `cache_dir` holds tokenised text.
    Data-aware initialisation runs when the recipe has a `calibration` section or `calibration_data` is
    given (`calibration_tokens` overrides the section's count). With `measure_speed`, forward throughput
    (tokens/s, 8 sequences) of the original and the final model is recorded under `speed`.
    `distill=False` skips the recipe's distillation stage (decompose, evaluate and save only).
    The same run from a `PipelineSettings`: `run_stages(settings)`.
    """
    return run_stages(PipelineSettings(
        model_name_or_path, recipe, Path(output_dir), data=data, max_steps=max_steps, resume=resume,
        overwrite=overwrite, progress=progress, cache_dir=cache_dir, device=device, dtype=dtype,
        compress_progress=compress_progress, calibration_data=calibration_data, calibration_tokens=calibration_tokens,
        calibration_progress=calibration_progress, measure_speed=measure_speed, distill=distill))


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

        run.compression = compress(run.model, run.plan, progress=settings.compress_progress, calibration=run.stats)
    run.stats = None  # the statistics can be large: free them before distillation
    _evaluate_stage(run, "compressed")
    if run.distill_config is not None:
        _distill_stage(run)
        _evaluate_stage(run, "distilled")
    run.teacher = None
    if settings.measure_speed and settings.main:
        _speed_stage(run, "compressed")
    return _save_stage(run)


def _load_stage(run: _Run) -> None:
    """Load the model and tokenizer, plan the recipe on it, and set up the data and the scoring protocol."""
    from kroncompress.surgery import plan

    settings = run.settings
    with run.stage("load"):
        run.model, run.tokenizer = _load(settings.model, settings.device, settings.dtype)
    with run.stage("plan"):
        run.plan = plan(run.model, settings.recipe)
    run.distill_config = _distill_config(settings.recipe, settings.data, settings.max_steps) if settings.distill else None
    limit = _positions(run.model)
    run.data = _DistillData(run.distill_config, settings.data, run.tokenizer, settings.cache_dir, limit)
    run.score = _Scorer(settings.recipe, settings.data, run.data, run.tokenizer, settings.cache_dir, limit)


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
    """Input statistics of the plan's data-aware modules, when the recipe or the run asks for calibration."""
    from kroncompress.calibration import calibrate, describe

    settings = run.settings
    if not settings.calibrates:
        return
    if run.tokenizer is None:
        if settings.calibration_data is not None:
            raise ValueError("data-aware initialisation needs the model's tokenizer, but none was found next "
                             "to the model; save the tokenizer with it, or drop the calibration data")
        warnings.warn(f"recipe {settings.recipe.name!r} asks for calibration, but the model has no tokenizer: "
                      "weight-only initialisation instead (save the tokenizer next to the model)")
        return
    with run.stage("calibrate"):
        text = _calibration_data(settings.recipe, settings.calibration_data, settings.data)
        run.stats = calibrate(run.model, run.plan, run.tokenizer, data=text, tokens=settings.calibration_tokens,
                              progress=settings.calibration_progress, cache_dir=settings.cache_dir)
    run.calibration = describe(run.stats)


def _distill_stage(run: _Run) -> None:
    settings = run.settings
    with run.stage("distill"):
        run.distill_summary = _distill(run.model, run.teacher, run.distill_config, run.data, settings.output_dir,
                                       resume=settings.resume, overwrite=settings.overwrite,
                                       progress=settings.progress, main=settings.main)


def _save_stage(run: _Run) -> dict[str, Any]:
    settings, compression = run.settings, run.compression
    report = {
        "model": str(settings.model), "recipe": settings.recipe.name, "output_dir": str(settings.output_dir),
        "params_before": compression.params_before, "params_after": compression.params_after,
        "perplexity": run.perplexity, "distill": run.distill_summary, "timings": run.timings, "speed": run.speed,
        "calibration": run.calibration,
        "compression": compression.to_dict(),  # per-module rows (report.json has them under "report")
    }
    if not settings.main:
        return report
    with run.stage("save"):
        _save(run.model, settings.output_dir, settings.recipe, compression, run.tokenizer, report)
    report["plot"] = _plot(settings.output_dir / PLOT_NAME, run.distill_summary, run.perplexity)
    _write_report(settings.output_dir, report)
    return report


SPEED_BATCH = 8


def _speed_len(model) -> int:
    return min(128, _positions(model) or 128)


def _speed(model) -> float:
    from kroncompress.evaluate import throughput

    return round(throughput(model, batch_size=SPEED_BATCH, seq_len=_speed_len(model)), 1)


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


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _check_output(target: Path, *, resume: bool, overwrite: bool) -> None:
    from kroncompress.io import OutputExistsError

    if not target.exists():
        return
    finished = (target / "config.json").is_file()
    if finished and not overwrite:
        raise OutputExistsError(f"output folder {target} already holds a finished run; pass overwrite=True "
                                "(CLI: --overwrite) to replace it, or pick another folder")
    if finished or resume or overwrite or not any(target.iterdir()):
        return
    if (target / CHECKPOINTS).is_dir():
        raise OutputExistsError(f"output folder {target} holds an unfinished run ({CHECKPOINTS}/); pass resume=True "
                                "(CLI: --resume) to continue it, overwrite=True (CLI: --overwrite) to start again, "
                                "or pick another folder")
    raise OutputExistsError(f"output folder {target} already exists and is not empty; pass overwrite=True "
                            "(CLI: --overwrite) to replace it, or pick another folder")


def _load(model_name_or_path, device: torch.device, dtype):
    from kroncompress.models import load_model

    model, info = load_model(model_name_or_path, meta_ok=False, dtype=dtype)
    model.to(device)
    return model, info.tokenizer


def _teacher(model: torch.nn.Module, teacher: str, device: torch.device) -> torch.nn.Module:
    """The frozen teacher: a copy of the model before compression ("original"), or another model."""
    if teacher == "original":
        return copy.deepcopy(model)
    from kroncompress.models import load_model

    other, _ = load_model(teacher, meta_ok=False)
    return other.to(device)


def _distill_config(recipe, data: Any, max_steps: int | None):
    """The recipe's DistillConfig with the data override and step cap applied (None: no distillation)."""
    config = recipe.distill
    if config is None:
        return None
    config = copy.deepcopy(config)
    if data is not None:
        config.data = _merged_data(config.data, data)
    if max_steps is not None:
        config.train = dataclasses.replace(config.train, max_steps=max_steps)
    return config


def _merged_data(base, data: Any):
    """A DataConfig: `base`'s settings (block size, ...) with the text of the `data` override; the
    override replaces every key that describes the text (_SOURCE_KEYS)."""
    from kroncompress.recipe import DataConfig

    override = _data_override(data) if data is not None else {}
    kept = {k: v for k, v in dataclasses.asdict(base).items() if k not in _SOURCE_KEYS} if base is not None else {}
    known = {f.name for f in dataclasses.fields(DataConfig)}
    values = {**kept, **{k: v for k, v in override.items() if k in known}}
    if isinstance(values.get("files"), (str, os.PathLike)):
        values["files"] = [str(values["files"])]
    return DataConfig(**values)


def _calibration_data(recipe, explicit: Any, data: Any) -> Any:
    """Calibration text: given explicitly, else the recipe's calibration.data when it names a source, else
    the run's own text (the `data` override, then the recipe's distillation data)."""
    if explicit is not None:
        return explicit
    section = recipe.calibration.data if recipe.calibration is not None else None
    if section is not None and (section.dataset or section.files or section.source):
        return None  # calibrate() reads the section itself
    if data is not None:
        return data
    distill_data = recipe.distill.data if recipe.distill is not None else None
    if distill_data is not None and (distill_data.dataset or distill_data.files or distill_data.source):
        return distill_data
    return None


def _data_override(data: Any) -> dict[str, Any]:
    from kroncompress.distill.data import parse_data_arg

    if isinstance(data, (str, os.PathLike)):
        return parse_data_arg(str(data))
    if isinstance(data, dict):
        return dict(data)
    if dataclasses.is_dataclass(data):
        return dataclasses.asdict(data)
    raise ValueError(f"data: expected a corpus name, file path/glob, dataset name, dict or DataConfig, got {type(data).__name__}")


def _positions(model) -> int | None:
    from kroncompress.evaluate import max_positions

    return max_positions(model)


def _clip(size: int, limit: int | None) -> int:
    if limit is not None and size > limit:
        logger.info("block size %d exceeds the model's %d positions: using %d", size, limit, limit)
        return limit
    return size


class _DistillData:
    """The distillation text as (train, validation) token blocks, built once (validation: the data's own
    split, else 5% held out, then a fixed sample of at most MAX_VALIDATION_BLOCKS)."""

    def __init__(self, distill_config, data, tokenizer, cache_dir, limit: int | None):
        self.config, self.data, self.tokenizer, self.cache_dir, self.limit = distill_config, data, tokenizer, cache_dir, limit
        self._blocks = None

    @property
    def block_size(self) -> int:
        return _clip(self.config.data.block_size, self.limit) if self.config is not None else 1024

    @property
    def available(self) -> bool:
        return self.config is not None or self.data is not None

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._blocks is None:
            from kroncompress.distill.data import build_datasets, split_blocks

            if self.tokenizer is None:
                raise ValueError("the model has no tokenizer; distillation and perplexity need one: save it next to the "
                                 "model (tokenizer.save_pretrained(folder))")
            data = self.config.data if self.config is not None else _merged_data(None, self.data)
            train, validation = build_datasets(data, self.tokenizer, block_size=self.block_size,
                                               cache_dir=self.cache_dir, seed=EVALUATION_SEED)
            if len(validation) == 0:
                train, validation = split_blocks(train, FALLBACK_VALIDATION_FRACTION, EVALUATION_SEED)
            if len(validation) > MAX_VALIDATION_BLOCKS:
                keep = torch.randperm(len(validation), generator=torch.Generator().manual_seed(EVALUATION_SEED))
                validation = validation[keep[:MAX_VALIDATION_BLOCKS].sort().values]
            self._blocks = (train, validation)
        return self._blocks


class _Scorer:
    """Perplexity under one protocol for every stage: the recipe's `evaluate.perplexity` when there is no
    data override, else the validation blocks of the distillation data."""

    def __init__(self, recipe, data, distill_data: _DistillData, tokenizer, cache_dir, limit: int | None):
        spec = recipe.evaluate.perplexity if recipe.evaluate is not None else None
        self.spec = spec if data is None else None
        self.distill_data, self.tokenizer, self.cache_dir = distill_data, tokenizer, cache_dir
        self.block_size = _clip(spec.block_size if spec is not None else distill_data.block_size, limit)
        # a clipped block keeps the protocol's stride / block ratio (1024/512 on a 64-position model: 64/32)
        ratio = spec.stride / spec.block_size if spec is not None else 0.5
        self.stride = max(1, min(self.block_size, round(self.block_size * ratio)))
        self.max_tokens = spec.max_tokens if spec is not None else None

    def __call__(self, model, stage: str) -> dict[str, Any] | None:
        from kroncompress.evaluate import evaluate_perplexity, perplexity

        start = time.perf_counter()
        if self.tokenizer is None and self.distill_data.config is None:
            logger.warning("the model has no tokenizer: %s perplexity not measured", stage)
            return None
        if self.spec is not None:
            result = evaluate_perplexity(model, self.tokenizer, self.spec, block_size=self.block_size, stride=self.stride,
                                         max_tokens=self.max_tokens, cache_dir=self.cache_dir)
            text = _describe_spec(self.spec)
        elif self.distill_data.available:
            ids = self.distill_data.blocks()[1].reshape(-1)
            result = perplexity(model, ids, block_size=self.block_size, stride=self.stride)
            text = "validation part of the distillation data"
        else:
            logger.info("no evaluate.perplexity and no data: %s perplexity not measured", stage)
            return None
        out = {**result.to_dict(), "data": text, "seconds": round(time.perf_counter() - start, 3)}
        logger.info("%s: %s", stage, result)
        return out


def _describe_spec(spec) -> str:
    if spec.dataset:
        return f"{spec.dataset}" + (f":{spec.config}" if spec.config else "") + f" [{spec.split}]"
    if spec.files:
        return ", ".join(spec.files)
    return f"{spec.source or 'default corpus'} [{spec.split}]"


def _eval_every(config, train_blocks: int) -> int:
    """train.eval_every, else about EVALS_PER_RUN evaluations over the run."""
    train = config.train
    if train.eval_every:
        return train.eval_every
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = math.ceil(train_blocks / (train.batch_size * world)) // train.grad_accum or 1
    steps = train.max_steps or max(1, math.ceil(per_epoch * train.epochs))
    return max(1, steps // EVALS_PER_RUN)


def _distill(model, teacher, config, data: _DistillData, target: Path, *, resume: bool, overwrite: bool,
             progress: bool | None, main: bool) -> dict[str, Any]:
    from kroncompress.distill.trainer import distill
    from kroncompress.evaluate import perplexity

    train, validation = data.blocks()
    validation = validation[:TRAINING_EVAL_BLOCKS]
    config = copy.deepcopy(config)
    config.train = dataclasses.replace(config.train, eval_every=_eval_every(config, len(train)))
    checkpoints = target / CHECKPOINTS
    if main and overwrite and not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)
    result = distill(model, teacher, config, train, validation, output_dir=checkpoints, resume=resume,
                     progress=progress)
    summary = result.to_dict()
    summary["block_size"] = int(train.shape[1])
    summary["train_blocks"], summary["validation_blocks"] = int(train.shape[0]), int(validation.shape[0])
    if main and len(validation):
        # the teacher under the in-training protocol (each validation block scored on its own), for the plot
        size = int(validation.shape[1])
        summary["teacher_validation_perplexity"] = perplexity(teacher, validation, block_size=size, stride=size).perplexity
    return summary


def _save(model, target: Path, recipe, compression, tokenizer, report: dict[str, Any]) -> None:
    from kroncompress.io import save_compressed

    metrics = {}
    for stage, value in report["perplexity"].items():
        if value:
            metrics[f"perplexity {stage}"] = round(value["perplexity"], 4)
    first = next((v for v in report["perplexity"].values() if v), None)
    if first:
        metrics["perplexity protocol"] = f"block {first['block_size']}, stride {first['stride']}, {first['tokens']:,} tokens, {first['data']}"
    if report.get("speed", {}).get("ratio"):
        metrics["forward speed vs original"] = f"{report['speed']['ratio']:.2f}x ({report['speed']['protocol']})"
    if report["distill"]:
        metrics["distill steps"] = report["distill"]["steps"]
        metrics["distill seconds"] = report["distill"]["seconds"]
    save_compressed(model, target, recipe=recipe, report=compression, metrics=metrics, tokenizer=tokenizer,
                    overwrite=True)  # _check_output already refused what must not be replaced


def _write_report(target: Path, report: dict[str, Any]) -> None:
    """Add the pipeline's results to the report.json that save_compressed wrote."""
    path = target / "report.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    saved.update({k: report[k] for k in ("model", "perplexity", "distill", "timings", "speed", "calibration", "plot")})
    path.write_text(json.dumps(saved, indent=2, default=str) + "\n", encoding="utf-8")


def _plot(path: Path, distill_summary: dict | None, perplexity: dict[str, Any]) -> str | None:
    """perplexity.png: validation perplexity over the distillation steps, the teacher's as a line."""
    history = (distill_summary or {}).get("eval_history") or []
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return None
    steps = [point["step"] for point in history]
    values = [point["perplexity"] for point in history]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(steps, values, marker="o", label="student (validation)")
    teacher = distill_summary.get("teacher_validation_perplexity")
    if teacher:
        axes.axhline(teacher, color="tab:gray", linestyle="--", label=f"teacher ({teacher:.3g})")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("perplexity")
    axes.set_yscale("log")
    axes.set_title(f"distillation: validation perplexity (blocks of {distill_summary.get('block_size')})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name
