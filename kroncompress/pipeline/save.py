"""The save stage: the compressed folder written atomically through save_compressed, with the run's metrics,
source model and datasets on its model card, and the report stage's files (report.json, the plot; a task
run's task.json) written into it before it is renamed into place."""

from __future__ import annotations

from typing import Any

import torch

from kroncompress.pipeline.load import source_name
from kroncompress.pipeline.record import Run
from kroncompress.pipeline.report import write_report
from kroncompress.pipeline.text import calibration_text


def save(run: Run) -> None:
    from kroncompress.io import save_compressed

    settings = run.settings
    if not settings.main:
        return
    metrics = task_metrics(run) if run.task is not None else text_metrics(run.report)
    card = None if run.task is not None else model_card(run)
    with run.stage("save"):
        # overwrite: the run's first stage already refused what must not be replaced
        save_compressed(run.model, settings.output_dir, recipe=settings.recipe, report=run.compression,
                        metrics=metrics, tokenizer=run.tokenizer, overwrite=True, card=card,
                        extra=lambda folder: write_report(run, folder))


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
    source = settings.model  # a model object without name_or_path has no source to name (not its class name)
    base = getattr(source, "name_or_path", None) if isinstance(source, torch.nn.Module) else source_name(source)
    return {"base_model": base or None, "datasets": [d for d in map(hub_dataset, texts) if d]}


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
