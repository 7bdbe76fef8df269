"""Checkpoints of a distillation run: which one to resume from, and whether the resumed run is the same run.

    checkpoint = resume_point("runs/x/checkpoints")     # newest intact checkpoint-<step>, warns past damaged ones
    verify_settings("runs/x/checkpoints", settings, checkpoint)   # ResumeError naming every changed setting

A fresh run records the settings that must not change (`record_settings`) in `run_settings.json` next to
its checkpoints; a resumed one compares its own against them, so a different `max_steps`, data, recipe or
batch size fails with one line instead of silently mixing two runs (or a size-mismatch traceback).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kroncompress.errors import CheckpointError

CHECKPOINT_PREFIX = "checkpoint-"
SETTINGS_NAME = "run_settings.json"
# training settings that may change between sessions of one run: they do not change what is trained
_FREE = {"train.save_every", "train.eval_every", "train.gradient_checkpointing", "train.max_steps"}
_FREE_PREFIXES = ("train.training_args",)  # reporting and logging may change between sessions
_MAX_VALUE_CHARS = 80


class ResumeError(CheckpointError):
    """A run cannot be resumed: its settings changed, or no checkpoint is intact. The message says what to do."""


# -- which checkpoint ----------------------------------------------------------------------------------

def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` (a `checkpoint-<step>`) cannot be resumed from, or None when it is intact.

    Cheap: reads trainer_state.json and the safetensors header, checks the weights' size against the header
    and that the optimizer/scheduler/RNG files (torch zip archives) are complete; loads no tensor.
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["global_step"])
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    try:
        safetensors_header(folder / "model.safetensors")
    except ValueError as exc:
        return str(exc)
    if not any(folder.glob("optimizer*")):
        return "the optimizer state is missing"
    if not (folder / "scheduler.pt").is_file():
        return "scheduler.pt is missing"
    for path in sorted(folder.glob("*.pt*")):  # optimizer.pt, scheduler.pt, rng_state*.pth
        if path.is_file() and not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or damaged"
    return None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors file's header; ValueError (naming the file) if it is missing,
    not safetensors, or shorter than its header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            raw = handle.read(length) if 0 <= length <= size - 8 else None
    except FileNotFoundError:
        raise ValueError(f"{path.name} is missing") from None
    except OSError as exc:
        raise ValueError(f"{path.name} is unreadable ({exc.strerror or type(exc).__name__})") from None
    if raw is None:
        raise ValueError(f"{path.name} is truncated or not a safetensors file")
    try:
        entries = {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ValueError(f"{path.name} is not a readable safetensors file") from None
    if 8 + length + end != size:
        raise ValueError(f"{path.name} is truncated ({size:,} of {8 + length + end:,} bytes)")
    return entries


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every `checkpoint-<step>` folder in `output_dir`, intact or not, newest first."""
    return _checkpoints(Path(output_dir))


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and p.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest intact `checkpoint-<step>` folder in `output_dir` (see `checkpoint_problem`), or None."""
    return next((str(p) for p in _checkpoints(Path(output_dir)) if checkpoint_problem(p) is None), None)


def resume_point(output_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from: the newest intact one, with a warning for each newer damaged one (a
    run killed while writing it). None when there is no checkpoint at all; ResumeError when none is intact."""
    damaged = []
    for path in _checkpoints(Path(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            for name, why in damaged:
                warnings.warn(f"{name} in {output_dir} is damaged ({why}): resuming from {path.name} instead",
                              stacklevel=3)
            return str(path)
        damaged.append((path.name, problem))
    if damaged:
        listed = "; ".join(f"{name}: {why}" for name, why in damaged)
        raise ResumeError(f"cannot resume: no intact checkpoint in {output_dir} ({listed}); start again without "
                          "resume=True, in an empty folder (CLI: --overwrite instead of --resume)")
    return None


def load_checkpoint_weights(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load a checkpoint's model.safetensors into `model` (written de-duplicated: a shared tensor is stored
    under one of its names and loading it fills every alias)."""
    from safetensors.torch import load_file

    from kroncompress.io.save import unique_state

    state = load_file(os.path.join(checkpoint, "model.safetensors"), device="cpu")
    expected = set(unique_state(model))
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise ResumeError(f"{checkpoint}: its weights do not match the model ({len(odd)} tensor names differ, e.g. "
                          f"{odd[0]!r}); it was written by a run with another model or recipe")
    model.load_state_dict(state, strict=False)


# -- same run? -----------------------------------------------------------------------------------------

def fingerprint(value: Any) -> str:
    """A short stable hash of JSON-like data (dataclasses and paths included)."""
    text = json.dumps(_plain(value), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def run_settings(config: Any, max_steps: int, student: nn.Module, train_dataset: Any, eval_dataset: Any,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the DistillConfig's losses, data and
    training settings (flattened: `train.lr`, `data.source`, ...), the step budget, the student's layout,
    the token blocks (count, length and a hash; validation blocks when given) and `extra` (e.g. the recipe's
    fingerprint)."""
    settings = {k: v for k, v in _flatten(_plain(config)).items() if k not in _FREE and not k.startswith(_FREE_PREFIXES)}
    settings["max_steps"] = max_steps if max_steps > 0 else None
    settings["student"] = _describe_model(student)
    settings["train_data"] = _describe_data(train_dataset)
    if eval_dataset is not None:  # a session without evaluation mixes no validation sets
        settings["eval_data"] = _describe_data(eval_dataset)
    settings.update(_plain(extra or {}))
    return json.loads(json.dumps(settings, default=str))  # what the file will read back


def record_settings(output_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Write `settings` to `output_dir`/run_settings.json (atomically)."""
    path = Path(output_dir) / SETTINGS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{SETTINGS_NAME}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)


def verify_settings(output_dir: str | os.PathLike, settings: dict[str, Any], checkpoint: str,
                    student: nn.Module) -> None:
    """ResumeError naming every setting that differs from the recorded run (both values) and every weight
    of `checkpoint` whose shape the student does not have. Settings recorded on one side only are skipped
    (a run from an older version records fewer); no record at all only warns."""
    path = Path(output_dir) / SETTINGS_NAME
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        warnings.warn(f"{output_dir} has no {SETTINGS_NAME}: resuming without checking the run's settings", stacklevel=3)
        recorded = {}
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path} is unreadable ({type(exc).__name__}); start again without resume=True "
                          "(CLI: --overwrite instead of --resume)") from None
    changed = [f"{key} {_short(recorded[key])} then, {_short(settings[key])} now"
               for key in sorted(set(recorded) & set(settings)) if recorded[key] != settings[key]]
    if changed:
        raise ResumeError(f"cannot resume from {Path(checkpoint).name}: the run was started with other settings "
                          f"({'; '.join(changed)}); re-run with the same values to continue it, or start again "
                          "without resume=True in an empty folder (CLI: --overwrite instead of --resume)")
    _verify_layout(student, checkpoint)


def _verify_layout(student: nn.Module, checkpoint: str) -> None:
    header = safetensors_header(Path(checkpoint) / "model.safetensors")
    state = student.state_dict()
    for name, entry in header.items():
        shape = list(state[name].shape) if name in state else None
        if shape != list(entry.get("shape", [])):
            here = f"shape {shape}" if shape is not None else "no such tensor"
            raise ResumeError(f"cannot resume from {Path(checkpoint).name}: its weight {name} has shape "
                              f"{entry.get('shape')} and the model here {here}; it was written by a run with another "
                              "model or recipe: re-run with that recipe, or start again without resume=True "
                              "(CLI: --overwrite instead of --resume)")


def _describe_model(model: nn.Module) -> str:
    shapes = [(name, list(t.shape), str(t.dtype)) for name, t in model.state_dict().items()]
    count = sum(p.numel() for p in model.parameters())
    return f"{count:,} parameters, layout {fingerprint(shapes)}"


def _describe_data(dataset: Any) -> str | None:
    if dataset is None:
        return None
    blocks = getattr(dataset, "blocks", None)
    if isinstance(blocks, torch.Tensor) and blocks.dim() == 2:
        data = blocks.detach().cpu().contiguous().numpy()
        digest = hashlib.blake2b(data.tobytes(), digest_size=6).hexdigest()
        return f"{blocks.shape[0]} blocks of {blocks.shape[1]} tokens, hash {digest}"
    return f"{len(dataset)} examples ({type(dataset).__name__})"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."
