"""The text a language-model run reads: the distillation settings with the run's overrides, the
distillation blocks and their held-out validation sample (`RunText`), and the calibration text.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any

import torch

from kroncompress.models import TOKENIZER_HINT

logger = logging.getLogger("kroncompress.pipeline")

FALLBACK_VALIDATION_FRACTION = 0.05  # held out when the data has no validation split of its own
MAX_VALIDATION_BLOCKS = 256  # validation is a fixed sample of the held-out blocks: evaluating stays cheap
# The held-out split and the validation sample do not follow the training seed: runs that differ only in
# their seed are scored on the same text.
EVALUATION_SEED = 0
# Keys that describe the text itself: a `data` override replaces all of them (a recipe's validation_fraction
# suits its own corpus; the override's own validation split, e.g. Shakespeare's held-out plays, is used instead).
SOURCE_KEYS = ("dataset", "config", "files", "source", "split", "fraction", "streaming", "validation_fraction",
                "column")


def distill_config(recipe, data: Any, max_steps: int | None, training_args: dict | None = None):
    """The recipe's DistillConfig with the data override, step cap and TrainingArguments keywords applied
    (None: no distillation)."""
    config = recipe.distill
    if config is None:
        return None
    config = copy.deepcopy(config)
    if data is not None:
        config.data = merged_data(config.data, data)
    if max_steps is not None:
        config.train = dataclasses.replace(config.train, max_steps=max_steps)
    if training_args:
        from kroncompress.distill.trainer import check_training_args

        config.train = dataclasses.replace(
            config.train, training_args={**config.train.training_args, **check_training_args(training_args)})
    return config


def merged_data(base, data: Any):
    """A DataConfig: `base`'s settings (block size, ...) with the text of the `data` override; the
    override replaces every key that describes the text (SOURCE_KEYS)."""
    from kroncompress.recipe import DataConfig

    override = data_override(data) if data is not None else {}
    kept = ({f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name not in SOURCE_KEYS}
            if base is not None else {})
    known = {f.name for f in dataclasses.fields(DataConfig)}
    values = {**kept, **{k: v for k, v in override.items() if k in known}}
    if isinstance(values.get("files"), (str, os.PathLike)):
        values["files"] = [str(values["files"])]
    return DataConfig(**values)


def calibration_text(recipe, explicit: Any, data: Any) -> Any:
    """Calibration text: given explicitly, else the recipe's calibration.data when it names a source, else
    the run's own text (the `data` override, then the recipe's distillation data)."""
    if explicit is not None:
        return explicit
    section = recipe.calibration.data if recipe.calibration is not None else None
    if section is not None and (section.dataset or section.files or section.source):
        return None  # calibrate() reads the section itself
    distill_data = recipe.distill.data if recipe.distill is not None else None
    if data is not None:
        from kroncompress.distill.data import text_spec

        # the run's text is blocked as the distillation data is: with BOS or without (distill.data.bos)
        bos = distill_data.bos if distill_data is not None else "auto"
        return data if bos == "auto" else dataclasses.replace(text_spec(data), bos=bos)
    if distill_data is not None and (distill_data.dataset or distill_data.files or distill_data.source):
        return distill_data
    return None


def data_override(data: Any) -> dict[str, Any]:
    from kroncompress.distill.data import in_memory, parse_data_arg

    if in_memory(data):  # a datasets.Dataset, list of strings or token tensor (see kroncompress.distill.data)
        return {"dataset": data}
    if isinstance(data, (str, os.PathLike)):
        return parse_data_arg(str(data))
    if isinstance(data, dict):
        return dict(data)
    if dataclasses.is_dataclass(data):
        return {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    raise ValueError(f"data: expected a corpus name, file path/glob, dataset name, dict, DataConfig, datasets.Dataset, "
                     f"list of strings or token tensor, got {type(data).__name__}")


def clip_block(size: int, limit: int | None) -> int:
    if limit is not None and size > limit:
        logger.info("block size %d exceeds the model's %d positions: using %d", size, limit, limit)
        return limit
    return size


class RunText:
    """The distillation text as (train, validation) token blocks, built once (validation: the data's own
    split, else 5% held out, then a fixed sample of at most MAX_VALIDATION_BLOCKS).

    `distills` says whether the run distils; when it does not, `distill_config` still sets how the text is
    blocked (the recipe's `distill.data` block size), so a run without distillation scores the same held-out
    sample as one with it, and the text is only built when `data` is given."""

    def __init__(self, distill_config, data, tokenizer, cache_dir, limit: int | None, distills: bool = True):
        self.config, self.data, self.tokenizer, self.cache_dir, self.limit = distill_config, data, tokenizer, cache_dir, limit
        self.distills = distills
        self._blocks = None
        self.bos: int | None = None  # the id every block opens with (see kroncompress.distill.bos), once built

    @property
    def data_config(self):
        return self.config.data if self.config is not None else merged_data(None, self.data)

    @property
    def block_size(self) -> int:
        return clip_block(self.data_config.block_size, self.limit)

    @property
    def distilling(self) -> bool:
        return self.distills and self.config is not None

    @property
    def available(self) -> bool:
        return self.distilling or self.data is not None

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._blocks is None:
            from kroncompress.distill.data import build_datasets, spec_bos, split_blocks

            if self.tokenizer is None:
                raise ValueError(f"the model has no tokenizer; distillation and perplexity need one: {TOKENIZER_HINT}, "
                                 "or save it next to the model (tokenizer.save_pretrained(folder))")
            train, validation = build_datasets(self.data_config, self.tokenizer, block_size=self.block_size,
                                               cache_dir=self.cache_dir, seed=EVALUATION_SEED)
            if len(validation) == 0:
                train, validation = split_blocks(train, FALLBACK_VALIDATION_FRACTION, EVALUATION_SEED)
            if len(validation) > MAX_VALIDATION_BLOCKS:
                keep = torch.randperm(len(validation), generator=torch.Generator().manual_seed(EVALUATION_SEED))
                validation = validation[keep[:MAX_VALIDATION_BLOCKS].sort().values]
            self._blocks = (train, validation)
            self.bos = spec_bos(self.data_config, self.tokenizer)
        return self._blocks
