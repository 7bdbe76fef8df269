"""Common contract of the drop-in factorized layers.

Every layer computes y = x W^T + b for an (out x in) weight W that it never materialises in forward.
`layout` records what it replaced ("linear": nn.Linear, "conv1d": GPT-2's Conv1D, whose weight is stored
(in x out)); the factors always describe W in nn.Linear's (out x in) orientation, so a Conv1D weight is
transposed once at decomposition time and forward semantics are identical for both layouts.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kroncompress.errors import DataError

LAYOUTS = ("linear", "conv1d")
FORWARD_MODES = ("factored", "dense")


def dense_weight_of(module: nn.Module) -> tuple[torch.Tensor, str]:
    """(W in out x in orientation, layout) of an nn.Linear or a GPT-2 Conv1D."""
    # transformers is imported lazily (`import kroncompress.layers` needs torch only); a Conv1D exists only once
    # transformers.pytorch_utils has been imported
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D):
        return module.weight.T, "conv1d"
    if isinstance(module, nn.Linear):
        return module.weight, "linear"
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def make_dense(weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> nn.Module:
    """The plain module (nn.Linear or Conv1D) holding the (out x in) `weight`."""
    out_features, in_features = weight.shape
    if layout == "conv1d":
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(out_features, in_features)
        dense.weight = nn.Parameter(weight.T.contiguous().detach().clone())
        dense.bias = nn.Parameter(
            bias.detach().clone() if bias is not None else torch.zeros(out_features, dtype=weight.dtype, device=weight.device)
        )
        return dense
    if layout != "linear":
        raise DataError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dense = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


class FactorizedLinear(nn.Module):
    """Base class: subclasses define `weight_matmul(x)` (x W^T), `dense_weight()` and `spec()`.

    `forward_mode`: "factored" (the default) applies the factors and never builds W (the form that saves
    memory); "dense" builds W from the factors once and runs one GEMM (memory for speed: W is cached next
    to the factors, rebuilt only when a factor changes; while the factors train, W is rebuilt every call
    so gradients reach them). The strategies' `forward_mode` option sets it, and it is saved with the
    plan's options, so a reloaded model keeps it.
    """

    FORWARD_MODES = FORWARD_MODES
    forward_mode = "factored"

    def __init__(self, in_features: int, out_features: int, bias: bool, layout: str, device=None, dtype=None):
        super().__init__()
        if layout not in LAYOUTS:
            raise DataError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.in_features, self.out_features, self.layout = in_features, out_features, layout
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def weight_matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The equivalent (out x in) weight; for export, tests and forward_mode "dense"."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable structure (shapes, ranks) from which the empty layer can be rebuilt."""
        raise NotImplementedError

    def flops_per_token(self) -> int:
        raise NotImplementedError

    def factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_matmul(x)
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_mode == "factored":
            return self.factored_forward(x)
        if self.forward_mode == "dense":
            return F.linear(x, self._forward_weight(), self.bias)
        raise DataError(f"{type(self).__name__}.forward_mode must be one of {self.FORWARD_MODES}, got {self.forward_mode!r}")

    def _forward_weight(self) -> torch.Tensor:
        """W for forward_mode "dense": rebuilt while the factors train or under torch.compile, else cached
        and keyed on every parameter's storage and version counter (an in-place update or .to() rebuilds)."""
        params = [p for name, p in self.named_parameters() if name != "bias"] + list(self.buffers())  # + integer factors
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.compiler.is_compiling():
            return self.dense_weight()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cached = self.__dict__.get("_dense_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.dense_weight().contiguous())
            self.__dict__["_dense_cache"] = cached
        return cached[1]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_flops_per_token(self) -> int:
        return 2 * self.in_features * self.out_features

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The equivalent plain module: nn.Linear, or Conv1D for layout='conv1d'."""
        return make_dense(self.dense_weight(), self.bias, self.layout)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, {self.spec()}"
