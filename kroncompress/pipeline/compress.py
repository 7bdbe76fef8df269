"""The compress stage: the planned modules decomposed and swapped in place (with the calibration
statistics when the run has them), the model marked as a kroncompress checkpoint (kc.compress)."""

from __future__ import annotations

from kroncompress.pipeline.record import Run


def compress(run: Run) -> None:
    from kroncompress.hf import compress as compress_model

    with run.stage("compress"):
        run.compression = compress_model(run.model, run.plan, progress=run.settings.compress_progress,
                                         calibration=run.stats)
    run.stats = None  # the statistics can be large: free them before distillation
