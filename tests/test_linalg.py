"""Nearest Kronecker product, the factored matmul and the factor-shape search (kroncompress.linalg)."""

from __future__ import annotations

import math

import pytest
import torch

import kroncompress as kc
import kroncompress.linalg.svd as svd_module
from kroncompress.linalg import kron_rearrange

# (a_shape, b_shape, rank): tall-thin rearrangements ((1 x 2) / (2 x 1) B factors), wide ones, balanced.
SHAPES = [
    ((16, 12), (1, 2), 1),
    ((8, 24), (2, 1), 2),
    ((1, 2), (16, 12), 1),
    ((2, 3), (8, 4), 3),
    ((4, 4), (4, 4), 4),
    ((6, 4), (3, 5), 1),
    ((3, 40), (2, 2), 2),
]
DTYPE_TOL = [(torch.float64, 1e-10), (torch.float32, 2e-5)]


def random_kron_sum(a_shape, b_shape, rank, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, *a_shape, generator=generator, dtype=torch.float64)
    B = torch.randn(rank, *b_shape, generator=generator, dtype=torch.float64)
    return kc.kron_sum(A, B).to(dtype)


def random_matrix(m, n, dtype=torch.float64, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def tail_residual(W, a_shape, b_shape, rank) -> float:
    """sqrt(sum of squared singular values of R(W) beyond `rank`), by a full float64 SVD."""
    S = torch.linalg.svdvals(kron_rearrange(W.double(), a_shape, b_shape))
    return S[rank:].pow(2).sum().sqrt().item()


def rel_error(W, A, B) -> float:
    return ((W.double() - kc.kron_sum(A.double(), B.double())).norm() / W.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("a_shape,b_shape,rank", SHAPES)
def test_exact_kronecker_sum_is_recovered(a_shape, b_shape, rank, dtype, tol):
    W = random_kron_sum(a_shape, b_shape, rank, dtype)
    A, B, residual = kc.nearest_kronecker(W, a_shape, b_shape, rank=rank, return_residual=True)
    assert rel_error(W, A, B) < tol
    assert residual / W.double().norm().item() < tol


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("a_shape,b_shape,rank", SHAPES)
def test_residual_theorem(a_shape, b_shape, rank, dtype, tol):
    m, n = a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]
    W = random_matrix(m, n, dtype)
    A, B, residual = kc.nearest_kronecker(W, a_shape, b_shape, rank=rank, return_residual=True)
    expected = tail_residual(W, a_shape, b_shape, rank)
    achieved = (W.double() - kc.kron_sum(A.double(), B.double())).norm().item()
    scale = W.double().norm().item()
    assert abs(achieved - expected) <= tol * scale
    assert abs(residual - expected) <= tol * scale


@pytest.mark.parametrize("a_shape,b_shape,rank", SHAPES)
def test_perturbing_the_factors_never_helps(a_shape, b_shape, rank):
    m, n = a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]
    W = random_matrix(m, n, seed=1)
    A, B = kc.nearest_kronecker(W, a_shape, b_shape, rank=rank)
    best = (W - kc.kron_sum(A, B)).norm().item()
    generator = torch.Generator().manual_seed(2)
    for scale in (1e-1, 1e-3):
        for _ in range(5):
            dA = scale * torch.randn(A.shape, generator=generator, dtype=A.dtype)
            dB = scale * torch.randn(B.shape, generator=generator, dtype=B.dtype)
            assert (W - kc.kron_sum(A + dA, B + dB)).norm().item() >= best - 1e-12


# (a_shape given, b_shape given) -> expected full shapes for a 12 x 20 matrix
INFERENCE = [
    (None, (1, 2), (12, 10), (1, 2)),
    ((3, 4), None, (3, 4), (4, 5)),
    ((None, 5), (3, None), (4, 5), (3, 4)),
    ((6, None), (None, 10), (6, 2), (2, 10)),
]


@pytest.mark.parametrize("a_given,b_given,a_expected,b_expected", INFERENCE)
def test_none_shapes_are_inferred(a_given, b_given, a_expected, b_expected):
    A, B = kc.nearest_kronecker(random_matrix(12, 20), a_given, b_given)
    assert tuple(A.shape) == a_expected and tuple(B.shape) == b_expected


@pytest.mark.parametrize("rank,a_expected,b_expected", [(1, (4, 3), (2, 5)), (3, (3, 4, 3), (3, 2, 5))])
def test_rank_one_is_2d_and_rank_r_is_stacked(rank, a_expected, b_expected):
    A, B = kc.nearest_kronecker(random_matrix(8, 15), (4, 3), (2, 5), rank=rank)
    assert tuple(A.shape) == a_expected and tuple(B.shape) == b_expected


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_input_dtype_is_kept(dtype, tol):
    W = random_kron_sum((8, 6), (1, 2), 1, dtype)
    A, B = kc.nearest_kronecker(W, b_shape=(1, 2))
    assert A.dtype == dtype and B.dtype == dtype
    assert rel_error(W, A, B) < tol


@pytest.mark.parametrize("a_shape,b_shape,rank", SHAPES)
def test_randomized_path_agrees_with_gram_path(a_shape, b_shape, rank, monkeypatch):
    m, n = a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]
    W = random_matrix(m, n, dtype=torch.float32, seed=3)
    A_gram, B_gram, res_gram = kc.nearest_kronecker(W, a_shape, b_shape, rank=rank, return_residual=True)
    calls = []
    original = svd_module._triplets_randomized
    monkeypatch.setattr(svd_module, "_triplets_randomized", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(svd_module, "GRAM_LIMIT", 1)
    A_rand, B_rand, res_rand = kc.nearest_kronecker(W, a_shape, b_shape, rank=rank, return_residual=True)
    assert calls, "the randomized path was not taken"
    scale = W.norm().item()
    assert abs(res_rand - res_gram) < 1e-4 * scale
    gram, rand = kc.kron_sum(A_gram, B_gram), kc.kron_sum(A_rand, B_rand)
    assert ((gram - rand).norm() / scale).item() < 1e-3


@pytest.mark.parametrize("randomized", [False, True])
@pytest.mark.parametrize("m,n,rank", [(40, 30, 5), (12, 64, 1), (64, 16, 16)])
def test_truncated_svd_is_optimal(m, n, rank, randomized, monkeypatch):
    W = random_matrix(m, n, seed=6)
    if randomized:
        monkeypatch.setattr(svd_module, "GRAM_LIMIT", 1)
    U, V = kc.truncated_svd(W, rank)
    assert U.shape == (m, rank) and V.shape == (rank, n)
    optimum = torch.linalg.svdvals(W)[rank:].pow(2).sum().sqrt().item()
    assert (W - U @ V).norm().item() == pytest.approx(optimum, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("decay", [0.0, 3.0])  # flat spectrum (near-ties at the cut), or 1 .. 1e-3
@pytest.mark.parametrize("m,n,rank", [(600, 300, 75), (300, 700, 150)])
def test_float32_truncated_svd_through_the_float32_eigensolve_is_optimal(m, n, rank, decay):
    assert min(m, n) >= svd_module.SINGLE_EIGH_COLUMNS  # the float32 eigensolve path
    generator = torch.Generator().manual_seed(3)
    k = min(m, n)
    left, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    sigma = 10.0 ** (-decay * torch.arange(k, dtype=torch.float64) / k)
    W = ((left * sigma) @ right.T).float()
    U, V = kc.truncated_svd(W, rank)
    assert U.dtype == V.dtype == torch.float32
    optimum = torch.linalg.svdvals(W.double())[rank:].pow(2).sum().sqrt().item()
    achieved = (W.double() - U.double() @ V.double()).norm().item()
    # float32 factors: each entry rounded (eps/2), summed over the rank; the subspace error enters squared
    assert abs(achieved - optimum) <= 4 * math.sqrt(rank) * torch.finfo(torch.float32).eps * W.double().norm().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_cpu(dtype):
    W = random_kron_sum((32, 24), (1, 2), 1, torch.float32) + 1e-3 * random_matrix(32, 48, torch.float32)
    A_cpu, B_cpu = kc.nearest_kronecker(W, b_shape=(1, 2))
    A, B = kc.nearest_kronecker(W.to("cuda", dtype), b_shape=(1, 2))
    assert A.device.type == "cuda" and A.dtype == dtype
    assert torch.allclose(kc.kron_sum(A, B).float().cpu(), kc.kron_sum(A_cpu, B_cpu), atol=5e-2, rtol=5e-2)


# --- kron_matmul ----------------------------------------------------------------------------------
# (a_shape, b_shape, rank, leading dims): the first two favour different contraction orders.
MATMUL = [
    ((64, 32), (1, 2), 1, (5,)),  # B first is cheaper
    ((1, 2), (64, 32), 1, (5,)),  # A first is cheaper
    ((3, 5), (4, 2), 3, (2, 3)),
    ((8, 4), (2, 8), 2, (2, 1, 3)),
    ((6, 6), (6, 6), 4, ()),
]


def order_costs(a_shape, b_shape):
    (m1, n1), (m2, n2) = a_shape, b_shape
    return n1 * m2 * (n2 + m1), m1 * n2 * (n1 + m2)


def test_matmul_table_covers_both_orders():
    orders = {cost_b < cost_a for cost_b, cost_a in (order_costs(a, b) for a, b, _, _ in MATMUL)}
    assert orders == {True, False}


@pytest.mark.parametrize("a_shape,b_shape,rank,lead", MATMUL)
def test_kron_matmul_equals_dense(a_shape, b_shape, rank, lead):
    generator = torch.Generator().manual_seed(4)
    A = torch.randn(rank, *a_shape, generator=generator, dtype=torch.float64)
    B = torch.randn(rank, *b_shape, generator=generator, dtype=torch.float64)
    x = torch.randn(*lead, a_shape[1] * b_shape[1], generator=generator, dtype=torch.float64)
    y = kc.kron_matmul(x, A, B)
    assert y.shape == (*lead, a_shape[0] * b_shape[0])
    assert torch.allclose(y, x @ kc.kron_sum(A, B).T, atol=1e-10)


# --- kronecker_shapes -----------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,ratio,rank", [(64, 64, 2, 1), (48, 96, 4, 1), (768, 3072, 2, 1), (32, 64, 4, "auto"), (24, 40, 3, 2)])
def test_candidates_fit_the_budget_and_exclude_degenerate(m, n, ratio, rank):
    tolerance = 0.01
    shapes = kc.kronecker_shapes(m, n, ratio=ratio, rank=rank, tolerance=tolerance)
    assert shapes
    for s in shapes:
        assert s.params <= m * n / ratio * (1 + tolerance)
        assert s.params == s.rank * (s.a_shape[0] * s.a_shape[1] + s.b_shape[0] * s.b_shape[1])
        assert s.a_shape[0] * s.b_shape[0] == m and s.a_shape[1] * s.b_shape[1] == n
        assert not s.degenerate


@pytest.mark.parametrize("m,n,ratio,rank,degenerate", [
    (16, 16, 2, "auto", ((16, 1), (1, 16))),
    (16, 16, 2, "auto", ((1, 16), (16, 1))),
])
def test_degenerate_shapes_only_when_allowed(m, n, ratio, rank, degenerate):
    def found(**kwargs):
        return {(s.a_shape, s.b_shape) for s in kc.kronecker_shapes(m, n, ratio=ratio, rank=rank, max_candidates=1000, band=1.0, **kwargs)}

    assert degenerate not in found()
    assert degenerate in found(allow_degenerate=True)


def test_ratio_two_on_gpt2_mlp_prefers_a_one_by_two_factor():
    best = kc.kronecker_shapes(768, 3072, ratio=2)[0]
    assert best.rank == 1
    assert sorted(best.b_shape) == [1, 2] or sorted(best.a_shape) == [1, 2]


@pytest.mark.parametrize("m,n,ratio,a_shape,b_shape", [(16, 16, 8, (4, 4), (4, 4)), (24, 36, 4, (6, 6), (4, 6)), (32, 16, 2, (16, 8), (2, 2))])
def test_energy_ranks_the_true_shape_first(m, n, ratio, a_shape, b_shape):
    W = random_kron_sum(a_shape, b_shape, 1, torch.float32, seed=5)
    candidates = kc.kronecker_shapes(m, n, ratio=ratio, max_candidates=1000, band=1.0)
    assert (a_shape, b_shape) in {(s.a_shape, s.b_shape) for s in candidates}
    best = kc.kronecker_shapes(m, n, ratio=ratio, weight=W, max_candidates=1000, band=1.0)[0]
    assert (best.a_shape, best.b_shape) == (a_shape, b_shape)
    assert best.score == pytest.approx(1.0, abs=1e-5)


def test_ranking_criterion_is_pluggable():
    default = kc.kronecker_shapes(64, 64, ratio=2, weight=random_matrix(64, 64))
    assert default[0].score is not None
    prefer_tall_b = lambda W, s: s.b_shape[0] / s.b_shape[1]  # noqa: E731
    best = kc.kronecker_shapes(64, 64, ratio=2, weight=random_matrix(64, 64), criterion=prefer_tall_b)[0]
    assert best.b_shape == (2, 1) and best.score == 2.0


# --- bad input ------------------------------------------------------------------------------------
BAD_NEAREST = [
    (lambda: kc.nearest_kronecker(random_matrix(12, 20), (5, 4)), ["12", "5", "product"]),
    (lambda: kc.nearest_kronecker(random_matrix(12, 20), None, (1, 3)), ["20", "3", "product"]),
    (lambda: kc.nearest_kronecker(random_matrix(12, 20)), ["a_shape", "b_shape", "12 x 20"]),
    (lambda: kc.nearest_kronecker(random_matrix(12, 20), (4, 4), rank=0), ["rank=0", "1 <= rank <= 15"]),
    (lambda: kc.nearest_kronecker(random_matrix(12, 20), (4, 4), rank=16), ["rank=16", "1 <= rank <= 15"]),
    (lambda: kc.nearest_kronecker(torch.ones(2, 3, 4), (1, 1)), ["2-D", "(2, 3, 4)", "reshape"]),
    (lambda: kc.nearest_kronecker(torch.ones(6), (1, 1)), ["2-D", "(6,)"]),
    (lambda: kc.kronecker_shapes(64, 64, ratio=1), ["ratio=1", "> 1"]),
    (lambda: kc.kronecker_shapes(64, 64, ratio=0.5), ["ratio=0.5", "> 1"]),
    (lambda: kc.kronecker_shapes(64, 64), ["ratio", "budget"]),
    (lambda: kc.kronecker_shapes(64, 64, ratio=2, rank=0), ["rank=0"]),
    (lambda: kc.kronecker_shapes(4, 4, budget=1), ["4 x 4", "lower the ratio"]),
    (lambda: kc.truncated_svd(random_matrix(4, 6), 5), ["rank=5", "4 x 6", "1..4"]),
    (lambda: kc.truncated_svd(torch.ones(2, 2, 2), 1), ["2-D", "(2, 2, 2)"]),
]


@pytest.mark.parametrize("call,fragments", BAD_NEAREST)
def test_bad_input_names_the_problem(call, fragments):
    with pytest.raises(ValueError) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


# --- issue 14 item 13: dtypes, non-finite values and malformed shapes ---------------------------------
def with_entry(value, dtype=torch.float32):
    W = random_matrix(12, 20, dtype)
    W[3, 7] = value
    return W


BAD_INPUT_TABLE = [
    # case, call, words the ValueError must contain
    ("complex W", lambda: kc.nearest_kronecker(torch.ones(4, 4, dtype=torch.complex64), b_shape=(1, 2)),
     ["complex", "real", "W.imag"]),
    ("NaN entry", lambda: kc.nearest_kronecker(with_entry(float("nan")), b_shape=(1, 2)),
     ["nearest_kronecker", "1 NaN", "0 infinite", "of 240"]),
    ("inf entry", lambda: kc.nearest_kronecker(with_entry(float("inf")), b_shape=(1, 2)),
     ["nearest_kronecker", "0 NaN", "1 infinite"]),
    ("-inf, float64", lambda: kc.nearest_kronecker(with_entry(float("-inf"), torch.float64), (4, 4)),
     ["1 infinite"]),
    ("NaN, randomized path", lambda: _randomized(lambda: kc.nearest_kronecker(with_entry(float("nan")), (4, 4))),
     ["1 NaN"]),
    ("NaN, truncated_svd", lambda: kc.truncated_svd(with_entry(float("nan")), 2), ["truncated_svd", "1 NaN"]),
    ("NaN, truncated_svd float64", lambda: kc.truncated_svd(with_entry(float("nan"), torch.float64), 2),
     ["truncated_svd", "1 NaN"]),
    ("b_shape=(3,)", lambda: kc.nearest_kronecker(random_matrix(12, 20), b_shape=(3,)),
     ["b_shape", "pair", "(3,)"]),
    ("a_shape=(1, 2, 3)", lambda: kc.nearest_kronecker(random_matrix(12, 20), a_shape=(1, 2, 3)),
     ["a_shape", "pair"]),
    ("b_shape=2", lambda: kc.nearest_kronecker(random_matrix(12, 20), b_shape=2), ["b_shape", "pair", "2"]),
    ("b_shape='12'", lambda: kc.nearest_kronecker(random_matrix(12, 20), b_shape="12"), ["b_shape", "pair"]),
    ("b_shape float", lambda: kc.nearest_kronecker(random_matrix(12, 20), b_shape=(1, 2.0)),
     ["b_shape", "positive ints"]),
    ("b_shape zero", lambda: kc.nearest_kronecker(random_matrix(12, 20), b_shape=(0, 2)),
     ["b_shape", "positive ints"]),
    ("b_shape negative", lambda: kc.nearest_kronecker(random_matrix(12, 20), b_shape=(-1, 2)),
     ["b_shape", "positive ints"]),
    ("b_shape bool", lambda: kc.nearest_kronecker(random_matrix(12, 20), b_shape=(True, 2)),
     ["b_shape", "positive ints"]),
    ("rank=True", lambda: kc.nearest_kronecker(random_matrix(12, 20), (4, 4), rank=True), ["rank=True"]),
    ("truncated_svd complex", lambda: kc.truncated_svd(torch.ones(4, 4, dtype=torch.complex64), 1), ["complex"]),
]


def _randomized(call):
    original = svd_module.GRAM_LIMIT
    svd_module.GRAM_LIMIT = 1
    try:
        return call()
    finally:
        svd_module.GRAM_LIMIT = original


@pytest.mark.parametrize("case,call,fragments", BAD_INPUT_TABLE, ids=[row[0] for row in BAD_INPUT_TABLE])
def test_bad_input_table(case, call, fragments):
    with pytest.raises(ValueError) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), f"{case}: {fragment!r} missing from: {info.value}"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_weights_are_fitted_in_float(dtype):
    """Exact for an integer Kronecker product: the factors come back in the default float dtype, not truncated."""
    A = torch.tensor([[1, 0, 1], [1, 1, 0]])
    B = torch.tensor([[1, 1]])
    W = torch.kron(A, B).to(dtype)
    fa, fb, residual = kc.nearest_kronecker(W, b_shape=(1, 2), return_residual=True)
    assert fa.dtype == torch.get_default_dtype() and fb.dtype == torch.get_default_dtype()
    assert residual < 1e-5 * W.float().norm().item()
    torch.testing.assert_close(kc.kron_sum(fa, fb), W.to(fa.dtype), rtol=1e-5, atol=1e-5)


def test_integer_weights_truncated_svd_in_float():
    W = torch.arange(12).reshape(3, 4)
    U, V = kc.truncated_svd(W, 2)  # W has rank 2
    assert U.dtype == torch.get_default_dtype()
    torch.testing.assert_close(U @ V, W.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b_shape", [(1, 2), (2, 1), (2, 2)])
def test_numpy_ints_are_accepted_as_shapes(b_shape):
    import numpy as np

    A, B = kc.nearest_kronecker(random_matrix(12, 20), b_shape=tuple(np.int64(v) for v in b_shape))
    assert tuple(B.shape) == b_shape


@pytest.mark.parametrize("rank,a_shape,b_shape", [(1, (6, 4), (1, 3)), (3, (6, 4), (1, 3)), (2, (6, 4), (2, 3)), (2, (1, 4), (6, 3))])
def test_kron_matmul_fuses_the_bias(rank, a_shape, b_shape):
    """The bias path (addmm for (1 x k) factors, an add otherwise) equals x W^T + b."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(rank, *a_shape, generator=g, dtype=torch.float64)
    B = torch.randn(rank, *b_shape, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, a_shape[1] * b_shape[1], generator=g, dtype=torch.float64)
    bias = torch.randn(a_shape[0] * b_shape[0], generator=g, dtype=torch.float64)
    expected = x @ kc.kron_sum(A, B).T + bias
    torch.testing.assert_close(kc.kron_matmul(x, A, B, bias), expected, rtol=1e-12, atol=1e-12)


# Gemma 3 270M's block weights (out x in): ratio 2 with rank auto offered shapes with 40-287 terms
GEMMA_SHAPES = [(640, 2048), (2048, 640), (640, 1024), (1024, 640), (640, 640)]


@pytest.mark.parametrize("m, n", GEMMA_SHAPES)
@pytest.mark.parametrize("ratio", [2, 4])
def test_rank_auto_offers_only_shapes_whose_als_costs_a_bounded_number_of_svds(m, n, ratio):
    from kroncompress.linalg.shapes import ALS_FLOPS_FREE, MAX_ALS_COST, als_cost, whitened_svd_cost

    offered = kc.kronecker_shapes(m, n, ratio=ratio, rank="auto")
    assert offered
    for s in offered:
        cost = als_cost(m, n, s.a_shape, s.b_shape, s.rank)
        assert cost <= max(MAX_ALS_COST * whitened_svd_cost(m, n), ALS_FLOPS_FREE), s
        # so the systems stay small: (r n1)^3 alone is within the bound, and r is at most 40 on these shapes
        assert s.rank <= 40, s
        assert s.rank * s.a_shape[1] <= max(MAX_ALS_COST * whitened_svd_cost(m, n), ALS_FLOPS_FREE) ** (1 / 3), s
    unbounded = kc.kronecker_shapes(m, n, ratio=ratio, rank="auto", max_als_cost=None)
    if (m, n, ratio) == (640, 2048, 2):  # what the issue saw: without the rule, shapes of 287 terms
        assert max(s.rank for s in unbounded) == 287 and max(s.rank for s in offered) <= 40


def test_rank_auto_with_no_affordable_shape_says_why():
    with pytest.raises(ValueError, match="ALS sweep costs more than 0.1 whitened SVDs.*fixed rank"):
        kc.kronecker_shapes(640, 2048, ratio=2, rank="auto", max_als_cost=0.1)
    kc.kronecker_shapes(640, 2048, ratio=2, rank=1, max_als_cost=0.1)  # a fixed rank is the user's choice
