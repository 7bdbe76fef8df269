"""Symmetric weight-only integer quantization of a tensor: integers plus one scale per group.

A tensor is cut along one `axis` into groups of `group_size` consecutive entries (the whole axis when
`group_size` is None or not smaller than it; the last group shorter when group_size does not divide the axis,
as a rank chosen by a budget often does not); every other index gets its own groups, so with group_size None
this is per-channel quantization over the remaining axes. Each group stores s = max|w| / qmax
(qmax = 2^(bits-1) - 1: 127 for int8, 7 for int4) and q = round(w / s) in [-qmax, qmax]; w is read back
as q * s. Nothing is clipped, so every entry is within s / 2 of its original value.

int8 is stored as an int8 tensor of the original shape; int4 as nibbles packed two per uint8 byte over the
flattened tensor (an odd count padded with one zero nibble).
"""

from __future__ import annotations

import math

import torch

from kroncompress.errors import DataError

BITS = (4, 8)


def check_quant_args(bits, group_size, field: str = "quantize") -> None:
    """Raise ValueError naming `field` unless bits is 4 or 8 and group_size is None or a positive int."""
    if isinstance(bits, bool) or bits not in BITS:
        raise DataError(f"{field}.bits: must be 4 or 8 (weight-only int4 / int8), got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise DataError(f"{field}.group_size: must be a positive integer, or null for one scale per channel, got {group_size!r}")


def group_length(length: int, group_size: int | None) -> int:
    """Entries per (full) group along an axis of `length`."""
    return length if group_size is None or group_size >= length else group_size


def group_count(length: int, group_size: int | None) -> int:
    """Groups along an axis of `length`, the last one shorter when group_size does not divide it."""
    return -(-length // group_length(length, group_size))


def scale_shape(shape: tuple[int, ...], axis: int, group_size: int | None) -> tuple[int, ...]:
    """Shape of the scales: `shape` with the quantized axis replaced by its number of groups."""
    axis = axis % len(shape)
    groups = group_count(shape[axis], group_size)
    return tuple(groups if d == axis else n for d, n in enumerate(shape))


def qdata_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """Shape of the stored integers: the tensor's own for int8, ceil(numel / 2) bytes for int4."""
    return tuple(shape) if bits == 8 else ((math.prod(shape) + 1) // 2,)


def quantized_nbytes(shape: tuple[int, ...], bits: int, group_size: int | None, axis: int, scale_itemsize: int) -> int:
    """Bytes of the integers plus the scales."""
    return math.prod(qdata_shape(shape, bits)) + math.prod(scale_shape(shape, axis, group_size)) * scale_itemsize


def _grouped(t: torch.Tensor, axis: int, g: int) -> torch.Tensor:
    """(..., groups, g) with the quantized axis last, a ragged last group padded with zeros (which change
    neither its largest magnitude nor, cut off again, its values)."""
    moved = t.movedim(axis, -1)
    pad = -moved.shape[-1] % g
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // g, g)


def quantize_symmetric(weight: torch.Tensor, bits: int, group_size: int | None = None, axis: int = -1
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(qdata, scale) of `weight` (see the module docstring); scale has weight's dtype, shape `scale_shape`."""
    check_quant_args(bits, group_size)
    axis = axis % weight.dim()
    g = group_length(weight.shape[axis], group_size)
    qmax = 2 ** (bits - 1) - 1
    grouped = _grouped(weight.detach().float(), axis, g)
    scale = grouped.abs().amax(dim=-1, keepdim=True) / qmax
    q = torch.round(grouped / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(-qmax, qmax).to(torch.int8)
    q = q.reshape(*q.shape[:-2], -1)[..., :weight.shape[axis]].movedim(-1, axis).contiguous()  # weight's layout
    scale = scale.squeeze(-1).movedim(-1, axis).to(weight.dtype).contiguous()
    return (q if bits == 8 else pack_int4(q.reshape(-1))), scale


def dequantize_symmetric(qdata: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], bits: int,
                         group_size: int | None = None, axis: int = -1) -> torch.Tensor:
    """The tensor of `shape` (in scale's dtype) that quantize_symmetric's (qdata, scale) stand for."""
    axis = axis % len(shape)
    g = group_length(shape[axis], group_size)
    q = (qdata if bits == 8 else unpack_int4(qdata, math.prod(shape)).reshape(shape)).to(scale.dtype)
    if g == shape[axis]:  # one scale per channel: it broadcasts along the axis as it is
        return q * scale
    if shape[axis] % g == 0:  # whole groups: a view, no copy of the scales (this runs in every forward)
        return (q.unflatten(axis, (shape[axis] // g, g)) * scale.unsqueeze(axis + 1)).flatten(axis, axis + 1)
    return q * scale.repeat_interleave(g, dim=axis).narrow(axis, 0, shape[axis])  # a shorter last group


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values in [-8, 7] (a flat int tensor) packed two per uint8: the even entry in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_full((1,), 8)])  # a zero nibble
    return (u[0::2] | (u[1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` int8 values of pack_int4's bytes."""
    pairs = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)[:count]
    return pairs.to(torch.int8) - 8
