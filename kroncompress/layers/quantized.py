"""Weight-only integer storage of a module's factor tensors, dequantized when forward reads them.

`quantize_tensors(module, {"a": axis, ...}, bits, group_size)` replaces each named Parameter (or
ParameterList) of `module` by a `QuantizedTensor` submodule `<name>_quant` (buffers `qdata`: int8, or int4 packed in uint8,
and `scale`) and switches the module's class to a subclass (`QuantizedKroneckerLinear`, ...) whose attribute
of that name is a property returning the dequantized tensor. The module's own forward is unchanged: it
reads `self.a` (or `self.factors[k]`) as before and gets q * s, so every strategy, forward mode and tied
head works as it did, on the rounded factors. The state dict holds `<name>_quant.qdata` and `<name>_quant.scale`.

Which tensors and along which axis: each factorized layer's `FACTOR_AXES` (the axis its entries are
contracted over with the input or the rank, so one scale per output channel or rank row); a dense
nn.Linear / Conv1D quantizes `weight` along its input axis.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from kroncompress.errors import DataError
from kroncompress.linalg.quantize import (
    check_quant_args, dequantize_symmetric, qdata_shape, quantize_symmetric, quantized_nbytes, scale_shape,
)


SUFFIX = "_quant"


class QuantizedTensor(nn.Module):
    """One float tensor of `shape` stored as integers (`qdata`) and per-group scales (`scale`)."""

    def __init__(self, shape, bits: int, group_size: int | None, axis: int, dtype=torch.float32, device=None):
        super().__init__()
        check_quant_args(bits, group_size)
        self.shape, self.bits, self.group_size, self.axis = tuple(shape), bits, group_size, axis % len(shape)
        int_dtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qdata", torch.zeros(qdata_shape(self.shape, bits), dtype=int_dtype, device=device))
        self.register_buffer("scale", torch.zeros(scale_shape(self.shape, self.axis, group_size), dtype=dtype, device=device))

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, bits: int, group_size: int | None, axis: int) -> "QuantizedTensor":
        stored = cls(tensor.shape, bits, group_size, axis, tensor.dtype, tensor.device)
        qdata, scale = quantize_symmetric(tensor, bits, group_size, axis)
        stored.qdata.copy_(qdata)
        stored.scale.copy_(scale)
        return stored

    def dequantize(self) -> torch.Tensor:
        return dequantize_symmetric(self.qdata, self.scale, self.shape, self.bits, self.group_size, self.axis)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.qdata.nbytes + self.scale.nbytes

    def extra_repr(self) -> str:
        groups = f"group_size={self.group_size}" if self.group_size else "per-channel"
        return f"shape={self.shape}, int{self.bits}, {groups}, axis={self.axis}"


def _dense_axes(module: nn.Module) -> dict[str, int]:
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D):
        return {"weight": 0}  # Conv1D stores (in x out)
    if isinstance(module, nn.Linear):
        return {"weight": 1}
    return {}


def factor_axes(module: nn.Module) -> dict[str, int]:
    """{tensor attribute: quantization axis} of a module kc.quantize can quantize ({} for any other)."""
    axes = getattr(type(module), "FACTOR_AXES", None)
    return dict(axes) if axes is not None else _dense_axes(module)


def is_quantized(module: nn.Module) -> bool:
    return getattr(type(module), "_kc_quantized", False)


def stored_name(name: str) -> str:
    """The submodule holding the integers of factor `name` (not `name` itself: get_submodule must not meet
    the property)."""
    return f"{name}{SUFFIX}"


def _stored(module: nn.Module, name: str):
    stored = module._modules.get(stored_name(name))
    if isinstance(stored, QuantizedTensor):
        return stored.dequantize()
    if isinstance(stored, nn.ModuleList) and stored and isinstance(stored[0], QuantizedTensor):
        return [q.dequantize() for q in stored]
    return nn.Module.__getattr__(module, name)


_CLASSES: dict[type, type] = {}


def quantized_class(cls: type) -> type:
    """The subclass of `cls` whose factor attributes read their QuantizedTensor (made once per class)."""
    if getattr(cls, "_kc_quantized", False):
        return cls
    if cls not in _CLASSES:
        names = getattr(cls, "FACTOR_AXES", None) or {"weight": 0}
        namespace = {name: property(lambda self, _n=name: _stored(self, _n)) for name in names}
        namespace.update(_kc_quantized=True, __module__=__name__, __qualname__=f"Quantized{cls.__name__}",
                         __doc__=f"{cls.__name__} whose factors are stored as integers (kroncompress.layers.quantized).")
        if "num_params" in dir(cls):
            namespace["num_params"] = property(lambda self: num_stored(self))
        _CLASSES[cls] = type(f"Quantized{cls.__name__}", (cls,), namespace)
    return _CLASSES[cls]


def num_stored(module: nn.Module) -> int:
    """Weights a module stores: its parameters plus the entries its QuantizedTensors stand for."""
    return sum(p.numel() for p in module.parameters()) + sum(
        m.numel for m in module.modules() if isinstance(m, QuantizedTensor))


def _tensors_of(module: nn.Module, name: str) -> list[torch.Tensor]:
    value = module._modules.get(name) if name in module._modules else module._parameters.get(name)
    if isinstance(value, nn.ParameterList):
        return list(value)
    if isinstance(value, torch.Tensor):
        return [value]
    raise DataError(f"{type(module).__name__} has no float tensor {name!r} to quantize")


def planned_bytes(module: nn.Module, name: str, bits: int, group_size: int | None, axis: int) -> tuple[int, int]:
    """(bytes as stored now, bytes once quantized) of the tensor(s) `name`."""
    tensors = _tensors_of(module, name)
    before = sum(t.numel() * t.element_size() for t in tensors)
    after = sum(quantized_nbytes(tuple(t.shape), bits, group_size, axis, t.element_size()) for t in tensors)
    return before, after


def quantize_tensors(module: nn.Module, axes: dict[str, int], bits: int, group_size: int | None,
                     empty: bool = False) -> nn.Module:
    """Store the tensors `axes` names as integers (in place; returns `module`). `empty=True` only builds
    the structure (zeros), for a state dict to be loaded into."""
    for name, axis in axes.items():
        tensors = _tensors_of(module, name)
        make = (lambda t: QuantizedTensor(t.shape, bits, group_size, axis, t.dtype, t.device)) if empty else (
            lambda t: QuantizedTensor.from_tensor(t, bits, group_size, axis))
        stored = [make(t) for t in tensors]
        is_list = isinstance(module._modules.get(name), nn.ParameterList)
        if is_list:
            del module._modules[name]
        else:
            del module._parameters[name]
        module._modules[stored_name(name)] = nn.ModuleList(stored) if is_list else stored[0]
    module.__class__ = quantized_class(type(module))
    module.__dict__.pop("_dense_cache", None)
    return module


def dequantize_tensors(module: nn.Module) -> nn.Module:
    """Undo quantize_tensors in place: every QuantizedTensor back to a float Parameter (ParameterList) holding
    its dequantized values, and the module back to its own class (for a dense export)."""
    if not is_quantized(module):
        return module
    for key in [k for k in module._modules if k.endswith(SUFFIX)]:
        stored = module._modules.pop(key)
        name = key[: -len(SUFFIX)]
        if isinstance(stored, nn.ModuleList):
            module._modules[name] = nn.ParameterList([nn.Parameter(q.dequantize()) for q in stored])
        else:
            module._parameters[name] = nn.Parameter(stored.dequantize())
    module.__class__ = type(module).__bases__[0]
    module.__dict__.pop("_dense_cache", None)
    return module
