"""`kroncompress calibrate`'s run: the calibration pass of `kroncompress compress`, on its own, so its
statistics can be saved once and reused by many runs (`run_pipeline(..., calibration_stats=file)`).

    stats = run_calibration("path/to/gpt2", "kn-gpt2-mlp", calibration_data="shakespeare", tokens=16384)
    stats.save("gpt2.calibration.safetensors")

The model is loaded and planned as `run_pipeline` does, and the same text is read (the explicit data, else
the recipe's `calibration.data`, else its `distill.data`, else the packaged corpus), so the statistics equal
those a `compress` run without `data` would collect.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from kroncompress.models import TOKENIZER_HINT
from kroncompress.pipeline_data import _calibration_data
from kroncompress.pipeline_model import _load


def run_calibration(model: Any, recipe: Any, *, calibration_data: Any = None, tokens: int | None = None,
                    tokenizer: Any = None, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, progress: Callable[[int, int], None] | None = None,
                    cache_dir: str | os.PathLike | None = None):
    """Load `model` (a name, path or model object), plan `recipe` on it and return the CalibrationStats of
    the plan's data-aware modules. Raises ValueError when the recipe has no such module or there is no
    tokenizer."""
    from kroncompress.calibration import calibrate, calibration_targets
    from kroncompress.pipeline import _default_device
    from kroncompress.surgery import as_recipe, plan

    recipe = as_recipe(recipe)
    device = torch.device(device) if device is not None else _default_device()
    loaded, tokenizer = _load(model, device, dtype, tokenizer)
    planned = plan(loaded, recipe)
    if not calibration_targets(loaded, planned):
        raise ValueError(f"recipe {recipe.name!r} compresses no module with a data-aware strategy (none of its "
                         "strategies uses calibration statistics), so there is nothing to calibrate; use a recipe "
                         "with e.g. kronecker or svd targets")
    if tokenizer is None:
        raise ValueError(f"calibration needs the model's tokenizer, but none was found next to the model; "
                         f"{TOKENIZER_HINT}, or save the tokenizer with the model")
    text = _calibration_data(recipe, calibration_data, None)
    return calibrate(loaded, planned, tokenizer, data=text, tokens=tokens, progress=progress, cache_dir=cache_dir)
