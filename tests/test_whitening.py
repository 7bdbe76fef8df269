"""Whitening: damped second moments, Cholesky, whitened SVD (SVD-LLM) and the svd strategy's `init`."""

from __future__ import annotations

import pytest
import torch

from kroncompress.linalg.svd import truncated_svd
from kroncompress.linalg.whitening import cholesky_factor, damp, output_error, second_moment, whitened_svd
from kroncompress.strategies import get_strategy


def correlated_inputs(tokens: int, n: int, seed: int, decay: float = 0.85) -> torch.Tensor:
    """Inputs with a strongly non-isotropic covariance (a few dominant, rotated directions)."""
    g = torch.Generator().manual_seed(seed)
    scales = decay ** torch.arange(n, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (torch.randn(tokens, n, generator=g, dtype=torch.float64) * scales) @ basis.T


def test_second_moment_is_x_transpose_x_in_float64():
    x = torch.randn(3, 5, 4)
    C = second_moment(x)
    rows = x.reshape(-1, 4).double()
    assert C.dtype == torch.float64
    torch.testing.assert_close(C, rows.T @ rows)


@pytest.mark.parametrize("damping", [0.0, 0.01, 0.5])
def test_damp_adds_a_share_of_the_mean_diagonal(damping):
    C = second_moment(torch.randn(50, 6))
    shift = damping * C.diagonal().mean()
    torch.testing.assert_close(damp(C, damping), C + shift * torch.eye(6, dtype=torch.float64))


def test_damp_makes_a_rank_deficient_moment_factorisable():
    C = second_moment(torch.randn(2, 8))  # rank 2 of 8
    L = cholesky_factor(damp(C, 0.01))
    torch.testing.assert_close(L @ L.T, damp(C, 0.01))


@pytest.mark.parametrize("bad, message", [(torch.zeros(3, 4), "square"), (-1.0, "damping")])
def test_damp_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        damp(bad, 0.01) if isinstance(bad, torch.Tensor) else damp(torch.eye(3), bad)


@pytest.mark.parametrize("m, n, rank, seed", [(12, 16, 3, 0), (20, 10, 5, 1), (16, 16, 1, 2), (8, 24, 5, 3)])
def test_whitened_svd_beats_plain_svd_in_output_error_on_correlated_inputs(m, n, rank, seed):
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    C = second_moment(correlated_inputs(400, n, seed))
    U, V = truncated_svd(W, rank)
    Uw, Vw = whitened_svd(W, C, rank)
    plain, whitened = output_error(W, U @ V, C), output_error(W, Uw @ Vw, C)
    assert whitened < 0.95 * plain
    # ... while plain SVD stays the better weight approximation (Eckart-Young)
    assert (W - U @ V).norm() <= (W - Uw @ Vw).norm() + 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitened_svd_is_optimal_among_rank_k_perturbations(seed):
    """No random rank-k candidate near the solution has a lower output error."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(10, 12, generator=g, dtype=torch.float64)
    C = damp(second_moment(correlated_inputs(300, 12, seed)), 0.01)
    U, V = whitened_svd(W, C, 4)
    best = output_error(W, U @ V, C)
    for _ in range(20):
        dU = 1e-3 * torch.randn(U.shape, generator=g, dtype=torch.float64)
        dV = 1e-3 * torch.randn(V.shape, generator=g, dtype=torch.float64)
        assert output_error(W, (U + dU) @ (V + dV), C) >= best - 1e-12


def test_whitened_svd_with_identity_moment_is_plain_svd():
    W = torch.randn(9, 7, dtype=torch.float64)
    U, V = truncated_svd(W, 3)
    Uw, Vw = whitened_svd(W, torch.eye(7, dtype=torch.float64), 3)
    torch.testing.assert_close(Uw @ Vw, U @ V)


@pytest.mark.parametrize("C_shape, rank, message", [((5, 5), 2, "C must be 7 x 7"), ((7, 7), 0, "rank=0"), ((7, 7), 8, "rank=8")])
def test_whitened_svd_rejects_bad_input(C_shape, rank, message):
    with pytest.raises(ValueError, match=message):
        whitened_svd(torch.randn(9, 7), torch.eye(*C_shape), rank)


def test_whitened_svd_keeps_float32_dtype():
    W = torch.randn(6, 8)
    U, V = whitened_svd(W, second_moment(torch.randn(40, 8)), 2, damping=0.01)
    assert U.dtype == V.dtype == torch.float32 and U.shape == (6, 2) and V.shape == (2, 8)


# -- the svd strategy's init ---------------------------------------------------------------------

@pytest.mark.parametrize("init, with_stats, expected", [
    ("auto", True, "whitened"), ("auto", False, "svd"), ("whitened", True, "whitened"),
    ("whitened", False, "svd"), ("svd", True, "svd"),
])
def test_svd_strategy_init_selection(init, with_stats, expected):
    W = torch.randn(12, 16, dtype=torch.float64)
    C = damp(second_moment(correlated_inputs(200, 16, 0)), 0.01)
    strategy = get_strategy("svd")(rank=3, init=init)
    stats = C if with_stats else None
    plan = strategy.plan((12, 16), weight=W)
    factors = strategy.decompose(W, plan, stats=stats)
    assert strategy.init_for("linear", stats) == expected
    reference = whitened_svd(W, C, 3) if expected == "whitened" else truncated_svd(W, 3)
    torch.testing.assert_close(factors["u"] @ factors["v"], reference[0] @ reference[1])


def test_svd_strategy_rejects_an_unknown_init():
    with pytest.raises(ValueError, match="'init'.*must be one of auto, svd, whitened"):
        get_strategy("svd")(rank=3, init="als")
