"""The model a `kroncompress compress` run works on: loading it (a name, a path or a model object),
checking it has a language-model head, the frozen teacher, and the forward throughput the run records
(see kroncompress.pipeline for the whole run)."""

from __future__ import annotations

import copy
import os

import torch

from kroncompress.pipeline_data import _positions


SPEED_BATCH = 8


def _speed_len(model) -> int:
    return min(128, _positions(model) or 128)


def _speed(model) -> float:
    from kroncompress.evaluate import throughput

    return round(throughput(model, batch_size=SPEED_BATCH, seq_len=_speed_len(model)), 1)


def _load(model_name_or_path, device: torch.device, dtype, tokenizer=None):
    """(model, tokenizer): `tokenizer` (an object, a folder or a hub id) wins and must fit the embedding."""
    from kroncompress.models import check_tokenizer_fits, load_model, resolve_tokenizer

    tokenizer = resolve_tokenizer(tokenizer)
    if isinstance(model_name_or_path, torch.nn.Module):
        from kroncompress.distill.data import model_tokenizer

        model = model_name_or_path
        if dtype is not None and dtype != "auto":
            from kroncompress.models import parse_dtype

            model.to(parse_dtype(dtype))
        model.to(device)
        if tokenizer is not None:
            check_tokenizer_fits(tokenizer, model)
        return model, model_tokenizer(model, tokenizer, needed_for="run_pipeline on a model object")
    if not isinstance(model_name_or_path, (str, os.PathLike)):
        raise TypeError(f"model: expected a name, a path or an nn.Module, got {type(model_name_or_path).__name__}")
    model, info = load_model(model_name_or_path, meta_ok=False, dtype=dtype, tokenizer=tokenizer)
    model.to(device)
    return model, info.tokenizer


def _source_name(model) -> str:
    """The model's id or path (a model object: its name_or_path, else its class)."""
    if isinstance(model, torch.nn.Module):
        return str(getattr(model, "name_or_path", "") or type(model).__name__)
    return str(model)


def _check_language_model(model: torch.nn.Module, source) -> None:
    """The pipeline scores perplexity and distils next-token predictions: it needs a language-model head."""
    if model.get_output_embeddings() is None:
        raise ValueError(f"{source}: {type(model).__name__} has no language-model head, so it has no perplexity to "
                         "score; compress a classifier on its task with `kroncompress compress-task` "
                         "(kc.tasks.run_task_pipeline), or use kc.compress on the model directly")


def _teacher(model: torch.nn.Module, teacher: str, device: torch.device) -> torch.nn.Module:
    """The frozen teacher: a copy of the model before compression ("original"), or another model."""
    if teacher == "original":
        return copy.deepcopy(model)
    from kroncompress.models import load_model

    other, _ = load_model(teacher, meta_ok=False)
    return other.to(device)
