"""The closed-form refits of linalg/refit.py, checked against their defining least-squares problems on samples
(float64; sample sizes well above the input size keep every system well conditioned)."""

from __future__ import annotations

import pytest
import torch

from kroncompress.linalg.kronecker import kron_sum
from kroncompress.linalg.refit import (CrossMoments, cross_output_error, cross_whitened_spectrum, cross_whitened_svd,
                                       kronecker_refit, refit_left)
from kroncompress.linalg.whitening import whitened_svd

EPS = torch.finfo(torch.float64).eps


def _problem(m=12, n=8, tokens=400, drift=0.3, seed=0):
    """W, teacher inputs Xt (tokens x n, correlated) and student inputs Xs = Xt + drift * noise."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    Xt = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    Xs = Xt + drift * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return W, Xt, Xs, CrossMoments(Xs.T @ Xs, Xt.T @ Xs, Xt.T @ Xt)


def _direct_error(W, W_hat, Xt, Xs):
    return ((Xt @ W.T - Xs @ W_hat.T) ** 2).sum().sqrt().item()


def test_cross_output_error_is_the_sample_error():
    W, Xt, Xs, moments = _problem()
    W_hat = torch.randn_like(W)
    direct = _direct_error(W, W_hat, Xt, Xs)
    assert cross_output_error(W, W_hat, moments, relative=False) == pytest.approx(direct, rel=1e3 * EPS ** 0.5)
    reference = (Xt @ W.T).norm().item()
    assert cross_output_error(W, W_hat, moments) == pytest.approx(direct / reference, rel=1e3 * EPS ** 0.5)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_refit_left_is_the_least_squares_solution(rank):
    W, Xt, Xs, moments = _problem(seed=rank)
    R = torch.randn(rank, W.shape[1], dtype=torch.float64)
    U = refit_left(W, R, moments)
    # min_U ||Xt W^T - (Xs R^T) U^T||: the ordinary least-squares problem on the samples
    expected = torch.linalg.lstsq(Xs @ R.T, Xt @ W.T).solution.T
    assert torch.allclose(U, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_cross_whitened_svd_is_the_best_rank_k(rank):
    W, Xt, Xs, moments = _problem(seed=10 + rank)
    U, V = cross_whitened_svd(W, moments, rank)
    best = cross_output_error(W, U @ V, moments, relative=False)
    _, S, _, _, constant = cross_whitened_spectrum(W, moments)
    assert best ** 2 == pytest.approx(float((S[rank:] ** 2).sum()) + constant, rel=1e-8, abs=1e-8 * float((S ** 2).sum()))
    # no rank-k matrix does better: perturbations of the optimum, random ones, and the teacher-only whitened SVD
    g = torch.Generator().manual_seed(rank)
    for _ in range(20):
        dU, dV = (1e-3 * torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (U, V))
        assert cross_output_error(W, (U + dU) @ (V + dV), moments, relative=False) >= best * (1 - 1e-10)
    Ut, Vt = whitened_svd(W, moments.tt, rank)
    assert cross_output_error(W, Ut @ Vt, moments, relative=False) >= best * (1 - 1e-10)
    # and its left factor is already the refit of its right one
    assert torch.allclose(refit_left(W, V, moments) @ V, U @ V, rtol=1e-7, atol=1e-7 * (U @ V).abs().max().item())


def test_parallel_moments_reduce_to_the_whitened_svd():
    W, Xt, _, _ = _problem(seed=3)
    C = Xt.T @ Xt
    U1, V1 = whitened_svd(W, C, 3)
    U2, V2 = cross_whitened_svd(W, CrossMoments.parallel(C), 3)
    scale = (U1 @ V1).abs().max().item()
    assert torch.allclose(U1 @ V1, U2 @ V2, rtol=1e-8, atol=1e-8 * scale)


@pytest.mark.parametrize("terms,sweeps", [(1, 0), (2, 0), (2, 3)])
def test_kronecker_refit_solves_each_block_exactly(terms, sweeps):
    a_shape, b_shape = (3, 2), (4, 4)
    W, Xt, Xs, moments = _problem(m=12, n=8, tokens=500, seed=20 + terms)
    g = torch.Generator().manual_seed(terms)
    A0 = torch.randn(terms, *a_shape, generator=g, dtype=torch.float64)
    B0 = torch.randn(terms, *b_shape, generator=g, dtype=torch.float64)
    A, B, history = kronecker_refit(W, A0, B0, moments, sweeps=sweeps)
    assert len(history) == 2 + 2 * sweeps
    assert history[0] == pytest.approx(cross_output_error(W, kron_sum(A0, B0), moments), rel=1e-8)
    assert history[-1] == pytest.approx(cross_output_error(W, kron_sum(A, B), moments), rel=1e-6)
    assert all(later <= earlier * (1 + 1e-10) for earlier, later in zip(history, history[1:]))
    # the last step was an exact A-step: the gradient of E in A vanishes (relative to the gradient at the start)
    def energy(a):
        return ((Xt @ W.T - Xs @ kron_sum(a, B).T) ** 2).sum()
    a = A.clone().requires_grad_()
    grad = torch.autograd.grad(energy(a), a)[0]
    a0 = A0.clone().requires_grad_()
    grad0 = torch.autograd.grad(energy(a0), a0)[0]
    assert grad.norm() <= 1e-6 * grad0.norm()


def test_bad_shapes_name_the_function():
    W, _, _, moments = _problem()
    with pytest.raises(ValueError, match="refit_left: the right factor"):
        refit_left(W, torch.randn(2, 5, dtype=torch.float64), moments)
    with pytest.raises(ValueError, match="pass the statistics of this layer"):
        cross_output_error(torch.randn(3, 5), torch.randn(3, 5), moments)
    with pytest.raises(ValueError, match="out of range"):
        cross_whitened_svd(W, moments, 0)
