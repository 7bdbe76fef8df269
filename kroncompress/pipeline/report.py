"""The report stage: the plot of the evaluations during distillation (perplexity.png for a language-model
run, score.png for a task run, the teacher's value as a dashed line), and the run's results added to the
report.json that save_compressed wrote."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kroncompress.pipeline.record import Run

logger = logging.getLogger("kroncompress.pipeline")

PLOT_NAME = "perplexity.png"
TASK_PLOT_NAME = "score.png"
# what a language-model run adds to report.json (a task run adds its whole report but the parameter counts)
TEXT_REPORT_KEYS = ("model", "tokenizer", "perplexity", "distill", "timings", "speed", "calibration", "plot")


def report(run: Run) -> None:
    settings, result = run.settings, run.report
    if not settings.main:
        return
    if run.task is not None:
        result["plot"] = plot_scores(settings.output_dir / TASK_PLOT_NAME, run.distill_summary, run.scores,
                                     run.task.spec.name)
        written = {k: v for k, v in result.items() if k not in ("params_before", "params_after", "compression")}
    else:
        result["plot"] = plot_perplexity(settings.output_dir / PLOT_NAME, run.distill_summary)
        written = {k: result[k] for k in TEXT_REPORT_KEYS}
    path = settings.output_dir / "report.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    saved.update(written)
    path.write_text(json.dumps(saved, indent=2, default=str) + "\n", encoding="utf-8")


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
    returns the file name, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
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


