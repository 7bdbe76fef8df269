"""Low-rank (truncated SVD) layer: W = U V with U (out x k), V (k x in)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kroncompress.errors import DataError
from kroncompress.layers.base import FactorizedLinear


class LowRankLinear(FactorizedLinear):
    """Drop-in for nn.Linear / Conv1D with W (out x in) = U @ V; forward is x V^T U^T (two thin GEMMs)."""

    FACTOR_AXES = {"u": 1, "v": 1}  # quantization axis (kc.quantize): one scale per row of U and of V

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, layout: str = "linear", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, layout, device, dtype)
        self.rank = rank
        self.u = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.v = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        if self.u.device.type != "meta":
            nn.init.normal_(self.u, std=rank**-0.5)
            nn.init.normal_(self.v, std=in_features**-0.5)

    @classmethod
    def from_factors(cls, U, V, bias=None, layout: str = "linear") -> "LowRankLinear":
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0]:
            raise DataError(f"LowRankLinear factors must be U (out, k) and V (k, in); got {tuple(U.shape)} and {tuple(V.shape)}")
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias is not None, layout, "meta", U.dtype).to_empty(device=U.device)
        with torch.no_grad():
            layer.u.copy_(U)
            layer.v.copy_(V)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def weight_matmul(self, x):
        return F.linear(F.linear(x, self.v), self.u)

    def factored_forward(self, x):
        return F.linear(F.linear(x, self.v), self.u, self.bias)  # the bias fused into the second GEMM

    def dense_weight(self):
        return self.u @ self.v

    def spec(self):
        return {"rank": self.rank}

    def flops_per_token(self):
        return 2 * self.rank * (self.in_features + self.out_features)
