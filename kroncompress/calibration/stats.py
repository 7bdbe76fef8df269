"""Calibration statistics and their file: per-module input second moments (`CalibrationStats`), saved and
loaded so one teacher pass serves many recipes and runs.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from kroncompress.linalg.weighted_kronecker import TokenStatistics
from kroncompress.linalg.whitening import DEFAULT_DAMPING, damp

ROW_CHUNK = 4096  # rows converted to float64 at a time


@dataclass
class InputStatistic:
    """The accumulated sum of x x^T of one distinct input and the modules that read it."""

    sum_xxt: torch.Tensor
    tokens: int = 0
    modules: list[str] = field(default_factory=list)
    _last: Any = field(default=None, repr=False, compare=False)  # weakref to the last input tensor counted

    def add(self, x: torch.Tensor, device: torch.device | None) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        if device is not None:
            rows = rows.to(device)
        for start in range(0, rows.shape[0], ROW_CHUNK):
            chunk = rows[start:start + ROW_CHUNK].to(torch.float64)
            self.sum_xxt.addmm_(chunk.T, chunk)
        self.tokens += rows.shape[0]


@dataclass
class TokenCount:
    """The token-id histogram of one embedding module (float64, length V)."""

    counts: torch.Tensor
    padding_idx: int | None = None
    tokens: int = 0
    modules: list[str] = field(default_factory=list)

    def add(self, ids: torch.Tensor) -> None:
        ids = ids.detach().reshape(-1).to(self.counts.device)
        if self.padding_idx is not None:
            ids = ids[ids != self.padding_idx]
        self.counts += torch.bincount(ids, minlength=self.counts.numel()).to(torch.float64)
        self.tokens += ids.numel()


class CalibrationStats:
    """Per-module input second moments from `collect_statistics` / `calibrate`.

    `for_module(name)` is what a strategy's `decompose(..., stats=)` takes (`matrix(name)` for a linear
    module, token counts for an embedding); `groups` lists modules sharing an input; `memory_bytes` is
    what the accumulators hold.
    """

    def __init__(self, inputs: list[InputStatistic], damping: float = DEFAULT_DAMPING,
                 token_counts: list[TokenCount] | None = None):
        if damping < 0:
            raise ValueError(f"calibration: damping must be >= 0, got {damping}; 0.01 is the usual choice")
        self.inputs = inputs
        self.damping = damping
        self.token_counts = list(token_counts or [])
        self._by_module = {name: stat for stat in inputs for name in stat.modules}
        self._counts_of = {name: stat for stat in self.token_counts for name in stat.modules}
        self._recent: dict[tuple, torch.Tensor] = {}  # damped moments of the last inputs asked for (`matrix`)
        self.path: Path | None = None  # the file `load` read them from (reports name it)
        # module -> the loss's weight on its squared output error (kroncompress.sensitivity), for a recipe's budget
        self.sensitivity: dict[str, float] | None = None

    def save(self, path) -> Path:
        """Write the statistics to a safetensors file, atomically (`save_calibration`)."""
        return save_calibration(self, path)

    @classmethod
    def load(cls, path, device: str | torch.device | None = None) -> "CalibrationStats":
        """Statistics saved by `save`; every field is checked, errors name the file and the field."""
        return load_calibration(path, device)

    def check_model(self, model: nn.Module, names: Iterable[str]) -> None:
        """Raise ValueError naming the module if the statistics of any of `names` do not fit it (statistics
        collected on another model, or a file saved for one), or if they name a module the model lacks."""
        known = dict(model.named_modules())
        stranger = next((m for m in self.modules if m not in known), None)
        if stranger is not None:
            raise ValueError(f"calibration{self._source}: module {stranger!r} of the statistics is not in the "
                             f"{type(model).__name__}; they were collected on another model (or the file was edited): "
                             "calibrate this model (kc.calibrate) and pass those")
        for name in names:
            stat = self._by_module.get(name) or self._counts_of.get(name)
            if stat is None:
                continue
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue  # planned names come from this model; a dropped block has nothing to fit
            size = stat.counts.numel() if isinstance(stat, TokenCount) else stat.sum_xxt.shape[0]
            expected = getattr(module, "num_embeddings", None) if isinstance(stat, TokenCount) else in_features_or_none(module)
            if expected is not None and size != expected:
                what = "token counts" if isinstance(stat, TokenCount) else "input statistics"
                raise ValueError(f"calibration: module {name!r}: the {what} have size {size} but the module reads "
                                 f"{expected} {'token ids' if isinstance(stat, TokenCount) else 'features'}; they were "
                                 "collected on another model: calibrate this model (kc.calibrate) and pass those")

    @property
    def _source(self) -> str:
        return f" ({self.path})" if self.path is not None else ""

    def __contains__(self, name: str) -> bool:
        return name in self._by_module or name in self._counts_of

    @property
    def modules(self) -> list[str]:
        return list(self._by_module) + list(self._counts_of)

    @property
    def groups(self) -> list[list[str]]:
        return [list(stat.modules) for stat in self.inputs] + [list(stat.modules) for stat in self.token_counts]

    @property
    def memory_bytes(self) -> int:
        return (sum(stat.sum_xxt.numel() * stat.sum_xxt.element_size() for stat in self.inputs)
                + sum(stat.counts.numel() * stat.counts.element_size() for stat in self.token_counts))

    def tokens(self, name: str) -> int:
        """Rows (tokens) seen by the module's input."""
        return (self._by_module.get(name) or self._counts_of[name]).tokens

    def counts(self, name: str) -> torch.Tensor | None:
        """The token-id histogram (float64, length V) of an embedding module, or None if it was not calibrated."""
        stat = self._counts_of.get(name)
        return None if stat is None or stat.tokens == 0 else stat.counts

    def for_module(self, name: str, heads: Iterable[str] = ()):
        """The statistics a strategy receives: `matrix(name)` for a linear module; for an embedding its
        TokenStatistics, with the damped input second moment of the first calibrated tied head in `heads`."""
        if name not in self._counts_of:
            return self.matrix(name)
        counts = self.counts(name)
        if counts is None:
            return None
        head = next((self.matrix(h) for h in heads if self.matrix(h) is not None), None)
        return TokenStatistics(counts, head)

    def raw(self, name: str) -> torch.Tensor:
        """The undamped sum of x x^T over the module's inputs (float64)."""
        return self._by_module[name].sum_xxt

    def matrix(self, name: str) -> torch.Tensor | None:
        """Damped mean second moment of the module's input (float64), or None if it was not calibrated.

        The last two are kept: the modules reading one input (q/k/v, gate/up) ask in turn, and compress asks
        again per stage (plan, decompose, report). Treat the result as read-only."""
        stat = self._by_module.get(name)
        if stat is None or stat.tokens == 0:
            return None
        key = (id(stat), stat.tokens, self.damping)
        if key not in self._recent:
            moment = damp(stat.sum_xxt / stat.tokens, self.damping)
            # squared later (whitening): refuse here what would overflow there, blaming the statistics, not W
            if not bool(torch.isfinite(moment).all()) or moment.abs().max().item() > 1e150:
                raise ValueError(f"calibration{self._source}: module {name!r}: the input second moment (damping "
                                 f"{self.damping:g}) is not finite or too large to whiten (max |C| = "
                                 f"{moment.abs().max().item():.3g}); the statistics were edited or damaged: collect "
                                 "them again (kc.calibrate / kroncompress calibrate)")
            self._recent[key] = moment
            while len(self._recent) > 2:
                self._recent.pop(next(iter(self._recent)))
        return self._recent[key]


def in_features(module: nn.Module) -> int:
    from kroncompress.layers.base import dense_weight_of

    weight, _ = dense_weight_of(module)
    return int(weight.shape[1])


def in_features_or_none(module: nn.Module) -> int | None:
    try:
        return in_features(module)
    except (TypeError, ValueError, AttributeError):
        return None



# -- the file -----------------------------------------------------------------------------------------

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
        raise _damaged(path, "version", f"{metadata.get('version')!r} is not an integer") from None
    if version > VERSION:
        raise ValueError(f"{path}: written by a newer kroncompress (format version {version}, this one reads up to "
                         f"{VERSION}); upgrade kroncompress or collect the statistics again")
    try:
        damping = float(metadata["damping"])
        groups = json.loads(metadata["groups"])
    except (KeyError, ValueError) as exc:
        raise _damaged(path, "metadata", f"missing or malformed damping/groups ({exc})") from None
    if not 0 <= damping < math.inf:
        raise _damaged(path, "damping", f"must be a finite number >= 0, got {metadata['damping']!r}")
    if not isinstance(groups, dict):
        raise _damaged(path, "groups", "is not a JSON object")
    return damping, groups


def _damaged(path: Path, field: str, problem: str) -> ValueError:
    return ValueError(f"{path}: {field}: {problem}; the file was edited or damaged: collect the statistics again")


def load_calibration(path: str | os.PathLike, device: str | torch.device | None = None):
    """The CalibrationStats saved at `path` (by `save_calibration` / `CalibrationStats.save`); its `path`
    attribute is set to `path`.

    Raises FileNotFoundError for a missing file and ValueError, naming the file and the field, for one that
    is truncated, not safetensors, not calibration statistics, from a newer kroncompress, or inconsistent.
    """
    from safetensors import safe_open

    from kroncompress.io.checks import first_nonfinite

    path = Path(path)
    damping, groups = check_calibration_file(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}

    def bad(field: str, problem: str) -> ValueError:
        return _damaged(path, field, problem)

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
