"""Per-module error curves and the global allocation (kroncompress/budget.py)."""

from __future__ import annotations

import pytest
import torch

from kroncompress.budget import allocate_budget, kronecker_curve, module_candidates, svd_curve
from kroncompress.linalg.als import kronecker_als
from kroncompress.linalg.kronecker import kron_sum
from kroncompress.linalg.whitening import damp, output_error, whitened_svd

F64 = torch.float64


def _layer(m, n, decay, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    k = min(m, n)
    W = (U[:, :k] * torch.logspace(0, -decay, k, dtype=F64)) @ V[:, :k].T
    X = torch.randn(600, n, generator=g, dtype=F64) @ torch.randn(n, n, generator=g, dtype=F64)
    return W, damp(X.T @ X)


def test_svd_curve_is_the_whitened_svd_error_at_every_rank():
    W, C = _layer(24, 32, 2.0, 0)
    ranks, errors = svd_curve(W, C)
    assert ranks == list(range(1, 14))  # k (24 + 32) < 24 * 32 up to k = 13
    for k, e in zip(ranks, errors):
        U, V = whitened_svd(W, C, k)
        assert e == pytest.approx(output_error(W, U @ V, C, relative=False) ** 2, rel=1e-8)


def test_kronecker_curve_is_the_measured_als_error():
    W, C = _layer(16, 16, 1.0, 1)
    points = kronecker_curve(W, C, ratios=(2.0, 4.0), rank=1)
    assert [p[1] <= 16 * 16 / r * 1.01 for p, r in zip(points, (2.0, 4.0))] == [True, True]
    for options, params, error in points:
        fit = kronecker_als(W, C, options["a_shape"], options["b_shape"], options["rank"], max_sweeps=2)
        assert error == pytest.approx(output_error(W, kron_sum(fit.a, fit.b), C,
                                                   relative=False) ** 2, rel=1e-6)


def test_global_budget_beats_one_uniform_ratio_at_equal_parameters():
    layers = {f"m{i}": _layer(32, 32, decay, i) for i, decay in enumerate((0.5, 1.0, 3.0, 6.0))}
    weights = {n: W for n, (W, _) in layers.items()}
    moments = {n: C for n, (_, C) in layers.items()}
    uniform_rank = 8  # half of 32 x 32 at rank 8 is 8 * 64 = 512 parameters
    uniform_error = sum(svd_curve(weights[n], moments[n])[1][uniform_rank - 1] for n in layers)
    result = allocate_budget(weights, moments, 4 * uniform_rank * 64, structures=("svd",))
    assert result.params <= 4 * 512
    assert result.error <= uniform_error
    # the fast-decaying spectra give their parameters to the slow ones
    assert result.choice["m3"].params < result.choice["m0"].params


def test_sensitivity_scales_the_curve_and_unknown_strategies_are_refused():
    W, C = _layer(8, 8, 1.0, 2)
    base = module_candidates(W, C, 1.0, ("svd",))
    scaled = module_candidates(W, C, 10.0, ("svd",))
    assert [c.error * 10 for c in base] == pytest.approx([c.error for c in scaled])
    assert base[0].label.strategy == "dense" and base[0].params == 64
    with pytest.raises(ValueError, match="cannot be allocated"):
        module_candidates(W, C, 1.0, ("tucker",))
    with pytest.raises(ValueError, match="no calibration statistics for b"):
        allocate_budget({"a": W, "b": W}, {"a": C}, 100)
