"""The compress stage: the planned modules decomposed and swapped in place (with the calibration
statistics when the run has them, sequential ones when the recipe asks), the model marked as a kroncompress
checkpoint (kc.compress). The quantize stage: the factors stored as integers, last (they train in float)."""

from __future__ import annotations

from kroncompress.pipeline.record import Run


def compress(run: Run) -> None:
    from kroncompress.hf import compress as compress_model

    with run.stage("compress"):
        run.compression = compress_model(run.model, run.plan, progress=run.settings.compress_progress,
                                         calibration=run.stats, sequential=run.sequential)
    run.stats = run.sequential = None  # the statistics can be large: free them before distillation


def quantize(run: Run) -> None:
    """When the recipe has a `quantize` section: kc.quantize on the final model; the report's bytes follow."""
    options = run.settings.recipe.quantize
    if options is None:
        return
    from kroncompress.quantization import quantize as quantize_model

    with run.stage("quantize"):
        run.quantization = quantize_model(run.model, options.bits, options.group_size, dense=options.dense).to_dict()
        run.compression.bytes_after = run.quantization["bytes_after"]
