"""Tensor-train (TT-matrix) linear layer: W[(o),(i)] = G_1[o_1, i_1] G_2[o_2, i_2] ... G_d[o_d, i_d]."""

from __future__ import annotations

import math

import torch
from torch import nn

from kroncompress.errors import DataError
from kroncompress.layers.base import FactorizedLinear
from kroncompress.linalg.tensorized import tt_matmul, tt_matmul_flops, tt_sweep_right_to_left, tt_to_matrix


class TTLinear(FactorizedLinear):
    """Drop-in for nn.Linear / Conv1D with W (out x in) as a TT-matrix.

    Parameters `cores.k` (r_{k-1}, o_k, i_k, r_k) with r_0 = r_d = 1; `ranks` are the d - 1 inner ranks.
    Forward sweeps the cores right to left or left to right, whichever costs fewer FLOPs for the shapes.
    """

    FACTOR_AXES = {"cores": 2}  # quantization axis (kc.quantize): each core's input mode i_k

    def __init__(self, out_shape, in_shape, ranks, bias: bool = True, layout: str = "linear", device=None, dtype=None):
        out_shape, in_shape, ranks = tuple(out_shape), tuple(in_shape), tuple(ranks)
        if len(out_shape) != len(in_shape) or len(ranks) != len(out_shape) - 1:
            raise DataError(f"TTLinear: out_shape {out_shape} and in_shape {in_shape} need the same length d and "
                             f"ranks d - 1 inner ranks, got ranks {ranks}")
        super().__init__(math.prod(in_shape), math.prod(out_shape), bias, layout, device, dtype)
        self.out_shape, self.in_shape, self.ranks = out_shape, in_shape, ranks
        full = (1, *ranks, 1)
        self.cores = nn.ParameterList([
            nn.Parameter(torch.empty(full[k], o, i, full[k + 1], device=device, dtype=dtype))
            for k, (o, i) in enumerate(zip(out_shape, in_shape))
        ])
        self._right_to_left = tt_sweep_right_to_left(out_shape, in_shape, ranks)
        if self.cores[0].device.type != "meta":
            for k, core in enumerate(self.cores):
                nn.init.normal_(core, std=(in_shape[k] * full[k]) ** -0.5)

    @classmethod
    def from_factors(cls, cores, bias=None, layout: str = "linear") -> "TTLinear":
        """From cores [G_k (r_{k-1}, o_k, i_k, r_k)] with r_0 = r_d = 1."""
        cores = list(cores)
        ok = (len(cores) >= 1 and all(c.dim() == 4 for c in cores) and cores[0].shape[0] == 1 and cores[-1].shape[3] == 1
              and all(a.shape[3] == b.shape[0] for a, b in zip(cores, cores[1:])))
        if not ok:
            raise DataError(f"TTLinear cores must be (r_{{k-1}}, o_k, i_k, r_k) with matching ranks and r_0 = r_d = 1; "
                             f"got {[tuple(c.shape) for c in cores]}")
        first = cores[0]
        layer = cls([c.shape[1] for c in cores], [c.shape[2] for c in cores], [c.shape[3] for c in cores[:-1]],
                    bias is not None, layout, "meta", first.dtype).to_empty(device=first.device)
        with torch.no_grad():
            for param, core in zip(layer.cores, cores):
                param.copy_(core)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def weight_matmul(self, x):
        lead = x.shape[:-1]
        y = tt_matmul(x.reshape(-1, self.in_features), list(self.cores), self._right_to_left)
        return y.reshape(*lead, self.out_features)

    def dense_weight(self):
        return tt_to_matrix(list(self.cores))

    def spec(self):
        return {"out_shape": list(self.out_shape), "in_shape": list(self.in_shape), "ranks": list(self.ranks)}

    def flops_per_token(self):
        return tt_matmul_flops(self.out_shape, self.in_shape, self.ranks)
