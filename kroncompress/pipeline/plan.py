"""The plan stage: the recipe planned on the loaded model, right after loading, so a recipe error that needs
the model (a target matching nothing, a shape that does not divide) is raised before any expensive stage;
the same plan is then calibrated and compressed. Saved calibration statistics are loaded here too, and
`check_statistics` checks them against the plan (a damaged file or another model's statistics stop the run
as early)."""

from __future__ import annotations

from typing import Any

import torch

from kroncompress.pipeline.record import Run
from kroncompress.pipeline.settings import default_device


def plan(run: Run) -> None:
    from kroncompress.surgery import plan as plan_model

    settings = run.settings
    with run.stage("plan"):
        run.plan = plan_model(run.model, settings.recipe)
    if settings.calibration_stats is not None:
        run.stats = load_calibration_stats(settings.calibration_stats, settings.device)


def check_statistics(run: Run) -> None:
    """Statistics of another recipe or model, or an explicit data-aware init with no statistics to come:
    refused before any expensive stage (`kroncompress.surgery.check_statistics`)."""
    from kroncompress.surgery import check_statistics as check

    check(run.model, run.plan.rows, run.stats, will_calibrate=run.settings.calibrates)


def load_calibration_stats(stats: Any, device: str | torch.device | None = None):
    """`stats` as a CalibrationStats: a CalibrationStats as it is, a path loaded (onto `device`, default: the
    run's default device) with every field checked."""
    from kroncompress.calibration import CalibrationStats

    if isinstance(stats, CalibrationStats):
        return stats
    return CalibrationStats.load(stats, device=device if device is not None else default_device())
