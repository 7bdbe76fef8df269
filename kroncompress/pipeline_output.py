"""What a `kroncompress compress` run writes once it is done: the compressed folder (through
save_compressed, with the run's metrics, source model and datasets on its model card), the run's results in
report.json, and perplexity.png (see kroncompress.pipeline for the whole run)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kroncompress.pipeline_data import _calibration_data
from kroncompress.pipeline_model import _source_name

if TYPE_CHECKING:
    from kroncompress.pipeline import _Run

logger = logging.getLogger("kroncompress.pipeline")


def _save(model, target: Path, recipe, compression, tokenizer, report: dict[str, Any],
          card: dict[str, Any] | None = None, extra=None) -> None:
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
                    overwrite=True, card=card, extra=extra)  # _check_output already refused what must not be replaced


def _write_report(target: Path, report: dict[str, Any]) -> None:
    """Add the pipeline's results to the report.json that save_compressed wrote."""
    path = target / "report.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    saved.update({k: report[k] for k in ("model", "tokenizer", "perplexity", "distill", "timings", "speed", "calibration", "plot")})
    path.write_text(json.dumps(saved, indent=2, default=str) + "\n", encoding="utf-8")


def _plot(path: Path, distill_summary: dict | None, perplexity: dict[str, Any]) -> str | None:
    """perplexity.png: validation perplexity over the distillation steps, the teacher's as a line."""
    history = (distill_summary or {}).get("eval_history") or []
    if not history:
        return None
    return plot_history(path, [p["step"] for p in history], [p["perplexity"] for p in history],
                        distill_summary.get("teacher_validation_perplexity"), label="student (validation)",
                        ylabel="perplexity", log=True,
                        title=f"distillation: validation perplexity (blocks of {distill_summary.get('block_size')})")


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


def _card(run: _Run) -> dict[str, Any]:
    """What the model card knows from the run: the source model and the hub datasets it distilled and
    calibrated on."""
    settings = run.settings
    texts = [run.distill_config.data if run.distill_config is not None else None]
    if settings.calibrates and settings.calibration_stats is None:  # saved statistics do not record their text
        section = settings.recipe.calibration.data if settings.recipe.calibration is not None else None
        texts.append(_calibration_data(settings.recipe, settings.calibration_data, settings.data) or section)
    import torch

    source = settings.model  # a model object without name_or_path has no source to name (not its class name)
    base = getattr(source, "name_or_path", None) if isinstance(source, torch.nn.Module) else _source_name(source)
    return {"base_model": base or None, "datasets": [d for d in map(_hub_dataset, texts) if d]}


def _hub_dataset(spec) -> str | None:
    """The hub dataset a data spec reads (None: local files, a packaged corpus, objects in memory)."""
    if spec is None:
        return None
    from kroncompress.distill.data import text_spec

    try:
        s = text_spec(spec)
    except ValueError:
        return None
    return s.dataset if s.kind == "dataset" else None
