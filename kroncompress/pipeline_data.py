"""The text a `kroncompress compress` run reads: the distillation blocks, the perplexity protocol every
stage is scored under, and the calibration text (see kroncompress.pipeline for the whole run).

Perplexity protocol (`_Scorer`): `evaluate_perplexity`, as `kroncompress eval` runs it, on the recipe's
`evaluate.perplexity` text when no `data` override is given, else on the override's test split (else its
validation split); only text with a single split is scored on the validation blocks held out from the
distillation data. Block size, stride and `max_tokens` are the recipe's (a block size beyond the model's positions
is clipped to them, the stride keeping its ratio to the block).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from typing import Any, Callable

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
_SOURCE_KEYS = ("dataset", "config", "files", "source", "split", "fraction", "streaming", "validation_fraction",
                "column")


def _distill_config(recipe, data: Any, max_steps: int | None, training_args: dict | None = None):
    """The recipe's DistillConfig with the data override, step cap and TrainingArguments keywords applied
    (None: no distillation)."""
    config = recipe.distill
    if config is None:
        return None
    config = copy.deepcopy(config)
    if data is not None:
        config.data = _merged_data(config.data, data)
    if max_steps is not None:
        config.train = dataclasses.replace(config.train, max_steps=max_steps)
    if training_args:
        from kroncompress.distill.trainer import check_training_args

        config.train = dataclasses.replace(
            config.train, training_args={**config.train.training_args, **check_training_args(training_args)})
    return config


def _merged_data(base, data: Any):
    """A DataConfig: `base`'s settings (block size, ...) with the text of the `data` override; the
    override replaces every key that describes the text (_SOURCE_KEYS)."""
    from kroncompress.recipe import DataConfig

    override = _data_override(data) if data is not None else {}
    kept = ({f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name not in _SOURCE_KEYS}
            if base is not None else {})
    known = {f.name for f in dataclasses.fields(DataConfig)}
    values = {**kept, **{k: v for k, v in override.items() if k in known}}
    if isinstance(values.get("files"), (str, os.PathLike)):
        values["files"] = [str(values["files"])]
    return DataConfig(**values)


def _calibration_data(recipe, explicit: Any, data: Any) -> Any:
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


def _data_override(data: Any) -> dict[str, Any]:
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


def _positions(model) -> int | None:
    from kroncompress.evaluate import max_positions

    return max_positions(model)


def _clip(size: int, limit: int | None) -> int:
    if limit is not None and size > limit:
        logger.info("block size %d exceeds the model's %d positions: using %d", size, limit, limit)
        return limit
    return size


class _DistillData:
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
        return self.config.data if self.config is not None else _merged_data(None, self.data)

    @property
    def block_size(self) -> int:
        return _clip(self.data_config.block_size, self.limit)

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


class _Scorer:
    """Perplexity under one protocol for every stage, `kroncompress.evaluate.evaluate_perplexity` (what
    `kroncompress eval` runs): the recipe's `evaluate.perplexity` text when there is no data override, else
    the override's held-out split (test, else validation: what `kroncompress eval --data` scores by
    default); only text with a single split (files, in-memory data) is scored on the validation blocks
    held out from the distillation data, which `kroncompress eval` cannot know."""

    def __init__(self, recipe, data, distill_data: _DistillData, tokenizer, cache_dir, limit: int | None,
                 max_tokens: int | None = None, progress: Callable[[int, int, str], None] | None = None):
        spec = recipe.evaluate.perplexity if recipe.evaluate is not None else None
        self.spec = spec if data is None else None
        self.data = data
        self._held_out: tuple | None = None
        self.distill_data, self.tokenizer, self.cache_dir = distill_data, tokenizer, cache_dir
        self.block_size = _clip(spec.block_size if spec is not None else distill_data.block_size, limit)
        # a clipped block keeps the protocol's stride / block ratio (1024/512 on a 64-position model: 64/32)
        ratio = spec.stride / spec.block_size if spec is not None else 0.5
        self.stride = max(1, min(self.block_size, round(self.block_size * ratio)))
        # the cap on the ids scored, in every stage and whichever text: the run's (eval_tokens), else the recipe's
        self.max_tokens = max_tokens if max_tokens is not None else spec.max_tokens if spec is not None else None
        self.progress = progress

    def __call__(self, model, stage: str) -> dict[str, Any] | None:
        from kroncompress.evaluate import evaluate_perplexity, perplexity

        start = time.perf_counter()
        bar = (lambda done, total: self.progress(done, total, stage)) if self.progress is not None else None
        if self.tokenizer is None and not self.distill_data.distilling:
            logger.warning("the model has no tokenizer: %s perplexity not measured", stage)
            return None
        if self.spec is not None:
            result = evaluate_perplexity(model, self.tokenizer, self.spec, block_size=self.block_size, stride=self.stride,
                                         max_tokens=self.max_tokens, cache_dir=self.cache_dir, progress=bar)
            text = _describe_spec(self.spec)
        elif self.tokenizer is not None and self.held_out()[1] is not None:
            # the override as `kroncompress eval --data` reads it: its own text settings, BOS as the tokenizer adds it
            spec, split = self.held_out()
            result = evaluate_perplexity(model, self.tokenizer, spec, split=split, block_size=self.block_size,
                                         stride=self.stride, max_tokens=self.max_tokens, cache_dir=self.cache_dir,
                                         progress=bar)
            text = spec.describe(split) + (f" ({split})" if spec.kind == "files" else "")  # files: a split folder's
        elif self.distill_data.available:
            validation, bos = self.distill_data.blocks()[1], self.distill_data.bos
            # BOS-led blocks: their text as one stream again, every window led by BOS (BOS is never scored)
            ids = (validation if bos is None else validation[:, 1:]).reshape(-1)
            result = perplexity(model, ids, block_size=self.block_size, stride=self.stride, max_tokens=self.max_tokens,
                                progress=bar, bos_token_id=bos)
            text = "validation blocks held out from the distillation data (the text has no test or validation split)"
        else:
            logger.info("no evaluate.perplexity and no data: %s perplexity not measured", stage)
            return None
        out = {**result.to_dict(), "data": text, "seconds": round(time.perf_counter() - start, 3)}
        logger.info("%s: %s", stage, result)
        return out

    def held_out(self) -> tuple[Any, str | None]:
        """(the override's text spec, its held-out split or None), worked out once."""
        if self._held_out is None:
            from kroncompress.distill.data import held_out_split, in_memory, text_spec

            if self.data is None or in_memory(self.data):
                self._held_out = (None, None)
            else:
                spec = text_spec(_data_override(self.data))
                self._held_out = (spec, held_out_split(spec))
        return self._held_out


def _describe_spec(spec) -> str:
    if spec.dataset:
        return f"{spec.dataset}" + (f":{spec.config}" if spec.config else "") + f" [{spec.split}]"
    if spec.files:
        return ", ".join(spec.files)
    return f"{spec.source or 'default corpus'} [{spec.split}]"
