"""CP linear layer: the tensorized weight (o_1..o_d, i_1..i_d) as a sum of R rank-one tensors."""

from __future__ import annotations

import math

import torch
from torch import nn

from kroncompress.errors import DataError
from kroncompress.layers.base import FactorizedLinear
from kroncompress.linalg.tensorized import cp_matmul, cp_matmul_flops, cp_to_matrix


class CPLinear(FactorizedLinear):
    """Drop-in for nn.Linear / Conv1D with W (out x in) in CP format of rank R.

    Parameters `factors.k` (dim_k x R), output modes first. Forward is two GEMMs through the Khatri-Rao
    products of the input and the output factors (n x R and m x R, formed per call, shared by all tokens):
    2 R (in + out) FLOPs per token, like a rank-R low-rank layer, while the parameters are R * sum(dims).
    """

    FACTOR_AXES = {"factors": 1}  # quantization axis (kc.quantize): along the rank, one scale per mode index

    def __init__(self, out_shape, in_shape, rank: int, bias: bool = True, layout: str = "linear", device=None, dtype=None):
        out_shape, in_shape = tuple(out_shape), tuple(in_shape)
        if len(out_shape) != len(in_shape):
            raise DataError(f"CPLinear: out_shape {out_shape} and in_shape {in_shape} need the same length")
        super().__init__(math.prod(in_shape), math.prod(out_shape), bias, layout, device, dtype)
        self.out_shape, self.in_shape, self.rank = out_shape, in_shape, int(rank)
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(dim, self.rank, device=device, dtype=dtype)) for dim in out_shape + in_shape]
        )
        if self.factors[0].device.type != "meta":
            for k, factor in enumerate(self.factors):
                # keeps Var(W) about 1 / in: unit-variance factors, the first scaled by 1 / sqrt(R * in)
                nn.init.normal_(factor, std=1.0 if k else (self.rank * self.in_features) ** -0.5)

    @classmethod
    def from_factors(cls, factors, d: int | None = None, bias=None, layout: str = "linear") -> "CPLinear":
        """From [U_k (dim_k x R)], the first d for the output modes (default: half of them)."""
        factors = list(factors)
        d = d if d is not None else len(factors) // 2
        if len(factors) != 2 * d or any(f.dim() != 2 or f.shape[1] != factors[0].shape[1] for f in factors):
            raise DataError(f"CPLinear factors must be 2d matrices (dim_k, R) with the same R; got "
                             f"{[tuple(f.shape) for f in factors]} for d={d}")
        first = factors[0]
        layer = cls([f.shape[0] for f in factors[:d]], [f.shape[0] for f in factors[d:]], first.shape[1],
                    bias is not None, layout, "meta", first.dtype).to_empty(device=first.device)
        with torch.no_grad():
            for param, factor in zip(layer.factors, factors):
                param.copy_(factor)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def weight_matmul(self, x):
        lead = x.shape[:-1]
        y = cp_matmul(x.reshape(-1, self.in_features), list(self.factors), len(self.out_shape))
        return y.reshape(*lead, self.out_features)

    def dense_weight(self):
        return cp_to_matrix(list(self.factors), len(self.out_shape))

    def spec(self):
        return {"out_shape": list(self.out_shape), "in_shape": list(self.in_shape), "rank": self.rank}

    def flops_per_token(self):
        return cp_matmul_flops(self.out_shape, self.in_shape, self.rank)
