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
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

KINDS = ("classification", "regression")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
# the validation part held out of a single file, chosen by a hash of the row (stable across runs and machines)
DEFAULT_VALIDATION_FRACTION = 0.1
EVAL_SAMPLE_SEED = 0  # max_eval_examples: the evaluation examples kept are a sample with this seed
# a split asked for under one name may be stored under another (GLUE's TSV files call validation "dev")
_SPLIT_ALIASES = {"validation": ("validation", "dev", "valid", "val"),
                  "validation_matched": ("validation_matched", "dev_matched"),
                  "validation_mismatched": ("validation_mismatched", "dev_mismatched"),
                  "train": ("train",), "test": ("test",)}


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
    rows, source = _read_rows(spec, data, validation_fraction)
    needed = [spec.train_split, *spec.eval_splits]
    missing = [s for s in needed if s not in rows]
    if missing:
        raise ValueError(f"task {spec.name}: {source} has no split {', '.join(map(repr, missing))}; it has "
                         f"{', '.join(rows) or 'none'} (set task train_split / eval_splits)")
    if max_examples is not None:
        rows = {name: list(r)[:max_examples] for name, r in rows.items()}
    spec = dataclasses.replace(spec, labels=_label_names(spec, rows[spec.train_split], source))
    splits = {name: _to_split(spec, name, rows[name], source) for name in dict.fromkeys(needed)}
    return TaskData(spec=spec, splits=splits, source=source)


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


def _read_rows(spec: TaskSpec, data: Any, validation_fraction: float) -> tuple[dict[str, list], str]:
    """{split: rows (sequences of mappings)} and a description of where they came from."""
    if _is_dataset_dict(data):
        return {str(k): v for k, v in data.items()}, "the given DatasetDict"
    if isinstance(data, Mapping):
        out = {}
        for split, value in data.items():
            if isinstance(value, (str, os.PathLike)):
                out[str(split)] = _read_file(Path(value))
            else:
                out[str(split)] = value
        return out, "the given rows"
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        path = Path(text).expanduser()
        if path.is_dir():
            return _read_folder(path), str(path)
        if path.is_file():
            rows = _read_file(path)
            return _hold_out(rows, spec, validation_fraction), str(path)
        if path.suffix in FILE_SUFFIXES or text.startswith((".", "/", "~")):
            raise ValueError(f"task {spec.name}: data file {text!r} does not exist")
        return _read_hub(text), text
    raise ValueError(f"task {spec.name}: data must be a dataset name, a path or a mapping of splits, got {type(data).__name__}")


def _is_dataset_dict(data: Any) -> bool:
    try:
        from datasets import DatasetDict
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, DatasetDict)


def _read_hub(name: str) -> dict[str, Any]:
    from datasets import load_dataset

    if ":" in name:
        path, config = name.split(":", 1)
    elif name.lower().startswith("glue/"):
        path, config = "glue", name[5:]
    else:
        path, config = name, None
    from kroncompress import hub

    hub.require_dataset(path)  # offline: one line at once instead of ~30 s of retries
    try:
        loaded = load_dataset(path, config)
    except Exception as exc:  # noqa: BLE001  network, unknown name, unknown config: one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"could not load dataset {name!r} ({first}); offline, pass a save_to_disk folder or "
                         "csv/tsv/jsonl files instead") from exc
    return dict(loaded)


def _read_folder(path: Path) -> dict[str, Any]:
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        from datasets import Dataset, load_from_disk

        loaded = load_from_disk(str(path))
        return {"train": loaded} if isinstance(loaded, Dataset) else dict(loaded)
    out: dict[str, Any] = {}
    for file in sorted(path.iterdir()):
        if file.suffix in FILE_SUFFIXES and file.is_file():
            split = next((canonical for canonical, aliases in _SPLIT_ALIASES.items() if file.stem in aliases), file.stem)
            out[split] = _read_file(file)
    if not out:
        raise ValueError(f"folder {path} holds no dataset (save_to_disk) and no {'/'.join(FILE_SUFFIXES)} files")
    return out


def _read_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{number}: not a JSON object per line ({exc.msg})") from None
        return rows
    if path.suffix in (".csv", ".tsv"):
        # GLUE's TSV files are unquoted (sentences hold stray quotes): read tabs literally
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
        with path.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle, **options))
    raise ValueError(f"data file {str(path)!r}: unsupported type {path.suffix!r}; use {', '.join(FILE_SUFFIXES)}")


def _hold_out(rows: list[dict], spec: TaskSpec, fraction: float) -> dict[str, list]:
    """Split one file's rows into the train split and the (first) evaluation split by a hash of each row."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    train, held = [], []
    for row in rows:
        digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode("utf-8")).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(row)
    return {spec.train_split: train, spec.eval_splits[0]: held}


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
    labels = [_label(spec, value, split, i) for i, value in enumerate(raw)]
    if not texts:
        raise ValueError(f"task {spec.name}: the {split!r} split of {source} is empty")
    return TaskSplit(texts=texts, pairs=pairs, labels=labels)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _label(spec: TaskSpec, value: Any, split: str, row: int) -> Any:
    if spec.kind == "regression":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"task {spec.name}: label {value!r} in split {split!r} (row {row}) is not a number; "
                             f"a regression task needs a float in column {spec.label!r}") from None
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
