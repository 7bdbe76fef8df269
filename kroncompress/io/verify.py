"""The one check of a compressed folder's weights against the model rebuilt from its config, shared by
`kc.load_compressed` and `from_pretrained` (kroncompress.hf): run on the rebuilt model while it is still
on the meta device, from the files' headers alone, so a wrong size is refused before anything is allocated.

Every tensor the model needs is stored (a tied group once), nothing unknown is stored, each has the
model's shape and a floating dtype where the model has one; a `shared_parameters` group only ties tensors
that are stored once (or stored equal): two different stored tensors are independent weights, and tying
them would silently drop one. After loading, `check_finite` refuses NaN or inf values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from kroncompress.io.checks import CONFIG_NAME, check_safetensors, first_nonfinite
from kroncompress.surgery import CONFIG_KEY

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class Stored:
    """What a weights file says about one tensor, read without its values."""

    dtype: str  # "float32", "int32", ... (safetensors' own name when torch has none)
    shape: tuple[int, ...]
    file: Path

    @property
    def floating(self) -> bool:
        return self.dtype.startswith(("float", "bfloat", "F", "BF", "complex"))


def read_specs(files: Iterable[str | os.PathLike]) -> dict[str, Stored]:
    """{stored name: Stored} of safetensors files (complete files checked, headers only) and of pickle
    `.bin` files (read with weights_only=True onto the meta device: no code runs, no value is read)."""
    specs: dict[str, Stored] = {}
    for file in files:
        path = Path(file)
        if path.suffix == ".safetensors":
            for name, entry in check_safetensors(path).items():
                if name != "__metadata__":
                    dtype = _DTYPES.get(entry["dtype"])
                    specs[name] = Stored(str(dtype).removeprefix("torch.") if dtype else entry["dtype"],
                                         tuple(int(d) for d in entry["shape"]), path)
        elif path.suffix == ".bin":
            try:
                state = torch.load(str(path), map_location="meta", weights_only=True)
            except Exception as exc:  # noqa: BLE001  any unreadable pickle is a damaged file
                raise ValueError(f"{path}: not a readable weights file ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); re-save the folder") from None
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError(f"{path}: not a state dict of tensors; re-save the folder")
            specs.update({name: Stored(str(t.dtype).removeprefix("torch."), tuple(t.shape), path)
                          for name, t in state.items()})
    return specs


def _show(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def check_stored(model: nn.Module, specs: dict[str, Stored], where: str, factors: Iterable[str] = (),
                 optional: Callable[[str], bool] = lambda name: False, strict_shapes: bool = True) -> dict[str, str]:
    """Raise ValueError (one line naming `where` and the tensor) unless the stored tensors fit `model`.

    `factors`: the prefixes of the modules rebuilt from the plan (their tensors must always fit: a factor
    cannot be re-initialised). `optional(name)`: a tensor of the model the file may lack, or a stored one
    the model may lack (a head another class adds or drops; transformers initialises or ignores it).
    `strict_shapes=False` leaves a mismatched dense tensor to transformers (`ignore_mismatched_sizes`).
    Returns {stored name: the model's name for it}."""
    names = model_key_names(model, specs)
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    present = set(names.values())
    missing = [g[0] for g in groups.values() if not any(n in present for n in g) and not all(optional(n) for n in g)]
    unexpected = [old for old, new in names.items() if new not in state and not optional(old)]
    if missing or unexpected:
        raise ValueError(f"{where}: the weights do not match the model rebuilt from config.json: missing keys: "
                         f"{_show(missing) or 'none'}; unexpected keys: {_show(unexpected) or 'none'}. The folder is "
                         "damaged or was written by another version")
    prefixes = tuple(f"{p}." for p in factors)
    for old, new in names.items():
        want, got = state.get(new), specs[old]
        if want is None:
            continue
        if got.floating != (want.is_floating_point() or want.is_complex()):
            raise ValueError(f"{got.file}: tensor {old!r} is {got.dtype}, the model needs "
                             f"{str(want.dtype).removeprefix('torch.')}; the folder was edited or damaged: compress again")
        if got.shape != tuple(want.shape) and (strict_shapes or new.startswith(prefixes)):
            raise ValueError(f"{got.file}: tensor {old!r} has shape {got.shape}, the plan in config.json gives "
                             f"{tuple(want.shape)}; the weights and config.json do not belong together: compress again")
    return names


def check_shared(groups: list[list[str]], specs: dict[str, Stored], names: dict[str, str],
                 read: Callable[[str], torch.Tensor], folder: Path) -> None:
    """A `shared_parameters` group (model names) may tie only tensors stored once: a group two of whose
    members the file holds as different tensors ties independent weights (an edited config.json)."""
    stored_as = {new: old for old, new in names.items()}
    for group in groups:
        stored = [stored_as[n] for n in group if n in stored_as]
        if len(stored) < 2:
            continue
        first = read(stored[0])
        for other in stored[1:]:
            if specs[other].shape != specs[stored[0]].shape or not torch.equal(read(other), first):
                raise ValueError(f"{folder / CONFIG_NAME}: {CONFIG_KEY}.shared_parameters: ties {stored[0]} and "
                                 f"{other}, which {specs[other].file.name} holds as different tensors; the folder was "
                                 "edited or damaged: restore config.json or compress again")


def check_finite(tensors, where: str) -> None:
    """Raise ValueError naming the tensor if any floating tensor of the name -> tensor mapping is NaN or inf."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise ValueError(f"{where}: tensor {bad[0]!r} holds NaN or inf values ({bad[1]:,} of {bad[2]:,}); the folder "
                         "is damaged (or the run diverged): compress again")


def read_tensor(stored: Stored, name: str) -> torch.Tensor:
    """One tensor's values from its file (safetensors, or a `.bin` read with weights_only=True)."""
    if stored.file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(stored.file), framework="pt") as handle:
            return handle.get_tensor(name)
    return torch.load(str(stored.file), map_location="cpu", weights_only=True, mmap=True)[name]


def model_key_names(model: nn.Module, keys) -> dict[str, str]:
    """{stored key: the model's name for it}. transformers' save_pretrained writes some architectures (ViT,
    GPT-NeoX ...) under their legacy checkpoint names and renames them when loading; this applies the same
    renamings (name changes only: a key that needs a tensor conversion keeps its stored name)."""
    names = set(model.state_dict(keep_vars=True))
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [m for m in get_model_conversion_mapping(model) if isinstance(m, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # another transformers: the names as stored
        renamings = []
    if not renamings:
        return {key: key for key in keys}
    prefix, meta = getattr(model, "base_model_prefix", None), dict.fromkeys(names, True)
    return {key: key if key in names else rename_source_key(key, renamings, [], prefix, meta)[0] for key in keys}
