"""The load stage: the model (a name, a path or a model object) and its tokenizer, and what the run reads:
a language-model run's text and perplexity protocol, or a task run's labelled examples. Also the checks
that need the loaded model, and the frozen teacher a distilling run keeps."""

from __future__ import annotations

import copy
import os

import torch

from kroncompress.pipeline.evaluate import Scorer
from kroncompress.pipeline.record import Run
from kroncompress.pipeline.text import RunText, distill_config


def load(run: Run) -> None:
    """The model, on the run's device and dtype, and its tokenizer (the settings' tokenizer wins)."""
    settings = run.settings
    with run.stage("load"):
        run.model, run.tokenizer = load_model_and_tokenizer(settings.model, settings.device, settings.dtype,
                                                            settings.tokenizer)


def load_task(run: Run) -> None:
    """The task's labelled examples (each evaluation split capped to `max_eval_examples`, a seeded sample),
    then the fine-tuned model with its classification head, and its tokenizer."""
    from kroncompress.distill.guards import check_finite_weights
    from kroncompress.tasks.data import cap_eval_splits, load_task as read_task
    from kroncompress.tasks.modeling import load_task_model

    settings = run.settings
    with run.stage("load"):
        task = read_task(settings.task, settings.data, max_examples=settings.max_examples)
        # the report starts here: the sizes the evaluation samples were drawn from
        run.report = {"eval_examples_available": {name: len(split) for name, split in task.eval_splits().items()}}
        run.task = cap_eval_splits(task, settings.max_eval_examples)
        run.model, run.tokenizer = load_task_model(settings.model, run.task, tokenizer=settings.tokenizer,
                                                   require_head=True)
        check_finite_weights(run.model, "teacher")  # before scoring and compressing: no recipe option can repair it
        if settings.device is not None:
            run.model.to(settings.device)


def check_language_model(run: Run) -> None:
    """The run scores perplexity and distils next-token predictions: the model needs a language-model head."""
    model = run.model
    if model.get_output_embeddings() is None:
        raise ValueError(f"{source_name(run.settings.model)}: {type(model).__name__} has no language-model head, so "
                         "it has no perplexity to score; compress a classifier on its task with `kroncompress "
                         "compress-task` (kc.tasks.run_task_pipeline), or use kc.compress on the model directly")


def load_text(run: Run) -> None:
    """The run's text (the recipe's distillation data with the run's overrides, blocked lazily) and the
    perplexity protocol every evaluation uses. Built with distillation off too: its data settings block the
    held-out text the same way either way."""
    from kroncompress.evaluate import max_positions

    settings = run.settings
    config = distill_config(settings.recipe, settings.data, settings.max_steps, settings.training_args)
    limit = max_positions(run.model)
    run.text = RunText(config, settings.data, run.tokenizer, settings.cache_dir, limit, distills=settings.distill)
    run.scorer = Scorer(settings.recipe, settings.data, run.text, run.tokenizer, settings.cache_dir, limit,
                        settings.eval_tokens, settings.eval_progress)


def keep_teacher(run: Run) -> None:
    """A distilling run keeps a frozen teacher: a copy of the model before compression ("original"), or the
    model the recipe's `distill.teacher` names."""
    if not run.distills:
        return
    teacher = run.text.config.teacher if run.text is not None else "original"
    if teacher == "original":
        run.teacher = copy.deepcopy(run.model)
    else:
        from kroncompress.models import load_model

        other, _ = load_model(teacher, meta_ok=False)
        run.teacher = other.to(run.settings.device)


def load_model_and_tokenizer(model, device: torch.device, dtype, tokenizer=None):
    """(model, tokenizer): `tokenizer` (an object, a folder or a hub id) wins and must fit the embedding."""
    from kroncompress.models import check_tokenizer_fits, load_model, resolve_tokenizer

    tokenizer = resolve_tokenizer(tokenizer)
    if isinstance(model, torch.nn.Module):
        from kroncompress.distill.data import model_tokenizer

        if dtype is not None and dtype != "auto":
            from kroncompress.models import parse_dtype

            model.to(parse_dtype(dtype))
        model.to(device)
        if tokenizer is not None:
            check_tokenizer_fits(tokenizer, model)
        return model, model_tokenizer(model, tokenizer, needed_for="run_pipeline on a model object")
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model: expected a name, a path or an nn.Module, got {type(model).__name__}")
    loaded, info = load_model(model, meta_ok=False, dtype=dtype, tokenizer=tokenizer)
    loaded.to(device)
    return loaded, info.tokenizer


def source_name(model) -> str:
    """The model's id or path (a model object: its name_or_path, else its class)."""
    if isinstance(model, torch.nn.Module):
        return str(getattr(model, "name_or_path", "") or type(model).__name__)
    return str(model)
