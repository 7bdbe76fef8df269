"""The refit stage: after a module is truncated, its free factor is re-solved by least squares against the
original layer's outputs on the calibration inputs (kroncompress.linalg.refit), keeping the other factor:

- LowRankLinear W^ = U V: U given V (SVD-LLM's update);
- KroneckerLinear W^ = sum A_r (x) B_r: the A factors given the B factors.

Each solve is the exact minimiser of the output error over its factor, so the error never grows; the
report gives it before and after. With statistics of the original layer's own inputs this mends weight-only
inits (nkp, plain svd) and polishes data-aware ones; other layers have no closed-form refit and are left as
they are.
"""

from __future__ import annotations

import torch
from torch import nn

from kroncompress.layers.kronecker import KroneckerLinear
from kroncompress.layers.lowrank import LowRankLinear
from kroncompress.linalg.kronecker import kron_sum
from kroncompress.linalg.refit import CrossMoments, cross_output_error, kronecker_refit, refit_left


def can_refit(layer: nn.Module) -> bool:
    return isinstance(layer, (LowRankLinear, KroneckerLinear))


@torch.no_grad()
def refit_layer(layer: nn.Module, weight: torch.Tensor, moments: CrossMoments | torch.Tensor) -> tuple[float, float] | None:
    """Refit `layer` (a LowRankLinear or KroneckerLinear replacing `weight`, out x in) in place on `moments`
    (CrossMoments, or a damped second moment C of the layer's inputs); returns its relative output error
    (before, after), or None for a layer without a closed-form refit."""
    if not can_refit(layer):
        return None
    if not isinstance(moments, CrossMoments):
        moments = CrossMoments.parallel(moments)
    W = weight.detach().to(torch.float64)
    moments = moments.to(W.device)
    before = cross_output_error(W, layer.dense_weight().detach().to(torch.float64), moments)
    if isinstance(layer, LowRankLinear):
        U = refit_left(W, layer.v.detach().to(torch.float64), moments)
        candidate = U @ layer.v.detach().to(torch.float64)
        new = {"u": U}
    else:
        A, B, _ = kronecker_refit(W, layer.a.detach().to(torch.float64), layer.b.detach().to(torch.float64), moments)
        candidate = kron_sum(A, B)
        new = {"a": A}
    after = cross_output_error(W, candidate, moments)
    if not after < before:  # already optimal up to rounding: keep the factors bit for bit
        return before, before
    for name, value in new.items():
        getattr(layer, name).copy_(value.to(getattr(layer, name).dtype))
    return before, after
