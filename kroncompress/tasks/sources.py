"""Where a task's labelled rows come from: a hub dataset, a `save_to_disk` folder, a folder of csv / tsv /
jsonl files named after their splits, one such file (its validation part held out by a hash of each row),
or rows given in memory; `read_rows` returns them by split for `load_task` to check (kroncompress.tasks.data)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from kroncompress.tasks.spec import TaskSpec

FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
FIELD_LIMIT = 2**31 - 1  # one csv cell may hold a whole document (tokenising truncates it)
# a split asked for under one name may be stored under another (GLUE's TSV files call validation "dev")
_SPLIT_ALIASES = {"validation": ("validation", "dev", "valid", "val"),
                  "validation_matched": ("validation_matched", "dev_matched"),
                  "validation_mismatched": ("validation_mismatched", "dev_mismatched"),
                  "train": ("train",), "test": ("test",)}


def read_rows(spec: TaskSpec, data: Any, validation_fraction: float) -> tuple[dict[str, list], str]:
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
            return _hold_out(rows, spec, validation_fraction, str(path)), str(path)
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
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"data file {str(path)!r}: unsupported type {path.suffix!r}; use {', '.join(FILE_SUFFIXES)}")
    try:
        return _read_json_lines(path) if path.suffix in (".jsonl", ".json") else _read_table(path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text (byte {exc.start} of a line); convert it, e.g. "
                         f"iconv -f latin1 -t utf-8") from None


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as handle:  # -sig: a byte-order mark (as Windows tools write) is not text
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON object per line ({exc.msg})") from None
    return rows


def _read_table(path: Path) -> list[dict[str, Any]]:
    # GLUE's TSV files are unquoted (sentences hold stray quotes): read tabs literally
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
    limit = csv.field_size_limit()
    csv.field_size_limit(FIELD_LIMIT)  # csv's default (128 KiB) refuses a long document in one cell
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(handle, **options)
            try:
                return list(reader)
            except csv.Error as exc:
                raise ValueError(f"{path}:{reader.line_num}: not a readable {path.suffix[1:]} row ({exc})") from None
    finally:
        csv.field_size_limit(limit)


def _hold_out(rows: list[dict], spec: TaskSpec, fraction: float, source: str = "the data file") -> dict[str, list]:
    """Split one file's rows into the train split and the (first) evaluation split by a hash of each row."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    train, held = [], []
    for row in rows:
        digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode("utf-8")).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(row)
    if rows and (not held or not train):
        empty = spec.eval_splits[0] if not held else spec.train_split
        raise ValueError(f"task {spec.name}: {source} has {len(rows)} row(s), and none of them landed in the "
                         f"{empty!r} split ({fraction:.0%} of the rows are held out for {spec.eval_splits[0]!r} by a hash "
                         f"of each row); give more rows, or a folder with train and validation files (train.csv, dev.csv)")
    return {spec.train_split: train, spec.eval_splits[0]: held}
