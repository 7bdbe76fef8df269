"""Activation-aware Kronecker: whitening start, ALS sweeps, the kronecker strategy's init, shape ranking."""

from __future__ import annotations

import pytest
import torch

from kroncompress.linalg.als import (
    KroneckerProblem, MomentCache, _a_step, _b_step, kronecker_als, kronecker_whitening, whitened_nkp,
)
from kroncompress.linalg.kronecker import kron_sum, nearest_kronecker
from kroncompress.linalg.shapes import kronecker_shapes
from kroncompress.linalg.weighted_kronecker import TokenStatistics
from kroncompress.linalg.whitening import damp, output_error, second_moment
from kroncompress.strategies import get_strategy

F64 = torch.float64


def spd(k: int, g: torch.Generator) -> torch.Tensor:
    Z = torch.randn(k, k, generator=g, dtype=F64)
    return Z @ Z.T + 0.1 * torch.eye(k, dtype=F64)


def correlated_moment(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(20 * n, n, generator=g, dtype=F64) @ torch.randn(n, n, generator=g, dtype=F64)
    return damp(second_moment(X), 0.01)


def brute_force_step(W, C, A, B, solve_for: str) -> torch.Tensor:
    """The exact least-squares block update, from the explicit linear map (tiny sizes only)."""
    L = torch.linalg.cholesky(C)
    fixed, free = (B, A) if solve_for == "a" else (A, B)
    columns = []
    for index in range(free.numel()):
        unit = torch.zeros(free.numel(), dtype=F64)
        unit[index] = 1
        unit = unit.reshape(free.shape)
        W_hat = kron_sum(unit, fixed) if solve_for == "a" else kron_sum(fixed, unit)
        columns.append((W_hat @ L).reshape(-1))
    design = torch.stack(columns, 1)
    return torch.linalg.lstsq(design, (W @ L).reshape(-1, 1)).solution.reshape(free.shape)


# (a_shape, b_shape, rank)
SHAPES = [((3, 4), (5, 2), 1), ((3, 4), (5, 2), 2), ((2, 6), (4, 3), 3), ((4, 2), (2, 4), 2), ((1, 4), (6, 3), 2)]


@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES)
def test_each_half_step_is_the_exact_least_squares_solution(a_shape, b_shape, rank):
    g = torch.Generator().manual_seed(0)
    (m1, n1), (m2, n2) = a_shape, b_shape
    W = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=F64)
    C = correlated_moment(n1 * n2, 1)
    A = torch.randn(rank, m1, n1, generator=g, dtype=F64)
    B = torch.randn(rank, m2, n2, generator=g, dtype=F64)
    V4, C4 = (W @ C).reshape(m1, m2, n1, n2), C.reshape(n1, n2, n1, n2)
    torch.testing.assert_close(_a_step(B, V4, C4), brute_force_step(W, C, A, B, "a"))
    torch.testing.assert_close(_b_step(A, V4, C4), brute_force_step(W, C, A, B, "b"))


@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES)
@pytest.mark.parametrize("start", ["nkp", "whitened"])
def test_als_reaches_the_closed_form_optimum_when_C_is_a_kronecker_product(a_shape, b_shape, rank, start):
    g = torch.Generator().manual_seed(rank)
    (m1, n1), (m2, n2) = a_shape, b_shape
    W = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=F64)
    C1, C2 = spd(n1, g), spd(n2, g)
    C = torch.kron(C1, C2)
    # the closed form: NKP of W (S1 (x) S2), mapped back
    S1, S2 = (torch.linalg.cholesky(M) for M in (C1, C2))  # any square roots with S S^T = C_k work
    At, Bt = nearest_kronecker(W @ torch.kron(S1, S2), a_shape, b_shape, rank=rank)
    At, Bt = (At, Bt) if rank > 1 else (At[None], Bt[None])
    optimum = output_error(W, kron_sum(At @ torch.linalg.inv(S1), Bt @ torch.linalg.inv(S2)), C)
    whitened_start = kron_sum(*whitened_nkp(W, C, a_shape, b_shape, rank)[:2])
    assert output_error(W, whitened_start, C) == pytest.approx(optimum, rel=1e-9, abs=1e-12)
    result = kronecker_als(W, C, a_shape, b_shape, rank, start=start, max_sweeps=400, tol=1e-13)
    assert result.history[-1] == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    if start == "nkp" and C1.shape[0] > 1 and C2.shape[0] > 1:
        assert result.history[0] > optimum * (1 + 1e-6)  # the weight-only start was not already optimal


@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES)
@pytest.mark.parametrize("start", ["nkp", "whitened"])
def test_the_output_error_never_increases_across_sweeps(a_shape, b_shape, rank, start):
    g = torch.Generator().manual_seed(7)
    (m1, n1), (m2, n2) = a_shape, b_shape
    W = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=F64)
    C = correlated_moment(n1 * n2, 3)
    result = kronecker_als(W, C, a_shape, b_shape, rank, start=start, max_sweeps=25, tol=0.0)
    assert len(result.history) == result.sweeps + 1
    for before, after in zip(result.history, result.history[1:]):
        assert after <= before * (1 + 1e-10)
    assert result.history[-1] < result.history[0] or result.history[0] < 1e-8


def test_als_stops_on_convergence_or_the_sweep_limit():
    W = torch.randn(12, 8, dtype=F64)
    C = correlated_moment(8, 0)
    limited = kronecker_als(W, C, (3, 4), (4, 2), 2, max_sweeps=2, tol=0.0)
    assert limited.sweeps == 2 and not limited.converged and len(limited.history) == 3
    loose = kronecker_als(W, C, (3, 4), (4, 2), 2, max_sweeps=200, tol=0.5)
    assert loose.converged and loose.sweeps < 200
    none = kronecker_als(W, C, (3, 4), (4, 2), 2, max_sweeps=0)
    assert none.sweeps == 0 and len(none.history) == 1


def test_als_beats_the_weight_only_nkp_in_output_error():
    W = torch.randn(16, 16, dtype=F64)
    C = correlated_moment(16, 5)
    A, B = nearest_kronecker(W, (4, 4), (4, 4), rank=2)
    result = kronecker_als(W, C, (4, 4), (4, 4), 2)
    assert result.history[-1] < 0.95 * output_error(W, kron_sum(A, B), C)
    assert result.a.shape == (2, 4, 4) and result.b.shape == (2, 4, 4)


def test_kronecker_whitening_is_exact_for_kronecker_moments_and_reports_misfit():
    g = torch.Generator().manual_seed(0)
    C1, C2 = spd(3, g), spd(4, g)
    exact = kronecker_whitening(torch.kron(C1, C2), 3, 4)
    torch.testing.assert_close(torch.kron(exact.l1 @ exact.l1.T, exact.l2 @ exact.l2.T), torch.kron(C1, C2))
    assert torch.equal(exact.l1, exact.l1.tril()) and torch.equal(exact.l2, exact.l2.tril())
    assert exact.misfit < 1e-10
    assert kronecker_whitening(correlated_moment(12, 1), 3, 4).misfit > 0.01


def symmetric_root(M: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((M + M.T) / 2)
    return (evecs * evals.sqrt()) @ evecs.T


@pytest.mark.parametrize("a_shape, b_shape, rank", [((3, 4), (4, 3), 1), ((6, 2), (2, 6), 2), ((2, 6), (6, 2), 3)])
def test_whitened_start_does_not_depend_on_the_square_root(a_shape, b_shape, rank):
    """The start minimises ||(W - W^) S||_F over Kronecker sums for S S^T = C1 (x) C2, which depends on S S^T only:
    the Cholesky factors give the W^ (and proxy) of the symmetric roots, up to rounding scaled by cond(C)."""
    g = torch.Generator().manual_seed(sum(a_shape) * rank)
    m, n = a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]
    W, C = torch.randn(m, n, generator=g, dtype=F64), correlated_moment(n, rank)
    A, B, proxy = whitened_nkp(W, C, a_shape, b_shape, rank)
    C1, C2 = nearest_kronecker(C, (a_shape[1],) * 2, (b_shape[1],) * 2)
    if C1.trace() < 0:
        C1, C2 = -C1, -C2
    S1, S2 = symmetric_root(C1), symmetric_root(C2)
    WS = W @ torch.kron(S1, S2)
    At, Bt, residual = nearest_kronecker(WS, a_shape, b_shape, rank=rank, return_residual=True)
    At, Bt = (At, Bt) if rank > 1 else (At[None], Bt[None])
    expected = kron_sum(At @ torch.linalg.inv(S1), Bt @ torch.linalg.inv(S2))
    tol = 1e3 * torch.finfo(F64).eps * float(torch.linalg.cond(C))
    torch.testing.assert_close(kron_sum(A, B), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert proxy == pytest.approx(residual / float(WS.norm()), rel=tol)


@pytest.mark.parametrize("kwargs, message", [
    ({"a_shape": (3, 3), "b_shape": (4, 2)}, "does not tile"),
    ({"start": "random"}, "start must be"),
    ({"max_sweeps": -1}, "max_sweeps"),
    ({"start": (torch.zeros(1, 3, 4), torch.zeros(1, 4, 2))}, "start factors must be"),
])
def test_als_rejects_bad_arguments(kwargs, message):
    args = {"a_shape": (3, 4), "b_shape": (4, 2), "rank": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        kronecker_als(torch.randn(12, 8, dtype=F64), torch.eye(8, dtype=F64), args.pop("a_shape"), args.pop("b_shape"), **args)


# -- the kronecker strategy's init and the shape search ------------------------------------------

@pytest.mark.parametrize("init, with_stats, expected", [
    ("auto", True, "als"), ("auto", False, "nkp"), ("als", True, "als"), ("als", False, "nkp"), ("nkp", True, "nkp"),
])
def test_kronecker_strategy_init_selection(init, with_stats, expected):
    W = torch.randn(12, 8, dtype=F64)
    C = correlated_moment(8, 2)
    strategy = get_strategy("kronecker")(a_shape=[3, 4], rank=2, init=init, sweeps=3)
    stats = C if with_stats else None
    factors = strategy.decompose(W, strategy.plan((12, 8), weight=W), stats=stats)
    assert strategy.init_for("linear", stats) == expected
    if expected == "als":
        reference = kronecker_als(W, C, (3, 4), (4, 2), 2, max_sweeps=3)
        torch.testing.assert_close(factors["a"], reference.a)
    else:
        A, B = nearest_kronecker(W, (3, 4), (4, 2), rank=2)
        torch.testing.assert_close(kron_sum(factors["a"], factors["b"]), kron_sum(A, B))


@pytest.mark.parametrize("init, stats, expected", [
    ("auto", torch.eye(4), "nkp"),  # a second moment does not describe a token-id input
    ("auto", TokenStatistics(torch.ones(4)), "als-freq"),
    ("als", TokenStatistics(torch.ones(4), torch.eye(2)), "als-freq+head"),
    ("nkp", TokenStatistics(torch.ones(4), torch.eye(2)), "nkp"),
    ("auto", None, "nkp"),
])
def test_kronecker_embedding_init_uses_token_statistics_only(init, stats, expected):
    strategy = get_strategy("kronecker")(b_shape=[1, 2], init=init)
    assert strategy.init_for("embedding", stats) == expected


@pytest.mark.parametrize("options, message", [
    ({"init": "whitened"}, "'init'.*one of auto, nkp, als"), ({"sweeps": -1}, "'sweeps'"), ({"shortlist": 0}, "'shortlist'"),
])
def test_kronecker_strategy_rejects_bad_init_options(options, message):
    with pytest.raises(ValueError, match=message):
        get_strategy("kronecker")(ratio=2, **options)


def test_shape_search_ranks_by_output_error_with_stats():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=g, dtype=F64)
    # inputs live on the first 4 of 16 features: only shapes that can spend parameters there do well
    X = torch.zeros(400, 16, dtype=F64)
    X[:, :4] = torch.randn(400, 4, generator=g, dtype=F64)
    C = damp(second_moment(X), 1e-4)
    by_energy = kronecker_shapes(16, 16, ratio=2, rank="auto", weight=W)
    by_output = kronecker_shapes(16, 16, ratio=2, rank="auto", weight=W, stats=C, shortlist=len(by_energy))
    # the same layouts, plus at most the measured best one-term layout (rank "auto" must never lose to it)
    extra = [s for s in by_output if (s.a_shape, s.rank) not in {(e.a_shape, e.rank) for e in by_energy}]
    assert {s.a_shape for s in by_output} - {s.a_shape for s in extra} == {s.a_shape for s in by_energy}
    assert len(extra) <= 1 and all(s.rank == 1 and s.fit is not None for s in extra)
    assert all(not s.degenerate for s in by_output)
    errors = [kronecker_als(W, C, s.a_shape, s.b_shape, s.rank, max_sweeps=2).history[-1] for s in by_output]
    assert errors == sorted(errors)
    assert [s.score for s in by_output] == pytest.approx([1 - e ** 2 for e in errors], rel=1e-9, abs=1e-12)


def test_shape_search_keeps_degenerate_shapes_out_unless_allowed():
    W, C = torch.randn(8, 8, dtype=F64), correlated_moment(8, 0)
    assert not any(s.degenerate for s in kronecker_shapes(8, 8, ratio=2, rank="auto", weight=W, stats=C))
    allowed = kronecker_shapes(8, 8, ratio=2, rank="auto", weight=W, stats=C, allow_degenerate=True)
    assert any(s.degenerate for s in allowed)


# -- reuse: resumed fits, shared input statistics, plan -> decompose ------------------------------

def test_a_resumed_fit_is_the_fresh_fit_with_as_many_sweeps():
    W, C = torch.randn(12, 8, dtype=F64), correlated_moment(8, 4)
    fresh = kronecker_als(W, C, (3, 4), (4, 2), 2, max_sweeps=6, tol=0.0)
    short = kronecker_als(W, C, (3, 4), (4, 2), 2, max_sweeps=2, tol=0.0)
    resumed = kronecker_als(W, C, (3, 4), (4, 2), 2, start=short, max_sweeps=6, tol=0.0)
    assert resumed.sweeps == 6 and resumed.history == pytest.approx(fresh.history, rel=1e-12)
    torch.testing.assert_close(kron_sum(resumed.a, resumed.b), kron_sum(fresh.a, fresh.b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES)
def test_the_history_is_the_output_error_of_the_factors(a_shape, b_shape, rank):
    # the history comes from the steps' normal equations, not from (W - W^) C; both must agree to rounding
    (m1, n1), (m2, n2) = a_shape, b_shape
    W = torch.randn(m1 * m2, n1 * n2, dtype=F64, generator=torch.Generator().manual_seed(2))
    C = correlated_moment(n1 * n2, 6)
    for sweeps in (1, 3):
        result = kronecker_als(W, C, a_shape, b_shape, rank, max_sweeps=sweeps, tol=0.0)
        exact = output_error(W, kron_sum(result.a, result.b), C)
        # f = total - 2 x.rhs + x.Gx cancels to about eps * total: error eps / (2 oerr) in oerr
        assert result.history[-1] == pytest.approx(exact, abs=1e3 * torch.finfo(F64).eps / max(exact, 1e-300))


def test_weights_reading_one_input_share_its_whitenings():
    C = correlated_moment(12, 3)
    moments = MomentCache(C)
    first = KroneckerProblem(torch.randn(6, 12, dtype=F64), moments)
    second = KroneckerProblem(torch.randn(9, 12, dtype=F64), moments)
    assert first.moments.whitening(3, 4) is second.moments.whitening(3, 4)
    assert moments.whitening(3, 4).misfit == pytest.approx(kronecker_whitening(C, 3, 4).misfit, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_decompose_after_a_calibrated_plan_gives_the_fresh_als_factors(dtype):
    W = torch.randn(16, 16, dtype=F64, generator=torch.Generator().manual_seed(3)).to(dtype)
    C = correlated_moment(16, 8)
    strategy = get_strategy("kronecker")(ratio=2, rank="auto", init="als", sweeps=5)
    plan = strategy.plan((16, 16), weight=W, stats=C.clone(), bias=False)
    assert set(plan.fit.factors) == {"a", "b"}  # the winner's fit, finished in plan, travels on the plan
    assert "fit" not in plan.to_dict() and vars(strategy).keys() <= {"config", "_moments"}  # no fit on the instance
    reused = strategy.decompose(W, plan, stats=C.clone())  # a new statistics tensor with the same content
    assert plan.fit is None  # taken by decompose
    spec = plan.spec
    fresh = kronecker_als(W, C, spec["a_shape"], spec["b_shape"], spec["rank"], max_sweeps=5)
    fresh_strategy = get_strategy("kronecker")(ratio=2, rank="auto", init="als", sweeps=5)
    recomputed = fresh_strategy.decompose(W, plan, stats=C)  # nothing cached: computed from scratch
    for factors in (reused, recomputed):
        assert factors["a"].dtype == dtype
        torch.testing.assert_close(kron_sum(factors["a"], factors["b"]), kron_sum(fresh.a, fresh.b))
