"""The report stage: the plot of the evaluations during distillation (perplexity.png for a language-model
run, score.png for a task run, the teacher's value as a dashed line), and the run's results added to the
report.json that save_compressed wrote."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from kroncompress.pipeline.load import source_name
from kroncompress.pipeline.record import Run

logger = logging.getLogger("kroncompress.pipeline")

PLOT_NAME = "perplexity.png"
TASK_PLOT_NAME = "score.png"
# what a language-model run adds to report.json (a task run adds its whole report but the parameter counts)
TEXT_REPORT_KEYS = ("model", "tokenizer", "perplexity", "distill", "timings", "speed", "calibration", "plot")


def report(run: Run) -> None:
    """The run's report (returned by its entry point; the save stage writes it into the folder)."""
    run.report = task_report(run) if run.task is not None else text_report(run)


def write_report(run: Run, folder: Path) -> None:
    """Into `folder` (the save's temporary folder, so they are part of the atomic write): the plot, the run's
    results added to the report.json save_compressed wrote, and a task run's task.json."""
    result = run.report
    if run.task is not None:
        from kroncompress.tasks.training import TASK_FILE

        (folder / TASK_FILE).write_text(json.dumps(run.task.spec.to_dict(), indent=2) + "\n", encoding="utf-8")
        result["plot"] = plot_scores(folder / TASK_PLOT_NAME, run.distill_summary, run.scores, run.task.spec.name)
        written = {k: v for k, v in result.items() if k not in ("params_before", "params_after", "compression")}
    else:
        result["plot"] = plot_perplexity(folder / PLOT_NAME, run.distill_summary)
        written = {k: result[k] for k in TEXT_REPORT_KEYS}
    path = folder / "report.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    saved.update(written)
    path.write_text(json.dumps(saved, indent=2, default=str) + "\n", encoding="utf-8")


def text_report(run: Run) -> dict[str, Any]:
    """A language-model run's report: perplexity at every stage, distillation, timings, speed, calibration."""
    settings, compression = run.settings, run.compression
    return {
        "model": source_name(settings.model), "recipe": settings.recipe.name, "output_dir": str(settings.output_dir),
        "params_before": compression.params_before, "params_after": compression.params_after,
        "perplexity": run.scores, "distill": run.distill_summary, "timings": run.timings, "speed": run.speed,
        "calibration": run.calibration, "tokenizer": _tokenizer_source(run.tokenizer),
        "compression": compression.to_dict(),  # per-module rows (report.json has them under "report")
        "bytes_before": compression.bytes_before, "bytes_after": compression.bytes_after,
        "quantization": run.quantization,
    }


def task_report(run: Run) -> dict[str, Any]:
    """A task run's report: the task, its data and examples, the score at every stage, distillation, timings."""
    from kroncompress.tasks.data import EVAL_SAMPLE_SEED

    settings, compression, task = run.settings, run.compression, run.task
    limit = settings.max_eval_examples
    model = settings.model
    return {
        "model": type(model).__name__ if isinstance(model, torch.nn.Module) else os.fspath(model),
        "recipe": settings.recipe.name, "task": task.spec.to_dict(), "data": task.source,
        "examples": {name: len(split) for name, split in task.splits.items()},
        "max_eval_examples": limit, "eval_examples_available": run.report["eval_examples_available"],
        "eval_sample": None if limit is None else f"seeded random sample (seed {EVAL_SAMPLE_SEED}) of each "
                                                  "evaluation split, in the split's order",
        "tokenizer": _tokenizer_source(run.tokenizer),
        "params_before": compression.params_before, "params_after": compression.params_after,
        "scores": run.scores, "distill": run.distill_summary, "timings": run.timings,
        "compression": compression.to_dict(),
    }


def _tokenizer_source(tokenizer) -> str | None:
    """Where the run's tokenizer came from (it is saved into the output folder too); None without one."""
    from kroncompress.models import tokenizer_name

    return tokenizer_name(tokenizer) if tokenizer is not None else None


def plot_perplexity(path: Path, distill_summary: dict | None) -> str | None:
    """perplexity.png: validation perplexity over the distillation steps, the teacher's as a line."""
    history = (distill_summary or {}).get("eval_history") or []
    if not history:
        return None
    return plot_history(path, [p["step"] for p in history], [p["perplexity"] for p in history],
                        distill_summary.get("teacher_validation_perplexity"), label="student (validation)",
                        ylabel="perplexity", log=True,
                        title=f"distillation: validation perplexity (blocks of {distill_summary.get('block_size')})")


def plot_scores(path: Path, summary: dict | None, scores: dict[str, Any], task_name: str) -> str | None:
    """score.png: the student's score over the distillation steps, the teacher's as a dashed line."""
    history = (summary or {}).get("history") or []
    if not history:
        return None
    return plot_history(path, [p["step"] for p in history], [p["score"] for p in history], scores["teacher"]["score"],
                        label="student", ylabel="score",
                        title=f"distillation on {task_name}: score on the evaluation split")


def plot_history(path: Path, steps: list, values: list, teacher: float | None, *, label: str, ylabel: str,
                 title: str, log: bool = False) -> str | None:
    """A metric over the optimizer steps with the teacher's value as a dashed line, saved to `path`;
    returns the file name, or None when matplotlib is not installed (the `plot` extra): one warning line says so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("note: matplotlib is not installed, so no %s was drawn (pip install 'kroncompress[plot]')",
                       path.name)
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(steps, values, marker="o", label=label)
    if teacher:
        axes.axhline(teacher, color="tab:gray", linestyle="--", label=f"teacher ({teacher:.3g})")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    if log:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name


