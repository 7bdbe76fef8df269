"""Sequence-classification models for a task: loading, the head, padding, tokenising, predicting, scoring.

    model, tokenizer = load_task_model("path/to/bert", data)      # a new head when the folder has none
    scores = evaluate_task(model, tokenizer, data)                 # {"validation": {...}, "score": ...}

Encoders (BERT, MiniLM, MPNet, RoBERTa ...) pool their first token; decoders (GPT-2, Llama ...) their
last non-padding token, which transformers finds through `config.pad_token_id`: a decoder tokenizer
without a pad token gets its EOS token as pad, and the model's config the same id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kroncompress.tasks.data import TaskData, TaskSplit
from kroncompress.tasks.metrics import compute_metrics

HEAD_SUFFIX = "ForSequenceClassification"


def is_classifier(model: nn.Module) -> bool:
    """Whether `model` is a transformers *ForSequenceClassification model."""
    return type(model).__name__.endswith(HEAD_SUFFIX)


def is_decoder(model: nn.Module) -> bool:
    """Decoder-only families (causal attention, last-token pooling); encoders are BERT-like. The same
    rule the distillation engine uses for its attention loss."""
    from kroncompress.distill.models import is_causal

    return is_causal(model)


def _resolve(name_or_path: str | os.PathLike) -> Path | str:
    from kroncompress.demo import demo_model_path, is_demo_name

    path = Path(os.fspath(name_or_path)).expanduser()
    if not path.exists() and is_demo_name(os.fspath(name_or_path)):
        return demo_model_path()
    return path if path.exists() else os.fspath(name_or_path)


def load_task_model(model: Any, data: TaskData, *, tokenizer: Any = None, require_head: bool = False):
    """(classification model, tokenizer) for `data`'s task.

    `model` is a *ForSequenceClassification module, a folder (a fine-tuned model, a `kc.save_compressed`
    folder, or a pretrained encoder / decoder that gets a new, randomly initialised head with the task's
    number of outputs), the demo name "shakespeare-gpt2", or a hub id. `require_head=True` refuses a
    model without a trained head (what compressing a teacher needs). The tokenizer is read from the folder
    unless given (an object, a folder written by save_pretrained, or a hub id); either way it must fit the
    model's embedding (`kc.models.check_tokenizer_fits`).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from kroncompress.models import TOKENIZER_FILES, TOKENIZER_HINT, resolve_tokenizer
    from kroncompress.models.tokenizer import has_tokenizer

    tokenizer = resolve_tokenizer(tokenizer)

    if isinstance(model, nn.Module):
        if not is_classifier(model):
            raise ValueError(f"{type(model).__name__} is not a sequence-classification model; load it with "
                             "AutoModelForSequenceClassification or pass its folder")
        if tokenizer is None:
            raise ValueError("pass the tokenizer with a model object (tokenizer=...)")
        return prepare_model(model, tokenizer, data), tokenizer
    source = _resolve(model)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a model config from {os.fspath(model)!r}: {str(exc).splitlines()[0]}; pass a "
                         "folder written by save_pretrained (config.json + weights) or a hub id") from exc
    has_head = any(str(a).endswith(HEAD_SUFFIX) for a in getattr(config, "architectures", None) or [])
    if require_head and not has_head:
        raise ValueError(f"{os.fspath(model)!r} is a {', '.join(config.architectures or [config.model_type])}, not a model "
                         "fine-tuned on the task; fine-tune it first (kc.tasks.finetune / `kroncompress finetune`)")
    if tokenizer is None and isinstance(source, Path) and not has_tokenizer(source):
        # transformers 5 would build an empty tokenizer (special tokens only) from the config alone
        raise ValueError(f"{os.fspath(model)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); {TOKENIZER_HINT}, "
                         "or save the tokenizer next to the model")
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{os.fspath(model)!r} has no usable tokenizer ({str(exc).splitlines()[0] if str(exc) else exc}); "
                             f"{TOKENIZER_HINT}, or save the tokenizer next to the model") from exc
    if has_head and getattr(config, "kroncompress", None):
        from kroncompress.io import load_compressed

        loaded = load_compressed(source)
    elif has_head:
        loaded = AutoModelForSequenceClassification.from_pretrained(source)
    else:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "some weights are newly initialised": the head, as intended
        try:
            loaded = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=data.num_labels, problem_type=_problem_type(data))
        finally:
            hf_logging.set_verbosity(level)
    return prepare_model(loaded, tokenizer, data), tokenizer


def _problem_type(data: TaskData) -> str:
    return "regression" if data.spec.kind == "regression" else "single_label_classification"


def prepare_model(model: nn.Module, tokenizer: Any, data: TaskData) -> nn.Module:
    """Check the head fits the task and the tokenizer the embedding, record the labels and set the pad token
    (model and tokenizer)."""
    from kroncompress.models import check_tokenizer_fits

    check_tokenizer_fits(tokenizer, model)
    outputs = int(getattr(model.config, "num_labels", 0))
    if outputs != data.num_labels:
        raise ValueError(f"the model's head has {outputs} output(s) but task {data.spec.name} needs {data.num_labels} "
                         f"({'a regression' if data.spec.kind == 'regression' else 'labels ' + ', '.join(data.spec.labels)}); "
                         "fine-tune a model for this task")
    model.config.problem_type = _problem_type(data)
    if data.spec.labels and not _check_head_labels(model, data):
        model.config.id2label = dict(enumerate(data.spec.labels))
        model.config.label2id = {name: i for i, name in enumerate(data.spec.labels)}
    set_pad_token(model, tokenizer)
    return model


def _check_head_labels(model: nn.Module, data: TaskData) -> bool:
    """ValueError when the head was trained with other class names, or in another order, than the task's
    labels (its gold labels would be read as other classes); True when the task gives bare ids (0, 1, ...)
    and the head's names are kept. An untrained head's default names (LABEL_0 ...) are replaced silently."""
    names = getattr(model.config, "id2label", None) or {}
    held = [str(names.get(i, names.get(str(i), f"LABEL_{i}"))) for i in range(len(names))]
    if not held or held == [f"LABEL_{i}" for i in range(len(held))]:
        return False
    if [n.casefold() for n in held] == [n.casefold() for n in data.spec.labels]:  # POSITIVE is positive
        return False
    if data.spec.labels == [str(i) for i in range(len(held))]:
        return True
    swapped = sorted(n.casefold() for n in held) == sorted(n.casefold() for n in data.spec.labels)
    raise ValueError(f"the model's head was trained with labels {', '.join(held)} (config.json id2label, in id order) but "
                     f"the task gives {', '.join(data.spec.labels)}: its gold labels would be read as "
                     f"{'swapped' if swapped else 'other'} classes; give the task's labels in the head's order "
                     f"(--labels {','.join(held)} / labels=[...]), or fine-tune a model for these labels")


def set_pad_token(model: nn.Module, tokenizer: Any) -> None:
    """Give the tokenizer a pad token (its EOS, then UNK) when it has none, and the model's config its id."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad batches with; add a pad token")
        tokenizer.pad_token = fallback
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


class EncodedSplit(torch.utils.data.Dataset):
    """Tokenised examples ({"input_ids", "attention_mask", ["token_type_ids"], "labels"}), unpadded."""

    def __init__(self, split: TaskSplit, tokenizer: Any, max_length: int):
        pairs = split.pairs if split.pairs is not None else None
        encoded = tokenizer(split.texts, pairs, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        self.items = []
        for i, label in enumerate(split.labels):
            item = {k: encoded[k][i] for k in keys}
            item["labels"] = label
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def encode(split: TaskSplit, tokenizer: Any, max_length: int) -> EncodedSplit:
    """Tokenise a split (text pairs as the tokenizer joins them, truncated to `max_length` tokens)."""
    return EncodedSplit(split, tokenizer, max_length)


def collator(tokenizer: Any):
    """Pads a batch to its longest example (labels become a tensor: long ids, or floats for regression)."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, split: TaskSplit, *, max_length: int = 128, batch_size: int = 32) -> torch.Tensor:
    """The model's logits on every example of `split`, (N, num_labels), float32 on the CPU."""
    data = encode(split, tokenizer, max_length)
    collate = collator(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(data), batch_size):
            batch = collate([{k: v for k, v in data[i].items() if k != "labels"} for i in range(start, min(start + batch_size, len(data)))])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            out.append(logits.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def score_split(model: nn.Module, tokenizer: Any, data: TaskData, split: TaskSplit, *, batch_size: int = 32) -> dict[str, float]:
    """The task's metrics (and their mean, "score") on one split."""
    logits = predict(model, tokenizer, split, max_length=data.spec.max_length, batch_size=batch_size)
    if data.spec.kind == "regression":
        predictions = logits[:, 0].numpy()
    else:
        predictions = logits.argmax(-1).numpy()
    return compute_metrics(data.spec.metrics, predictions, split.labels, num_labels=data.num_labels)


def evaluate_task(model: nn.Module, tokenizer: Any, data: TaskData, *, batch_size: int = 32,
                  max_examples: int | None = None) -> dict[str, Any]:
    """{split: {metric: value, "score": mean}} for each evaluation split, and "score": the mean over splits
    (MNLI: of matched and mismatched). `max_examples` scores only the first examples of each split."""
    out: dict[str, Any] = {}
    for name, split in data.eval_splits().items():
        if max_examples is not None:
            split = split.subset(max_examples)
        out[name] = score_split(model, tokenizer, data, split, batch_size=batch_size)
    out["score"] = sum(out[name]["score"] for name in data.spec.eval_splits) / len(data.spec.eval_splits)
    out["examples"] = {name: min(len(s), max_examples or len(s)) for name, s in data.eval_splits().items()}
    return out
