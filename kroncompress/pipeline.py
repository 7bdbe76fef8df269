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
    """
    from kroncompress.recipe import load_recipe

    recipe = load_recipe(recipe)
    target = Path(output_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    _check_output(target, resume=resume, overwrite=overwrite)
    device = torch.device(device) if device is not None else _default_device()
    timings: dict[str, float] = {}
    stage = _Stopwatch(timings)

    with stage("load"):
        model, tokenizer = _load(model_name_or_path, device, dtype)
    distill_config = _distill_config(recipe, data, max_steps) if distill else None
    evaluator = _Evaluator(recipe, data, distill_config, tokenizer, cache_dir, model)
    perplexity: dict[str, Any] = {}
    with stage("evaluate_teacher"):
        if main:
            perplexity["teacher"] = evaluator(model, "teacher")
    speed: dict[str, Any] = {}
    if measure_speed and main:
        with stage("speed_teacher"):
            speed["teacher_tokens_per_s"] = _speed(model)
    teacher = _teacher(model, distill_config.teacher, device) if distill_config is not None else None
    from kroncompress.calibration import calibrate, describe
    from kroncompress.surgery import compress

    stats, calibration_summary = None, None
    if recipe.calibration is not None or calibration_data is not None:
        if tokenizer is None and calibration_data is not None:
            raise ValueError("data-aware initialisation needs the model's tokenizer, but none was found next "
                             "to the model; save the tokenizer with it, or drop the calibration data")
        if tokenizer is None:
            warnings.warn(f"recipe {recipe.name!r} asks for calibration, but the model has no tokenizer: "
                          "weight-only initialisation instead (save the tokenizer next to the model)")
        else:
            with stage("calibrate"):
                stats = calibrate(model, recipe, tokenizer, data=_calibration_data(recipe, calibration_data, data),
                                  tokens=calibration_tokens, progress=calibration_progress, cache_dir=cache_dir)
            calibration_summary = describe(stats)
    with stage("compress"):
        compression = compress(model, recipe, progress=compress_progress, calibration=stats)
    del stats
    with stage("evaluate_compressed"):
        if main:
            perplexity["compressed"] = evaluator(model, "compressed")
    distill_summary = None
    if distill_config is not None:
        with stage("distill"):
            distill_summary = _distill(model, teacher, distill_config, evaluator, target, resume=resume,
                                       overwrite=overwrite, progress=progress, main=main)
        with stage("evaluate_distilled"):
            if main:
                perplexity["distilled"] = evaluator(model, "distilled")
    del teacher
    if measure_speed and main:
        with stage("speed_compressed"):
            speed["compressed_tokens_per_s"] = _speed(model)
        speed["ratio"] = round(speed["compressed_tokens_per_s"] / speed["teacher_tokens_per_s"], 3)
        speed["protocol"] = f"forward, {SPEED_BATCH} sequences x {_speed_len(model)} tokens, median of 10"

    report = {
        "model": str(model_name_or_path), "recipe": recipe.name, "output_dir": str(target),
        "params_before": compression.params_before, "params_after": compression.params_after,
        "perplexity": perplexity, "distill": distill_summary, "timings": timings, "speed": speed,
        "calibration": calibration_summary,
        "compression": compression.to_dict(),  # per-module rows (report.json has them under "report")
    }
    if not main:
        return report
    with stage("save"):
        _save(model, target, recipe, compression, tokenizer, report)
    report["plot"] = _plot(target / PLOT_NAME, distill_summary, perplexity)
    _write_report(target, report)
    return report


SPEED_BATCH = 8


def _speed_len(model) -> int:
    return min(128, _positions(model) or 128)


def _speed(model) -> float:
    from kroncompress.evaluate import throughput

    return round(throughput(model, batch_size=SPEED_BATCH, seq_len=_speed_len(model)), 1)


# -- stages --------------------------------------------------------------------------------------

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
                                "to replace it, or pick another folder")
    if finished or resume or overwrite or not any(target.iterdir()):
        return
    if (target / CHECKPOINTS).is_dir():
        raise OutputExistsError(f"output folder {target} holds an unfinished run ({CHECKPOINTS}/); pass resume=True "
                                "to continue it, overwrite=True to start again, "
                                "or pick another folder")
    raise OutputExistsError(f"output folder {target} already exists and is not empty; pass overwrite=True "
                            "to replace it, or pick another folder")


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
    from kroncompress.recipe import DataConfig

    config = recipe.distill
    if config is None:
        return None
    config = copy.deepcopy(config)
    if data is not None:
        override = _data_override(data)
        base = {k: v for k, v in dataclasses.asdict(config.data).items() if k not in _SOURCE_KEYS}
        known = {f.name for f in dataclasses.fields(DataConfig)}
        values = {**base, **{k: v for k, v in override.items() if k in known}}
        if isinstance(values.get("files"), (str, os.PathLike)):
            values["files"] = [str(values["files"])]
        config.data = DataConfig(**values)
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        config.train = dataclasses.replace(config.train, max_steps=max_steps)
    return config


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


class _Evaluator:
    """Measures perplexity under one protocol for every stage, and builds the distillation blocks."""

    def __init__(self, recipe, data, distill_config, tokenizer, cache_dir, model):
        self.recipe, self.data, self.config = recipe, data, distill_config
        self.tokenizer, self.cache_dir = tokenizer, cache_dir
        self.limit = _positions(model)
        self._blocks = None
        spec = recipe.evaluate.perplexity if recipe.evaluate is not None else None
        self.spec = spec if data is None else None
        self.block_size = self._clip(spec.block_size if spec is not None else self.data_block_size())
        # a clipped block keeps the protocol's stride / block ratio (1024/512 on a 64-position model: 64/32)
        ratio = spec.stride / spec.block_size if spec is not None else 0.5
        self.stride = max(1, min(self.block_size, round(self.block_size * ratio)))
        self.max_tokens = spec.max_tokens if spec is not None else None

    def _clip(self, size: int) -> int:
        if self.limit is not None and size > self.limit:
            logger.info("block size %d exceeds the model's %d positions: using %d", size, self.limit, self.limit)
            return self.limit
        return size

    def data_block_size(self) -> int:
        return self._clip(self.config.data.block_size) if self.config is not None else 1024

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, validation) blocks of the distillation data (validation: the data's own, else 5% held out)."""
        if self._blocks is None:
            from kroncompress.distill.data import build_datasets, split_blocks

            if self.tokenizer is None:
                raise ValueError("the model has no tokenizer; distillation and perplexity need one: save it next to the "
                                 "model (tokenizer.save_pretrained(folder))")
            data = self.config.data if self.config is not None else self.data_override_config()
            train, validation = build_datasets(data, self.tokenizer, block_size=self.data_block_size(),
                                               cache_dir=self.cache_dir, seed=EVALUATION_SEED)
            if len(validation) == 0:
                train, validation = split_blocks(train, FALLBACK_VALIDATION_FRACTION, EVALUATION_SEED)
            if len(validation) > MAX_VALIDATION_BLOCKS:
                keep = torch.randperm(len(validation), generator=torch.Generator().manual_seed(EVALUATION_SEED))
                validation = validation[keep[:MAX_VALIDATION_BLOCKS].sort().values]
            self._blocks = (train, validation)
        return self._blocks

    def data_override_config(self):
        from kroncompress.recipe import DataConfig

        values = _data_override(self.data) if self.data is not None else {}
        known = {f.name for f in dataclasses.fields(DataConfig)}
        return DataConfig(**{k: v for k, v in values.items() if k in known})

    def __call__(self, model, stage: str) -> dict[str, Any] | None:
        from kroncompress.evaluate import evaluate_perplexity, perplexity

        start = time.perf_counter()
        if self.tokenizer is None and self.config is None:
            logger.warning("the model has no tokenizer: %s perplexity not measured", stage)
            return None
        if self.spec is not None:
            result = evaluate_perplexity(model, self.tokenizer, self.spec, block_size=self.block_size, stride=self.stride,
                                         max_tokens=self.max_tokens, cache_dir=self.cache_dir)
            text = _describe_spec(self.spec)
        elif self.config is not None or self.data is not None:
            ids = self.blocks()[1].reshape(-1)
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


def _distill(model, teacher, config, evaluator: _Evaluator, target: Path, *, resume: bool, overwrite: bool,
             progress: bool | None, main: bool) -> dict[str, Any]:
    from kroncompress.distill.checkpoints import fingerprint
    from kroncompress.distill.trainer import distill
    from kroncompress.evaluate import perplexity

    train, validation = evaluator.blocks()
    validation = validation[:TRAINING_EVAL_BLOCKS]
    config = copy.deepcopy(config)
    config.train = dataclasses.replace(config.train, eval_every=_eval_every(config, len(train)))
    checkpoints = target / CHECKPOINTS
    if main and overwrite and not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)
    recipe = evaluator.recipe  # resume checks it is the same recipe (and the engine the rest of the settings)
    result = distill(model, teacher, config, train, validation, output_dir=checkpoints, resume=resume,
                     progress=progress, run_settings={"recipe": f"{recipe.name} ({fingerprint(recipe.to_dict())})"})
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
