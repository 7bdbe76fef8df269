"""Downstream tasks: what a task is (columns, labels, metric) and where its labelled examples come from.

    spec = task_spec("sst2")                                   # a GLUE preset: columns, labels, metric
    spec = task_spec({"text": "email", "label": "group", "labels": ["ham", "spam"], "metrics": ["f1"]})
    data = load_task(spec, "glue/sst2")                        # hub name (needs network)
    data = load_task(spec, "path/saved")                       # datasets.save_to_disk folder
    data = load_task(spec, "path/train.csv")                   # csv / tsv / jsonl (a validation part held out)
    data = load_task(spec, "path/folder")                      # train.tsv + dev.tsv (GLUE's own files) ...
    data = load_task(spec, {"train": [{"sentence": ..., "label": 1}, ...], "validation": [...]})

Every split becomes plain lists (texts, text pairs, labels as class ids or floats). A column or label the
data does not have is a ValueError naming it, the split and what the data does have.

This module holds the loaded data (`TaskSplit`, `TaskData`), `load_task` and the column and label
checks; what a task is lives in `kroncompress.tasks.spec` (`TaskSpec`, `task_spec`, `GLUE_TASKS`) and
where its rows come from in `kroncompress.tasks.sources` (hub, save_to_disk folders, csv / tsv / jsonl
files, held-out validation). Their public names are importable from here too, as before.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from kroncompress.tasks.sources import FILE_SUFFIXES, read_rows  # noqa: F401  (FILE_SUFFIXES: re-exported)
from kroncompress.tasks.spec import GLUE_TASKS, KINDS, TaskSpec, task_spec  # noqa: F401  (KINDS: re-exported)

# the validation part held out of a single file, chosen by a hash of the row (stable across runs and machines)
DEFAULT_VALIDATION_FRACTION = 0.1
EVAL_SAMPLE_SEED = 0  # max_eval_examples: the evaluation examples kept are a sample with this seed


# -- the loaded data -------------------------------------------------------------------------------

@dataclass
class TaskSplit:
    """One split as plain lists: `texts`, `pairs` (None for single-sentence tasks) and `labels` (class
    ids, or floats for regression)."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, count: int) -> "TaskSplit":
        """The first `count` examples."""
        return TaskSplit(self.texts[:count], self.pairs[:count] if self.pairs is not None else None, self.labels[:count])

    def sample(self, count: int, seed: int) -> "TaskSplit":
        """`count` examples drawn with `random.Random(seed)`, in their original order (all when fewer)."""
        if count >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), count))
        return TaskSplit([self.texts[i] for i in keep], [self.pairs[i] for i in keep] if self.pairs is not None else None,
                         [self.labels[i] for i in keep])


@dataclass
class TaskData:
    """A task's examples: `splits` by name, the `spec` (its `labels` filled in for classification) and a
    description of the `source`."""

    spec: TaskSpec
    splits: dict[str, TaskSplit]
    source: str = "<memory>"

    @property
    def num_labels(self) -> int:
        """Outputs of the model's head: the class count, or 1 for a regression."""
        return 1 if self.spec.kind == "regression" else len(self.spec.labels)

    @property
    def train(self) -> TaskSplit:
        return self.split(self.spec.train_split)

    def split(self, name: str) -> TaskSplit:
        """The split called `name`; a ValueError lists the splits there are."""
        if name not in self.splits:
            raise ValueError(f"task {self.spec.name}: no split {name!r} in {self.source}; splits: {', '.join(self.splits)}")
        return self.splits[name]

    def eval_splits(self) -> dict[str, TaskSplit]:
        """The evaluation splits of the spec, in order."""
        return {name: self.split(name) for name in self.spec.eval_splits}


def load_task(spec: Any, data: Any = None, *, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
              max_examples: int | None = None) -> TaskData:
    """Load the task's train and evaluation splits from `data` and check every column and label.

    `data`: a hub dataset name (`glue/sst2`, `name:config`), a `save_to_disk` folder, a csv / tsv / jsonl
    file (its evaluation split held out by a hash of each row, `validation_fraction` of it), a folder of
    such files named after their splits (`train.tsv`, `dev.tsv`, `dev_matched.tsv`, ...), a mapping split ->
    list of row dicts / file path / Dataset, a DatasetDict, or a TaskData (re-checked against `spec`).
    `max_examples` keeps the first examples of each split. Raises ValueError naming a missing column (and
    the available ones) or a label outside the task's labels.
    """
    spec = task_spec(spec)
    if isinstance(data, TaskData):
        return data if max_examples is None else _cap(data, max_examples)
    if data is None:
        if spec.name in GLUE_TASKS:
            data = f"glue/{spec.name}"
        else:
            raise ValueError(f"task {spec.name}: no data given; pass a dataset name, a folder, a csv/tsv/jsonl file or rows")
    rows, source = read_rows(spec, data, validation_fraction)
    needed = [spec.train_split, *spec.eval_splits]
    missing = [s for s in needed if s not in rows]
    if missing:
        raise ValueError(f"task {spec.name}: {source} has no split {', '.join(map(repr, missing))}; it has "
                         f"{', '.join(rows) or 'none'} (set task train_split / eval_splits)")
    if max_examples is not None:
        rows = {name: list(r)[:max_examples] for name, r in rows.items()}
    for name in dict.fromkeys(needed):  # before the columns: an empty split has none, and that is not the problem
        if hasattr(rows[name], "__len__") and not len(rows[name]):
            raise ValueError(f"task {spec.name}: the {name!r} split of {source} is empty")
    spec = dataclasses.replace(spec, labels=_label_names(spec, rows[spec.train_split], source))
    splits = {name: _to_split(spec, name, rows[name], source) for name in dict.fromkeys(needed)}
    return TaskData(spec=spec, splits=splits, source=source)


def load_task_recipe(recipe: Any) -> tuple[Any, dict[str, Any]]:
    """(Recipe, its task section as a dict, checked) from a bundled name, a YAML path, a mapping or a Recipe."""
    from kroncompress.recipe import load_recipe

    parsed = load_recipe(recipe)
    return parsed, _task_section(parsed.task, parsed.source)


def _task_section(section: Any, source: str) -> dict[str, Any]:
    if section is None:
        return {}
    if isinstance(section, str):
        return {"glue": section}
    if not isinstance(section, Mapping):
        raise ValueError(f"{source}: task: expected a mapping of task fields (glue, text, text_pair, label, labels, kind, "
                         f"metrics, data, ...), got {type(section).__name__}")
    try:
        task_spec(dict(section))  # validate now, before any model is loaded
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return dict(section)


def read_task_file(path: Path) -> TaskSpec:
    """The TaskSpec a task.json holds (`finetune` writes one next to the model); a ValueError naming the file."""
    try:
        return task_spec(json.loads(path.read_text(encoding="utf-8")))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); it should be the task.json `finetune` "
                         "wrote: fine-tune again, or pass the task (--task / task=)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); it should be the "
                         "task.json `finetune` wrote: fix it, fine-tune again, or pass the task (--task / task=)") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _cap(data: TaskData, count: int) -> TaskData:
    return TaskData(spec=data.spec, splits={k: v.subset(count) for k, v in data.splits.items()}, source=data.source)


def cap_eval_splits(data: TaskData, count: int | None, *, seed: int = EVAL_SAMPLE_SEED) -> TaskData:
    """`data` with each evaluation split cut to `count` examples (the training split untouched).

    The kept examples are a seeded random sample (`random.Random(seed)`, the same on every run and
    machine), in their original order: the first examples of a split stored sorted by label (a common
    csv layout) would hold one class only. A split of at most `count` examples is kept whole.
    """
    if count is None:
        return data
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"max_eval_examples must be an integer >= 1, got {count!r}")
    splits = dict(data.splits)
    for name in dict.fromkeys(data.spec.eval_splits):
        if name != data.spec.train_split:  # a spec that evaluates on its training split keeps it whole
            splits[name] = data.split(name).sample(count, seed)
    return TaskData(spec=data.spec, splits=splits, source=data.source)


def _columns_of(rows: Any) -> list[str]:
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    first = next(iter(rows), None)
    return list(first.keys()) if isinstance(first, Mapping) else []


def _column(rows: Any, name: str, role: str, split: str, spec: TaskSpec, source: str) -> list[Any]:
    available = _columns_of(rows)
    if name not in available:
        raise ValueError(f"task {spec.name}: column {name!r} (task {role}) not found in the {split!r} split of {source}; "
                         f"available columns: {', '.join(available) or 'none (the split is empty)'}")
    if hasattr(rows, "column_names"):
        return list(rows[name])
    return [row.get(name) for row in rows]


def _label_names(spec: TaskSpec, train_rows: Any, source: str) -> list[str] | None:
    if spec.kind == "regression":
        return None
    if spec.labels is not None:
        return spec.labels
    features = getattr(train_rows, "features", None)
    feature = features.get(spec.label) if features is not None else None
    if feature is not None and getattr(feature, "names", None):
        return list(feature.names)  # a datasets ClassLabel
    values = _column(train_rows, spec.label, "label", spec.train_split, spec, source)
    for row, value in enumerate(values):
        if _blank(value):
            _no_label(spec, value, spec.train_split, row, source)
    if all(_as_int(v) is not None for v in values) and values:
        return [str(i) for i in range(max(_as_int(v) for v in values) + 1)]
    names = sorted({str(v) for v in values})
    if len(names) < 2:
        raise ValueError(f"task {spec.name}: the label column {spec.label!r} of split {spec.train_split!r} holds "
                         f"{len(names)} distinct value(s) ({', '.join(names)}); a classification needs at least two")
    return names


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _to_split(spec: TaskSpec, split: str, rows: Any, source: str) -> TaskSplit:
    texts = [_text(v) for v in _column(rows, spec.text, "text", split, spec, source)]
    pairs = None
    if spec.text_pair:
        pairs = [_text(v) for v in _column(rows, spec.text_pair, "text_pair", split, spec, source)]
    raw = _column(rows, spec.label, "label", split, spec, source)
    labels = [_label(spec, value, split, i, source) for i, value in enumerate(raw)]
    return TaskSplit(texts=texts, pairs=pairs, labels=labels)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _no_label(spec: TaskSpec, value: Any, split: str, row: int, source: str) -> None:
    what = "missing" if value is None else "empty"
    raise ValueError(f"task {spec.name}: the label (column {spec.label!r}) of row {row} of the {split!r} split of {source} is "
                     f"{what}; every example needs one: fill it in or remove the row")


def _label(spec: TaskSpec, value: Any, split: str, row: int, source: str = "the data") -> Any:
    if _blank(value):
        _no_label(spec, value, split, row, source)
    if spec.kind == "regression":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"task {spec.name}: label {value!r} in split {split!r} (row {row}) of {source} is not a number; "
                             f"a regression task needs a float in column {spec.label!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"task {spec.name}: label {value!r} in split {split!r} (row {row}) of {source} is not a finite "
                             f"number; a regression trains on it as a target (one NaN makes every weight NaN): "
                             "fix or remove the row")
        return number
    names = spec.labels
    if str(value) in names:
        return names.index(str(value))
    index = _as_int(value)
    if index is not None and 0 <= index < len(names):
        return index
    raise ValueError(f"task {spec.name}: label {value!r} in split {split!r} (row {row}) is not one of the task's labels "
                     f"({', '.join(names)}, or their ids 0..{len(names) - 1}); fix the data or the task's labels")


def iter_texts(split: TaskSplit) -> Iterable[tuple[str, str | None]]:
    """(text, pair) of every example."""
    pairs = split.pairs if split.pairs is not None else [None] * len(split.texts)
    return zip(split.texts, pairs)
