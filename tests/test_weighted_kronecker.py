"""Frequency-weighted (and tied-head) Kronecker embeddings, checked against what the theorems say."""

from __future__ import annotations

import pytest
import torch

from kroncompress.linalg.kronecker import kron_sum, nearest_kronecker
from kroncompress.linalg.weighted_kronecker import (
    TokenStatistics, _a_step, _b_step, embedding_weights, kronecker_weighted_nkp, weighted_kronecker_als,
    weighted_objective,
)
from kroncompress.linalg.whitening import damp, second_moment

F64 = torch.float64
EPS = torch.finfo(F64).eps
# (a_shape, b_shape, rank): the KnGPT2 (1 x 2) layout, balanced factors, several terms
SHAPES = [((12, 3), (1, 2), 1), ((4, 3), (3, 2), 1), ((4, 3), (3, 2), 2), ((3, 2), (4, 3), 3), ((6, 1), (2, 6), 2)]


def table(a_shape, b_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1], generator=g, dtype=F64)


def zipf_counts(V, seed=0, zeros=0):
    g = torch.Generator().manual_seed(seed)
    counts = (1000.0 / torch.arange(1, V + 1, dtype=F64))[torch.randperm(V, generator=g)].round()
    counts[torch.randperm(V, generator=g)[:zeros]] = 0
    return counts


def head_moment(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(10 * d, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64)
    return damp(second_moment(X), 0.01)


def brute_force(E, w, Ch, fixed, free_shape, solve_for):
    """The exact block least-squares update from the explicit linear map (tiny sizes only)."""
    M_sqrt = []  # per-row metric w_t I + Ch as one block-diagonal square root
    d = E.shape[1]
    for t in range(E.shape[0]):
        M = w[t] * torch.eye(d, dtype=F64) + (Ch if Ch is not None else 0)
        M_sqrt.append(torch.linalg.cholesky(M))
    L = torch.block_diag(*M_sqrt)
    columns = []
    for index in range(torch.Size(free_shape).numel()):
        unit = torch.zeros(free_shape, dtype=F64).reshape(-1)
        unit[index] = 1
        unit = unit.reshape(free_shape)
        E_hat = kron_sum(unit, fixed) if solve_for == "a" else kron_sum(fixed, unit)
        columns.append(E_hat.reshape(-1) @ L)
    design = torch.stack(columns, 1)
    return torch.linalg.lstsq(design, (E.reshape(-1) @ L)[:, None]).solution.reshape(free_shape)


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES[1:4])
def test_each_half_step_is_the_exact_weighted_least_squares_solution(a_shape, b_shape, rank, with_head):
    E = table(a_shape, b_shape)
    (v1, d1), (v2, d2) = a_shape, b_shape
    w, Ch = embedding_weights(E, zipf_counts(v1 * v2), head_moment(d1 * d2) if with_head else None)
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(rank, *a_shape, generator=g, dtype=F64), torch.randn(rank, *b_shape, generator=g, dtype=F64)
    F4 = (w[:, None] * E + (E @ Ch if with_head else 0)).reshape(v1, v2, d1, d2)
    C4 = Ch.reshape(d1, d2, d1, d2) if with_head else None
    torch.testing.assert_close(_a_step(B, F4, w.reshape(v1, v2), C4), brute_force(E, w, Ch, B, A.shape, "a"))
    torch.testing.assert_close(_b_step(A, F4, w.reshape(v1, v2), C4), brute_force(E, w, Ch, A, B.shape, "b"))


@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES)
def test_uniform_frequencies_give_the_plain_nkp(a_shape, b_shape, rank):
    E = table(a_shape, b_shape)
    counts = torch.full((E.shape[0],), 7.0, dtype=F64)
    result = weighted_kronecker_als(E, TokenStatistics(counts), a_shape, b_shape, rank, max_sweeps=3)
    A, B = nearest_kronecker(E, a_shape, b_shape, rank=rank)
    # uniform weights make F the scaled Frobenius error: NKP is its global optimum and ALS cannot move off
    # it by more than the conditioning of the singular gap allows
    tol = 1e3 * EPS ** 0.5
    assert (kron_sum(result.a, result.b) - kron_sum(A, B)).norm() <= tol * E.norm()


@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES)
def test_kronecker_structured_frequencies_have_a_closed_form(a_shape, b_shape, rank):
    E = table(a_shape, b_shape, seed=1)
    (v1, _), (v2, _) = a_shape, b_shape
    f1, f2 = zipf_counts(v1, 1) + 1, zipf_counts(v2, 2) + 1
    counts = (f1[:, None] * f2[None, :]).reshape(-1)
    w, _ = embedding_weights(E, counts, floor=0.0)
    A, B = kronecker_weighted_nkp(E, w, a_shape, b_shape, rank)
    closed = weighted_objective(E, kron_sum(A, B), w)
    # no other start or ALS path does better than the closed form (it is the global optimum)
    for start in ("nkp", (A + 0.1 * torch.randn_like(A), B)):
        result = weighted_kronecker_als(E, TokenStatistics(counts), a_shape, b_shape, rank, start=start,
                                        max_sweeps=50, tol=0, floor=0.0)
        assert result.history[-1] ** 2 >= closed - 1e3 * EPS
    # and rank-r Kronecker tables are reproduced exactly, whatever the weights
    exact = kron_sum(A, B)
    A2, B2 = kronecker_weighted_nkp(exact, w, a_shape, b_shape, rank)
    torch.testing.assert_close(kron_sum(A2, B2), exact, atol=1e4 * EPS * exact.norm().item(), rtol=0)


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES)
def test_sweeps_never_increase_the_objective_and_beat_the_weight_only_nkp(a_shape, b_shape, rank, with_head):
    E = table(a_shape, b_shape, seed=2)
    counts = zipf_counts(E.shape[0], 4)
    head = head_moment(E.shape[1], 5) if with_head else None
    stats = TokenStatistics(counts, head)
    result = weighted_kronecker_als(E, stats, a_shape, b_shape, rank, start="nkp", max_sweeps=8, tol=0)
    assert all(b <= a * (1 + 1e3 * EPS) for a, b in zip(result.history, result.history[1:])), result.history
    w, Ch = embedding_weights(E, counts, head)
    A, B = nearest_kronecker(E, a_shape, b_shape, rank=rank)
    assert result.history[-1] ** 2 <= weighted_objective(E, kron_sum(A, B), w, Ch) * (1 + 1e3 * EPS)
    best = weighted_kronecker_als(E, stats, a_shape, b_shape, rank, max_sweeps=8)
    assert best.history[0] <= result.history[0] * (1 + 1e3 * EPS)  # "best" starts no worse than nkp


@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES)
def test_head_term_alone_gives_the_activation_aware_als_steps(a_shape, b_shape, rank):
    """With zero frequency weight the objective is tr(D C D^T) (scaled): each step is kronecker_als's."""
    from kroncompress.linalg import als

    E = table(a_shape, b_shape, seed=3)
    (v1, d1), (v2, d2) = a_shape, b_shape
    C = head_moment(E.shape[1], 6)
    g = torch.Generator().manual_seed(9)
    A, B = torch.randn(rank, *a_shape, generator=g, dtype=F64), torch.randn(rank, *b_shape, generator=g, dtype=F64)
    F4, C4, zero = (E @ C).reshape(v1, v2, d1, d2), C.reshape(d1, d2, d1, d2), torch.zeros(v1, v2, dtype=F64)
    torch.testing.assert_close(_a_step(B, F4, zero, C4), als._a_step(B, F4, C4))
    torch.testing.assert_close(_b_step(A, F4, zero, C4), als._b_step(A, F4, C4))


@pytest.mark.parametrize("with_head", [False, True])
def test_unseen_tokens_stay_finite_and_near_the_weight_only_fit(with_head):
    a_shape, b_shape = (16, 3), (1, 2)
    E = table(a_shape, b_shape, seed=4)
    counts = zipf_counts(E.shape[0], 7, zeros=10)
    stats = TokenStatistics(counts, head_moment(E.shape[1], 8) if with_head else None)
    result = weighted_kronecker_als(E, stats, a_shape, b_shape, max_sweeps=6)
    assert torch.isfinite(result.a).all() and torch.isfinite(result.b).all()
    E_hat = kron_sum(result.a, result.b)
    unseen = counts == 0
    # a row never seen is still the best fit of its own row given B (or close to it): never worse than 0
    assert (E_hat[unseen] - E[unseen]).norm() < E[unseen].norm()


def test_rejects_bad_inputs():
    E = table((4, 3), (3, 2))
    with pytest.raises(ValueError, match="one entry per row"):
        weighted_kronecker_als(E, TokenStatistics(torch.ones(5)), (4, 3), (3, 2))
    with pytest.raises(ValueError, match="does not tile"):
        weighted_kronecker_als(E, TokenStatistics(torch.ones(12)), (4, 3), (2, 2))
    with pytest.raises(ValueError, match="6 x 6"):
        weighted_kronecker_als(E, TokenStatistics(torch.ones(12), torch.eye(5)), (4, 3), (3, 2))
    with pytest.raises(ValueError, match=">= 0"):
        weighted_kronecker_als(E, TokenStatistics(-torch.ones(12)), (4, 3), (3, 2))


# Several terms with a head term and unseen tokens (issue: rank auto on a tiny Gemma embedding failed with
# "Pivots given to lu_solve"): shapes whose row systems are (r k x r k) with r up to min(m1 n1, m2 n2).
SEVERAL_TERMS = [((4, 3), (3, 2)), ((2, 16), (16, 1)), ((16, 1), (2, 16)), ((2, 4), (16, 4))]


@pytest.mark.parametrize("threads_changed", [False, True])
@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("a_shape, b_shape", SEVERAL_TERMS)
@pytest.mark.parametrize("rank", [1, 2, 3, "max"])
def test_several_terms_with_unseen_tokens_never_do_worse_than_the_weight_only_nkp(
        a_shape, b_shape, rank, with_head, threads_changed):
    rank = min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1]) if rank == "max" else rank
    E = table(a_shape, b_shape, seed=6).float()  # float32 like a model's table
    counts = zipf_counts(E.shape[0], 7, zeros=E.shape[0] // 3)
    stats = TokenStatistics(counts, head_moment(E.shape[1], 8) if with_head else None)
    threads = torch.get_num_threads()
    if threads_changed:  # what lapack_threads does around every eigh: batched LU solves broke after it
        torch.set_num_threads(1)
        torch.set_num_threads(max(threads, 2))
    try:
        result = weighted_kronecker_als(E, stats, a_shape, b_shape, rank, start="nkp", max_sweeps=4, tol=0)
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(result.a).all() and torch.isfinite(result.b).all()
    w, Ch = embedding_weights(E, counts, stats.head)
    A, B = nearest_kronecker(E.double(), a_shape, b_shape, rank=rank)
    start = weighted_objective(E, kron_sum(A, B), w, Ch)
    # the factors come back in float32: the objective may move by the rounding of a float32 table
    slack = 1e2 * torch.finfo(torch.float32).eps * E.shape[1]
    assert weighted_objective(E, kron_sum(result.a, result.b), w, Ch) <= start * (1 + slack) + slack


@pytest.mark.parametrize("with_head", [False, True])
def test_collinear_terms_get_the_minimum_norm_step_not_a_failure(with_head):
    """Two equal terms make every row system singular: the step is still an exact minimiser."""
    a_shape, b_shape = (4, 3), (3, 2)
    E = table(a_shape, b_shape, seed=7)
    counts = zipf_counts(E.shape[0], 9, zeros=4)
    stats = TokenStatistics(counts, head_moment(E.shape[1], 10) if with_head else None)
    A, B = nearest_kronecker(E, a_shape, b_shape, rank=1)
    start = (torch.stack([A, A]) / 2, torch.stack([B, B]))
    result = weighted_kronecker_als(E, stats, a_shape, b_shape, 2, start=start, max_sweeps=6, tol=0)
    assert torch.isfinite(result.a).all() and torch.isfinite(result.b).all()
    assert all(b <= a * (1 + 1e3 * EPS) for a, b in zip(result.history, result.history[1:])), result.history
    w, Ch = embedding_weights(E, counts, stats.head)
    (v1, d1), (v2, d2) = a_shape, b_shape
    F4 = (w[:, None] * E + (E @ Ch if with_head else 0)).reshape(v1, v2, d1, d2)
    C4 = Ch.reshape(d1, d2, d1, d2) if with_head else None
    step = _a_step(start[1], F4, w.reshape(v1, v2), C4)
    # B_1 = B_2: the minimiser is not unique, but the minimum is the one-term step's (a regular system)
    single = _a_step(start[1][:1], F4, w.reshape(v1, v2), C4)
    reached = [weighted_objective(E, kron_sum(step, start[1]), w, Ch), weighted_objective(E, kron_sum(single, start[1][:1]), w, Ch)]
    assert reached[0] == pytest.approx(reached[1], rel=1e3 * EPS ** 0.5)


@pytest.mark.parametrize("a_shape, b_shape", [((16, 3), (1, 2)), ((4, 3), (3, 2))])
def test_one_term_with_unseen_tokens_keeps_the_closed_form(a_shape, b_shape):
    """r = 1 and Kronecker-structured counts with zeros (floor 0): ALS from the closed form stays on it."""
    E = table(a_shape, b_shape, seed=8)
    (v1, _), (v2, _) = a_shape, b_shape
    f1, f2 = zipf_counts(v1, 11, zeros=v1 // 4), zipf_counts(v2, 12) + 1
    counts = (f1[:, None] * f2[None, :]).reshape(-1)
    w, _ = embedding_weights(E, counts, floor=0.0)
    A, B = kronecker_weighted_nkp(E, w, a_shape, b_shape, 1)
    closed = weighted_objective(E, kron_sum(A, B), w)
    result = weighted_kronecker_als(E, TokenStatistics(counts), a_shape, b_shape, 1, start="kron", max_sweeps=6,
                                    tol=0, floor=0.0)
    assert torch.isfinite(result.a).all() and torch.isfinite(result.b).all()
    assert result.history[-1] ** 2 == pytest.approx(closed, rel=1e3 * EPS ** 0.5, abs=1e3 * EPS)
