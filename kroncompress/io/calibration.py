"""Save and load calibration statistics, so one teacher pass serves many recipes and runs.

    stats = kc.calibrate(model, recipe, tokenizer, data="shakespeare")
    stats.save("gpt2.calibration.safetensors")
    stats = kc.CalibrationStats.load("gpt2.calibration.safetensors")
    kc.compress(model, other_recipe, calibration=stats)   # checked against the model's modules first

The file is safetensors (nothing unpickled): one float64 tensor per distinct input (the undamped sum of
x x^T) and per embedding (its token counts), with the modules, token totals and damping as JSON metadata.
It is written atomically, and everything read back is checked (complete file, format, shapes, finite
values), with an error naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "kroncompress-calibration"
VERSION = 1
MAX_TOKENS = 2**53  # token totals are exact in float64 up to here


def save_calibration(stats, path: str | os.PathLike) -> Path:
    """Write `stats` (a CalibrationStats) to `path` atomically; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"inputs.{i}.sum_xxt": s.sum_xxt.detach().to("cpu", torch.float64).contiguous()
               for i, s in enumerate(stats.inputs)}
    tensors.update({f"token_counts.{i}.counts": s.counts.detach().to("cpu", torch.float64).contiguous()
                    for i, s in enumerate(stats.token_counts)})
    groups = {"inputs": [{"modules": list(s.modules), "tokens": int(s.tokens)} for s in stats.inputs],
              "token_counts": [{"modules": list(s.modules), "tokens": int(s.tokens), "padding_idx": s.padding_idx}
                               for s in stats.token_counts]}
    metadata = {"format": FORMAT, "version": str(VERSION), "damping": repr(float(stats.damping)),
                "groups": json.dumps(groups)}
    if getattr(stats, "sensitivity", None) is not None:  # a budget's measured module weights (optional)
        metadata["sensitivity"] = json.dumps({name: float(s) for name, s in stats.sensitivity.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)  # readers see the old file or the complete new one
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def check_calibration_file(path: str | os.PathLike) -> tuple[float, dict]:
    """(damping, groups) of the statistics file at `path`, from its header alone (no tensor is read): a cheap
    check that it exists, is a complete safetensors file and holds calibration statistics this kroncompress
    reads. Raises as `load_calibration` does; `load_calibration` checks the tensors too."""
    from safetensors import safe_open

    from kroncompress.io.checks import check_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such calibration file; collect statistics with kc.calibrate(...) and "
                                "save them with stats.save(path)")
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not kroncompress calibration statistics (metadata format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        version = int(metadata.get("version", ""))
    except ValueError:
        raise _bad(path, "version", f"{metadata.get('version')!r} is not an integer") from None
    if version > VERSION:
        raise ValueError(f"{path}: written by a newer kroncompress (format version {version}, this one reads up to "
                         f"{VERSION}); upgrade kroncompress or collect the statistics again")
    try:
        damping = float(metadata["damping"])
        groups = json.loads(metadata["groups"])
    except (KeyError, ValueError) as exc:
        raise _bad(path, "metadata", f"missing or malformed damping/groups ({exc})") from None
    if not 0 <= damping < math.inf:
        raise _bad(path, "damping", f"must be a finite number >= 0, got {metadata['damping']!r}")
    if not isinstance(groups, dict):
        raise _bad(path, "groups", "is not a JSON object")
    return damping, groups


def _bad(path: Path, field: str, problem: str) -> ValueError:
    return ValueError(f"{path}: {field}: {problem}; the file was edited or damaged: collect the statistics again")


def load_calibration(path: str | os.PathLike, device: str | torch.device | None = None):
    """The CalibrationStats saved at `path` (by `save_calibration` / `CalibrationStats.save`); its `path`
    attribute is set to `path`.

    Raises FileNotFoundError for a missing file and ValueError, naming the file and the field, for one that
    is truncated, not safetensors, not calibration statistics, from a newer kroncompress, or inconsistent.
    """
    from safetensors import safe_open

    from kroncompress.calibration import CalibrationStats, InputStatistic, TokenCount
    from kroncompress.io.checks import first_nonfinite

    path = Path(path)
    damping, groups = check_calibration_file(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}

    def bad(field: str, problem: str) -> ValueError:
        return _bad(path, field, problem)

    bad_values = first_nonfinite(tensors)
    if bad_values is not None:
        name, count, size = bad_values
        raise bad(name, f"{count} of {size} values are NaN or infinite")

    seen: set[str] = set()

    def entry(kind: str, i: int, item: Any, tensor_name: str, dims: int) -> tuple[list[str], int, torch.Tensor]:
        field = f"groups.{kind}[{i}]"
        if not isinstance(item, dict):
            raise bad(field, "is not an object")
        modules, tokens = item.get("modules"), item.get("tokens")
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
            raise bad(f"{field}.modules", "must be a non-empty list of module names")
        if type(tokens) is not int or not 0 <= tokens <= MAX_TOKENS:
            raise bad(f"{field}.tokens", f"must be an integer from 0 to 2**53 (the tokens seen), got {tokens!r}")
        twice = seen.intersection(modules)
        if twice:
            raise bad(f"{field}.modules", f"module {sorted(twice)[0]!r} is listed twice")
        seen.update(modules)
        tensor = tensors.pop(tensor_name, None)
        if tensor is None:
            raise bad(field, f"its tensor {tensor_name!r} is missing")
        if tensor.dim() != dims or (dims == 2 and tensor.shape[0] != tensor.shape[1]) or tensor.numel() == 0:
            raise bad(tensor_name, f"has shape {tuple(tensor.shape)}; expected "
                                   + ("a square n x n matrix" if dims == 2 else "a non-empty vector"))
        tensor = tensor.to(dtype=torch.float64)
        if dims == 1 and float(tensor.sum()) != tokens:  # a token histogram counts every token once
            raise bad(f"{field}.tokens", f"is {tokens} but the token counts add up to {float(tensor.sum()):.0f}")
        if dims == 2 and tokens == 0 and bool(tensor.any()):
            raise bad(f"{field}.tokens", "is 0 but the statistics are not empty")
        if dims == 2 and bool((tensor.diagonal() < 0).any()):  # a sum of x x^T has a non-negative diagonal
            raise bad(tensor_name, "has negative diagonal entries: not a sum of x x^T")
        return modules, tokens, tensor.to(device=device)

    inputs, counts = [], []
    for i, item in enumerate(_list(groups, "inputs", bad)):
        modules, tokens, tensor = entry("inputs", i, item, f"inputs.{i}.sum_xxt", 2)
        inputs.append(InputStatistic(tensor, tokens, modules))
    for i, item in enumerate(_list(groups, "token_counts", bad)):
        modules, tokens, tensor = entry("token_counts", i, item, f"token_counts.{i}.counts", 1)
        padding = item.get("padding_idx")
        if padding is not None and (type(padding) is not int or not 0 <= padding < tensor.numel()):
            raise bad(f"groups.token_counts[{i}].padding_idx", f"must be null or a token id, got {padding!r}")
        counts.append(TokenCount(tensor, padding, tokens, modules))
    if tensors:
        raise bad(f"tensor {sorted(tensors)[0]!r}", "no group refers to it")
    stats = CalibrationStats(inputs, damping, counts)
    stats.sensitivity = _sensitivity(path, bad)
    stats.path = path
    return stats


def _sensitivity(path: Path, bad) -> dict[str, float] | None:
    """The optional `sensitivity` metadata: module name -> a finite weight >= 0."""
    import math

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("sensitivity")
    if raw is None:
        return None
    try:
        values = json.loads(raw)
    except ValueError:
        raise bad("sensitivity", "is not JSON") from None
    if not isinstance(values, dict) or not all(isinstance(k, str) and type(v) in (int, float) and math.isfinite(v)
                                               and v >= 0 for k, v in values.items()):
        raise bad("sensitivity", "must map module names to finite numbers >= 0")
    return {k: float(v) for k, v in values.items()}


def _list(groups: dict, key: str, bad) -> list:
    value = groups.get(key, [])
    if not isinstance(value, list):
        raise bad(f"groups.{key}", "is not a list")
    return value
