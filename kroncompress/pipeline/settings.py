"""What a run is told: one settings class per run (compress, compress-task, calibrate), each checked in
`__post_init__`, so a bad value stops the run before any model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class RunSettings:
    """What every run is told: the model (a name, path or model object), the recipe, where the result goes."""

    model: Any  # a name or path, or a model object (nn.Module / PreTrainedModel), compressed in place
    recipe: Any  # a Recipe (a name, path or dict is loaded once, in __post_init__)
    output_dir: Path | None = None

    def __post_init__(self):
        from kroncompress.recipe import as_recipe

        self.recipe = as_recipe(self.recipe)
        self.output_dir = Path(self.output_dir) if self.output_dir is not None else None

    @property
    def main(self) -> bool:
        """Whether this is the process that evaluates and writes (rank 0 under torchrun)."""
        return int(os.environ.get("RANK", "0")) == 0


@dataclass
class PipelineSettings(RunSettings):
    """Everything a `kroncompress compress` run is told (the keyword arguments of `run_pipeline`)."""

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
        super().__post_init__()
        if self.output_dir is None:
            raise TypeError("PipelineSettings: output_dir is required (the folder the compressed model is saved in)")
        self.device = torch.device(self.device) if self.device is not None else default_device()
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.training_args:  # a misspelt key or integration stops the run here, before the model loads
            from kroncompress.distill.trainer import check_training_args

            check_training_args(self.training_args)
        if self.eval_tokens is not None and self.eval_tokens < 2:
            raise ValueError(f"eval_tokens must be >= 2 (one token and its context), got {self.eval_tokens}")
        if self.calibration_stats is not None:
            check_calibration_stats(self.calibration_stats, self.calibration_data, self.calibration_tokens)

    @property
    def calibrates(self) -> bool:
        return (self.recipe.calibration is not None or self.calibration_data is not None
                or self.calibration_stats is not None)


@dataclass
class CalibrationSettings(RunSettings):
    """What a `kroncompress calibrate` run is told (the keyword arguments of `run_calibration`)."""

    calibration_data: Any = None
    calibration_tokens: int | None = None
    tokenizer: Any = None
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    calibration_progress: Callable[[int, int], None] | None = None
    cache_dir: str | os.PathLike | None = None

    data = None  # a calibrate run reads no distillation text: its calibration text falls back to the recipe's
    calibration_stats = None
    calibrates = True

    def __post_init__(self):
        super().__post_init__()
        self.device = torch.device(self.device) if self.device is not None else default_device()


@dataclass
class TaskSettings(RunSettings):
    """What a `kroncompress compress-task` run is told (the keyword arguments of `run_task_pipeline`). The
    recipe's `task:` section is read here (`load_task_recipe`) and the task resolved: `task`, else the section,
    else the task.json that `finetune` saved next to the model."""

    task: Any = None
    data: Any = None
    tokenizer: Any = None
    max_steps: int | None = None
    distill: bool = True
    calibration_tokens: int | None = None
    eval_every: int | None = None
    overwrite: bool = False
    device: str | torch.device | None = None  # None: where the model was loaded
    max_examples: int | None = None
    max_eval_examples: int | None = None

    resume = False
    calibration_stats = None
    compress_progress = None

    def __post_init__(self):
        from kroncompress.tasks.data import load_task_recipe, read_task_file, task_spec
        from kroncompress.tasks.training import TASK_FILE

        self.recipe, section = load_task_recipe(self.recipe)
        self.output_dir = Path(self.output_dir)
        section_data = section.pop("data", None)
        saved = None if isinstance(self.model, torch.nn.Module) else Path(os.fspath(self.model)) / TASK_FILE
        if self.task is not None:
            self.task = task_spec(self.task)
        elif section:
            self.task = task_spec(section)
        elif saved is not None and saved.is_file():
            self.task = read_task_file(saved)
        else:
            raise ValueError("name the task: pass task= (a GLUE name or task fields), give the recipe a task: section, "
                             f"or fine-tune the teacher with kc.tasks.finetune (it saves {TASK_FILE} next to the model)")
        if self.data is None:
            self.data = section_data

    @property
    def calibrates(self) -> bool:
        return self.recipe.calibration is not None


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_calibration_stats(stats: Any, data: Any, tokens: int | None) -> None:
    """Saved statistics exclude a calibration pass; a file's header is checked before the model loads."""
    from kroncompress.calibration import CalibrationStats

    if not isinstance(stats, (CalibrationStats, str, os.PathLike)):
        raise TypeError(f"calibration_stats: expected a CalibrationStats or the path of a saved one, got {type(stats).__name__}")
    if data is not None or tokens is not None:
        given = "calibration_data" if data is not None else "calibration_tokens"
        raise ValueError(f"calibration_stats and {given} exclude each other: the statistics were collected already; "
                         f"drop {given}, or drop calibration_stats to calibrate in this run")
    if isinstance(stats, (str, os.PathLike)):
        from kroncompress.calibration import check_calibration_file

        check_calibration_file(stats)
