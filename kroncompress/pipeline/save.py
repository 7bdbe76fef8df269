"""The save stage: the run's report, and the compressed folder written through save_compressed (with the
run's metrics, source model and datasets on its model card; a task run adds task.json, the task spec)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from kroncompress.pipeline.load import source_name
from kroncompress.pipeline.record import Run
from kroncompress.pipeline.text import calibration_text


def save(run: Run) -> None:
    from kroncompress.io import save_compressed

    settings = run.settings
    run.report = task_report(run) if run.task is not None else text_report(run)
    if not settings.main:
        return
    metrics = task_metrics(run) if run.task is not None else text_metrics(run.report)
    card = None if run.task is not None else model_card(run)
    with run.stage("save"):
        # overwrite: the run's first stage already refused what must not be replaced
        save_compressed(run.model, settings.output_dir, recipe=settings.recipe, report=run.compression,
                        metrics=metrics, tokenizer=run.tokenizer, overwrite=True, card=card)
        if run.task is not None:
            from kroncompress.tasks.training import TASK_FILE

            spec = json.dumps(run.task.spec.to_dict(), indent=2) + "\n"
            (settings.output_dir / TASK_FILE).write_text(spec, encoding="utf-8")


def text_report(run: Run) -> dict[str, Any]:
    """A language-model run's report: perplexity at every stage, distillation, timings, speed, calibration."""
    settings, compression = run.settings, run.compression
    return {
        "model": source_name(settings.model), "recipe": settings.recipe.name, "output_dir": str(settings.output_dir),
        "params_before": compression.params_before, "params_after": compression.params_after,
        "perplexity": run.scores, "distill": run.distill_summary, "timings": run.timings, "speed": run.speed,
        "calibration": run.calibration, "tokenizer": _tokenizer_source(run.tokenizer),
        "compression": compression.to_dict(),  # per-module rows (report.json has them under "report")
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


def text_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The model card's metrics of a language-model run: perplexity at each stage and its protocol, speed,
    distillation steps and seconds."""
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
    return metrics


def task_metrics(run: Run) -> dict[str, Any]:
    """The model card's metrics of a task run: the score at each stage, the metrics and splits it averages."""
    spec = run.task.spec
    metrics = {f"{spec.name} score {stage}": round(value["score"], 4) for stage, value in run.scores.items()}
    metrics["task metrics"] = ", ".join(spec.metrics) + f" on {', '.join(spec.eval_splits)}"
    return metrics


def model_card(run: Run) -> dict[str, Any]:
    """What the model card knows from the run: the source model and the hub datasets it distilled and
    calibrated on."""
    settings = run.settings
    texts = [run.text.config.data if run.text is not None and run.text.distilling else None]
    if settings.calibrates and settings.calibration_stats is None:  # saved statistics do not record their text
        section = settings.recipe.calibration.data if settings.recipe.calibration is not None else None
        texts.append(calibration_text(settings.recipe, settings.calibration_data, settings.data) or section)
    return {"base_model": source_name(settings.model), "datasets": [d for d in map(hub_dataset, texts) if d]}


def _tokenizer_source(tokenizer) -> str | None:
    """Where the run's tokenizer came from (it is saved into the output folder too); None without one."""
    from kroncompress.models import tokenizer_name

    return tokenizer_name(tokenizer) if tokenizer is not None else None


def hub_dataset(spec) -> str | None:
    """The hub dataset a data spec reads (None: local files, a packaged corpus, objects in memory)."""
    if spec is None:
        return None
    from kroncompress.distill.data import text_spec

    try:
        s = text_spec(spec)
    except ValueError:
        return None
    return s.dataset if s.kind == "dataset" else None
