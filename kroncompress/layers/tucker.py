"""Tucker linear layer: the tensorized weight (o_1..o_d, i_1..i_d) = core x_k U_k, applied mode by mode."""

from __future__ import annotations

import math

import torch
from torch import nn

from kroncompress.errors import DataError
from kroncompress.layers.base import FactorizedLinear
from kroncompress.linalg.tensorized import tucker_matmul, tucker_matmul_flops, tucker_plan_orders, tucker_to_matrix


class TuckerLinear(FactorizedLinear):
    """Drop-in for nn.Linear / Conv1D with W (out x in) in Tucker format.

    out = prod(out_shape), in = prod(in_shape); `ranks` has one entry per mode (out modes, then in modes).
    Parameters: `core` (ranks) and `factors.k` (dim_k x rank_k). Forward shrinks the input modes, applies
    the core as one GEMM and expands the output modes, each side in its cheapest mode order.
    """

    FACTOR_AXES = {"core": -1, "factors": 1}  # quantization axes (kc.quantize): the last core mode; factors along the rank

    def __init__(self, out_shape, in_shape, ranks, bias: bool = True, layout: str = "linear", device=None, dtype=None):
        out_shape, in_shape, ranks = tuple(out_shape), tuple(in_shape), tuple(ranks)
        dims = out_shape + in_shape
        if len(out_shape) != len(in_shape) or len(ranks) != len(dims):
            raise DataError(f"TuckerLinear: out_shape {out_shape} and in_shape {in_shape} need the same length and "
                             f"ranks one entry per mode ({len(dims)}), got ranks {ranks}")
        super().__init__(math.prod(in_shape), math.prod(out_shape), bias, layout, device, dtype)
        self.out_shape, self.in_shape, self.ranks = out_shape, in_shape, ranks
        self.core = nn.Parameter(torch.empty(*ranks, device=device, dtype=dtype))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(dim, rank, device=device, dtype=dtype)) for dim, rank in zip(dims, ranks)]
        )
        self._orders = tucker_plan_orders(out_shape, in_shape, ranks)
        if self.core.device.type != "meta":
            nn.init.normal_(self.core, std=math.prod(ranks[len(out_shape):]) ** -0.5)
            for factor, dim in zip(self.factors, dims):
                nn.init.normal_(factor, std=dim**-0.5)

    @classmethod
    def from_factors(cls, core, factors, out_shape=None, in_shape=None, bias=None, layout: str = "linear") -> "TuckerLinear":
        """From core (r_1..r_2d) and factors [U_k (dim_k x r_k)]; shapes default to the factors' row counts."""
        factors = list(factors)
        d = core.dim() // 2
        if core.dim() % 2 or len(factors) != core.dim() or any(f.dim() != 2 or f.shape[1] != r for f, r in zip(factors, core.shape)):
            raise DataError(f"TuckerLinear factors must be a core with 2d modes and one (dim_k, r_k) matrix per mode; "
                             f"got core {tuple(core.shape)} and factors {[tuple(f.shape) for f in factors]}")
        out_shape = tuple(out_shape or [f.shape[0] for f in factors[:d]])
        in_shape = tuple(in_shape or [f.shape[0] for f in factors[d:]])
        layer = cls(out_shape, in_shape, core.shape, bias is not None, layout, "meta", core.dtype).to_empty(device=core.device)
        with torch.no_grad():
            layer.core.copy_(core)
            for param, factor in zip(layer.factors, factors):
                param.copy_(factor)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def weight_matmul(self, x):
        lead = x.shape[:-1]
        y = tucker_matmul(x.reshape(-1, self.in_features), self.core, list(self.factors), self._orders)
        return y.reshape(*lead, self.out_features)

    def dense_weight(self):
        return tucker_to_matrix(self.core, list(self.factors), self.out_features, self.in_features)

    def spec(self):
        return {"out_shape": list(self.out_shape), "in_shape": list(self.in_shape), "ranks": list(self.ranks)}

    def flops_per_token(self):
        return tucker_matmul_flops(self.out_shape, self.in_shape, self.ranks)
