"""What a downstream task is: `TaskSpec` (input and label columns, kind, labels, metrics, splits), the GLUE
presets (`GLUE_TASKS`) and `task_spec`, which builds a spec from a preset name, a mapping or a spec.

    spec = task_spec("sst2")                                   # a GLUE preset: columns, labels, metric
    spec = task_spec({"text": "email", "label": "group", "labels": ["ham", "spam"], "metrics": ["f1"]})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

KINDS = ("classification", "regression")


@dataclass
class TaskSpec:
    """One labelled task. `text` (and `text_pair` for sentence pairs) name the input columns, `label` the
    target column; `kind` is "classification" (class ids or label names) or "regression" (one float).
    `labels` are the class names in id order (None: read from the training split); `metrics` are GLUE's
    (accuracy, f1, matthews, pearson, spearman); the task's score is their mean, averaged over `eval_splits`
    (MNLI: matched and mismatched). `max_length` truncates the tokenised input."""

    name: str = "task"
    text: str = "sentence"
    text_pair: str | None = None
    label: str = "label"
    kind: str = "classification"
    labels: list[str] | None = None
    metrics: list[str] | None = None
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["validation"])
    max_length: int = 128

    def __post_init__(self):
        from kroncompress.tasks.metrics import METRICS

        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.metrics is None:
            self.metrics = ["pearson", "spearman"] if self.kind == "regression" else ["accuracy"]
        self.metrics = [self.metrics] if isinstance(self.metrics, str) else list(self.metrics)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"task {self.name}: metrics {unknown or '[]'} unknown; choose from {', '.join(METRICS)}")
        if isinstance(self.eval_splits, str):
            self.eval_splits = [self.eval_splits]
        if self.labels is not None:
            if self.kind == "regression":
                raise ValueError(f"task {self.name}: labels are class names, but the task is a regression; drop labels")
            empty = [i for i, x in enumerate(self.labels) if x is None or not str(x).strip()]
            if empty:
                raise ValueError(f"task {self.name}: labels (--labels): class name {empty[0]} is empty in "
                                 f"{[str(x) if x is not None else x for x in self.labels]}; give the class names in id "
                                 "order, e.g. neg,pos")
            self.labels = [str(x) for x in self.labels]
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ValueError(f"task {self.name}: labels must be at least two distinct class names, got {self.labels}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"task {self.name}: max_length must be an integer >= 2, got {self.max_length!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `task_spec` turns back into an equal spec."""
        return dataclasses.asdict(self)


def _glue(name, text, pair=None, labels=None, metrics=("accuracy",), kind="classification", evals=("validation",)):
    return dict(name=name, text=text, text_pair=pair, label="label", kind=kind, labels=labels,
                metrics=list(metrics), eval_splits=list(evals))


# GLUE as `datasets.load_dataset("glue", name)` lays it out; the metrics are GLUE's own.
GLUE_TASKS: dict[str, dict[str, Any]] = {
    "cola": _glue("cola", "sentence", labels=["unacceptable", "acceptable"], metrics=["matthews"]),
    "sst2": _glue("sst2", "sentence", labels=["negative", "positive"]),
    "mrpc": _glue("mrpc", "sentence1", "sentence2", ["not_equivalent", "equivalent"], ["f1", "accuracy"]),
    "qqp": _glue("qqp", "question1", "question2", ["not_duplicate", "duplicate"], ["f1", "accuracy"]),
    "stsb": _glue("stsb", "sentence1", "sentence2", metrics=["pearson", "spearman"], kind="regression"),
    "mnli": _glue("mnli", "premise", "hypothesis", ["entailment", "neutral", "contradiction"],
                  evals=["validation_matched", "validation_mismatched"]),
    "qnli": _glue("qnli", "question", "sentence", ["entailment", "not_entailment"]),
    "rte": _glue("rte", "sentence1", "sentence2", ["entailment", "not_entailment"]),
    "wnli": _glue("wnli", "sentence1", "sentence2", ["not_entailment", "entailment"]),
}
_GLUE_ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}


def task_spec(spec: Any = None, **overrides) -> TaskSpec:
    """A TaskSpec from a GLUE name ("sst2", "glue/mnli"), a mapping of TaskSpec fields (which may name a
    preset under `glue`), or a TaskSpec; `overrides` (None values ignored) replace fields."""
    if isinstance(spec, TaskSpec):
        values = spec.to_dict()
    elif spec is None:
        values = {}
    elif isinstance(spec, str):
        values = dict(_preset(spec))
    elif isinstance(spec, Mapping):
        values = dict(spec)
        if values.get("glue"):
            values = {**_preset(values.pop("glue")), **values}
        values.pop("glue", None)
    else:
        raise ValueError(f"task: expected a GLUE task name, a mapping of task fields or a TaskSpec, got {type(spec).__name__}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.pop("data", None)  # a recipe's task section may carry its data; load_task takes it separately
    allowed = [f.name for f in dataclasses.fields(TaskSpec)]
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise ValueError(f"task: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}, glue, data")
    return TaskSpec(**values)


def _preset(name: str) -> dict[str, Any]:
    key = name.lower().strip()
    key = _GLUE_ALIASES.get(key, key)
    for prefix in ("glue/", "glue:"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key not in GLUE_TASKS:
        raise ValueError(f"task {name!r} is not a GLUE task ({', '.join(GLUE_TASKS)}); describe it with columns "
                         "instead (text, text_pair, label, labels, metrics)")
    return GLUE_TASKS[key]
