"""Tensorized weights: Tucker, CP and tensor-train (TT-matrix) formats of an (out x in) matrix.

W (m x n) is viewed as a tensor by splitting out = o_1 ... o_d and in = i_1 ... i_d (row-major, the
same as `W.reshape(*out_shape, *in_shape)`):

- Tucker: the order-2d tensor (o_1..o_d, i_1..i_d) = core (r_1..r_2d) x_k U_k, U_k (dim_k x r_k);
- CP: the same order-2d tensor as sum_{c<R} of outer products of the columns of U_k (dim_k x R);
- TT-matrix: W[(o),(i)] = G_1[o_1, i_1] ... G_d[o_d, i_d], cores G_k (r_{k-1}, o_k, i_k, r_k), r_0 = r_d = 1
  (with d = 2 this is a rank-r Kronecker sum, so TT is most useful with d >= 3).

Decompositions call tensorly (HOOI, ALS, TT-SVD) through its pytorch backend inside a thread-local
backend context, on the weight's device, in float32 (float64 for float64 weights). Forward products
(`*_matmul`) contract an input with the factors mode by mode, never building W; `*_matmul_flops` give
their cost per token, and the order of the contractions is the cheaper one for the shapes.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Callable, Sequence

import torch

Shape = tuple[int, ...]


# -- tensorization ------------------------------------------------------------------------------------
def balanced_factors(k: int, order: int) -> Shape:
    """Split k into `order` factors (ascending) whose largest is as small as possible, e.g. 3072, 2 -> (48, 64)."""
    if k < 1 or order < 1:
        raise ValueError(f"balanced_factors: need k >= 1 and order >= 1, got k={k}, order={order}")

    def splits(rest: int, parts: int, low: int):
        if parts == 1:
            if rest >= low:
                yield (rest,)
            return
        for f in range(low, int(round(rest ** (1.0 / parts))) + 2):
            if rest % f == 0 and f <= rest // f:
                for tail in splits(rest // f, parts - 1, f):
                    yield (f, *tail)

    options = list(splits(k, order, 1)) or [(1,) * (order - 1) + (k,)]
    return min(options, key=lambda s: (max(s), -min(s)))


def check_tensorization(m: int, n: int, out_shape: Sequence[int], in_shape: Sequence[int]) -> None:
    """ValueError (naming out_shape / in_shape and the fix) unless the shapes multiply to (m, n) with equal order."""
    for name, shape, size in (("out_shape", out_shape, m), ("in_shape", in_shape, n)):
        if math.prod(shape) != size:
            raise ValueError(f"{name}={list(shape)} multiplies to {math.prod(shape)}, but the weight has {size} "
                             f"{'rows (out features)' if name == 'out_shape' else 'columns (in features)'}; "
                             f"give factors whose product is {size}, e.g. {list(balanced_factors(size, len(shape)))}")
    if len(out_shape) != len(in_shape):
        raise ValueError(f"out_shape={list(out_shape)} and in_shape={list(in_shape)} must have the same number of "
                         "factors (pad with 1s)")


# -- parameter counts and rank limits ----------------------------------------------------------------
def tucker_params(out_shape: Sequence[int], in_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """prod(ranks) (core) + sum_k dim_k r_k (factor matrices)."""
    return math.prod(ranks) + sum(d * r for d, r in zip((*out_shape, *in_shape), ranks))


def tucker_params_grid(out_shape: Sequence[int], in_shape: Sequence[int], ranks: torch.Tensor) -> torch.Tensor:
    """tucker_params of each row of an (N x 2d) int64 rank tensor (float64), inf where HOOI cannot reach the
    row (tucker_ranks_problem: a rank above the product of the others)."""
    ranks = ranks.to(torch.float64)
    core = ranks.prod(1)
    counts = core + ranks @ torch.tensor([*out_shape, *in_shape], dtype=torch.float64)
    return torch.where((ranks * ranks > core[:, None]).any(1), torch.full_like(counts, math.inf), counts)


def cp_params(out_shape: Sequence[int], in_shape: Sequence[int], rank: int) -> int:
    """rank * (sum of all mode sizes)."""
    return rank * (sum(out_shape) + sum(in_shape))


def tt_params(out_shape: Sequence[int], in_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """sum_k r_{k-1} o_k i_k r_k with boundary ranks 1; `ranks` are the d - 1 inner ranks."""
    full = (1, *ranks, 1)
    return sum(full[k] * o * i * full[k + 1] for k, (o, i) in enumerate(zip(out_shape, in_shape)))


def tucker_max_ranks(out_shape: Sequence[int], in_shape: Sequence[int]) -> list[int]:
    """A mode's Tucker rank cannot exceed its size."""
    return [*out_shape, *in_shape]


def tt_max_ranks(out_shape: Sequence[int], in_shape: Sequence[int]) -> list[int]:
    """r_k <= min(prod_{j<=k} o_j i_j, prod_{j>k} o_j i_j): the ranks of the TT-SVD unfoldings."""
    pairs = [o * i for o, i in zip(out_shape, in_shape)]
    return [min(math.prod(pairs[: k + 1]), math.prod(pairs[k + 1 :])) for k in range(len(pairs) - 1)]


def tucker_ranks_problem(ranks: Sequence[int]) -> str | None:
    """Why these Tucker ranks cannot come out of HOOI (a mode rank above the product of the others), or None."""
    for k, r in enumerate(ranks):
        others = math.prod(ranks) // r
        if r > others:
            return f"rank {r} of mode {k} exceeds the product of the other ranks ({others})"
    return None


def tt_ranks_problem(out_shape: Sequence[int], in_shape: Sequence[int], ranks: Sequence[int]) -> str | None:
    """Why these inner TT ranks cannot come out of TT-SVD (r_k > r_{k-1} o_k i_k or > o_{k+1} i_{k+1} r_{k+1}), or None."""
    full = (1, *ranks, 1)
    pairs = [o * i for o, i in zip(out_shape, in_shape)]
    for k in range(1, len(full) - 1):
        if full[k] > full[k - 1] * pairs[k - 1] or full[k] > pairs[k] * full[k + 1]:
            return (f"rank r_{k}={full[k]} exceeds r_{k-1} o_{k} i_{k} = {full[k - 1] * pairs[k - 1]} or "
                    f"o_{k+1} i_{k+1} r_{k+1} = {pairs[k] * full[k + 1]}")
    return None


def solve_ranks(params_of: Callable[[Sequence[int]], int], max_ranks: Sequence[int], budget: float,
                radius: int | None = None, params_of_grid: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> list[int] | None:
    """The ranks (each in 1..max) with the most parameters at or under `budget`, or None if all-ones exceeds it.

    Ranks proportional to `max_ranks` are scaled (bisection) to the largest that fits, then every
    combination within +-radius of that point is tried and the one using most of the budget kept (ties:
    closest to proportional); by default radius keeps that to about 20000 combinations. The result never exceeds the budget (so the ratio is met or exceeded) and
    lands within about 1% below it unless the rank grid is too coarse or every rank is at its maximum.
    `params_of_grid` (optional) is params_of for a whole (N x k) int64 tensor of rank rows at once, giving
    float64 counts (inf where infeasible): the same choice, without 20000 Python calls.
    """
    k = len(max_ranks)
    if k == 0:
        return []
    if params_of([1] * k) > budget:
        return None

    def at(t: float) -> list[int]:
        return [max(1, min(mr, int(t * mr))) for mr in max_ranks]

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params_of(at(mid)) <= budget else (lo, mid)
    if radius is None:
        radius = max(1, min(20, int((20000 ** (1.0 / k) - 1) / 2)))
    base = at(1.0) if params_of(at(1.0)) <= budget else at(lo)
    if params_of_grid is not None:
        deltas = torch.cartesian_prod(*[torch.arange(-radius, radius + 1)] * k).reshape(-1, k)
        grid = torch.minimum(torch.clamp(torch.tensor(base) + deltas, min=1), torch.tensor(list(max_ranks)))
        counts = params_of_grid(grid)
        counts = torch.where(counts <= budget, counts, torch.full_like(counts, -math.inf))
        distance = deltas.abs().sum(1)
        # the itertools order and key of the loop below: most parameters, then nearest, then first
        ties = torch.where(counts == counts.max(), distance, torch.full_like(distance, 1 << 40))
        return grid[int(torch.argmin(ties))].tolist()
    best, best_key = base, (params_of(base), 0)
    for delta in itertools.product(range(-radius, radius + 1), repeat=k):
        ranks = [min(mr, max(1, b + d)) for b, d, mr in zip(base, delta, max_ranks)]
        p = params_of(ranks)
        key = (p, -sum(abs(d) for d in delta))
        if p <= budget and key > best_key:
            best, best_key = ranks, key
    return best


# -- decompositions (tensorly) ------------------------------------------------------------------------
def _work_tensor(weight: torch.Tensor, out_shape, in_shape) -> torch.Tensor:
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.detach().to(dtype).reshape(*out_shape, *in_shape).contiguous()


def _tensorly_pytorch():
    import tensorly as tl

    # Thread-local and restored on exit: other code keeps whatever backend it had.
    return tl.backend_context("pytorch", local_threadsafe=True)


def _gram_svd(matrix, n_eigenvecs=None, **_):
    """tensorly-compatible truncated SVD (U, S, Vh) through the Gram matrix of the short side.

    Tucker and CP unfoldings are short and very wide (24 x 98304 for a 768 x 3072 weight); LAPACK's SVD
    takes about a second each there, the Gram eigensolve milliseconds."""
    from kroncompress.linalg.svd import top_singular_triplets

    k = min(matrix.shape) if n_eigenvecs is None else min(n_eigenvecs, *matrix.shape)
    U, S, V = top_singular_triplets(matrix, k)
    return U, S, V.T


def _cast(tensors, like: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device=like.device, dtype=like.dtype).contiguous() for t in tensors]


def tucker_decompose(weight: torch.Tensor, out_shape, in_shape, ranks, n_iter_max: int = 25, tol: float = 1e-6,
                     random_state: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(core (r_1..r_2d), [U_k (dim_k x r_k)]) of the tensorized weight: HOSVD start, then HOOI sweeps.

    Each factor is the leading eigenvectors of the Gram of its mode's unfolding (milliseconds, where
    LAPACK's SVD of those short, very wide unfoldings takes about a second; tensorly's HOOI runs such
    SVDs). A sweep updates the modes in order, as HOOI does, but shares the mode products: the first half
    of the modes reuse T projected on the second half (whose factors that half of the sweep does not
    change), and the other way round, so each sweep contracts the full tensor twice instead of once per
    mode. Mode products and Grams are batched GEMMs on (before, dim_k, after) views of contiguous
    tensors, so no unfolding is ever copied. Sweeps stop once the relative error (from the core's norm:
    the factors are orthonormal) improves by less than `tol` of itself. `random_state` is accepted for
    interface symmetry; HOSVD/HOOI are deterministic.
    """
    from kroncompress.linalg.svd import lapack_threads

    d = len(out_shape)
    if weight.dim() == 2 and not weight.is_contiguous() and weight.T.is_contiguous():
        # a Conv1D weight (stored in x out): decompose the stored tensor (in modes first) as it lies, instead
        # of copying its transpose, then move the small core's modes back
        core, factors = tucker_decompose(weight.T, in_shape, out_shape, [*ranks[d:], *ranks[:d]], n_iter_max, tol)
        return core.permute(*range(d, 2 * d), *range(d)).contiguous(), [*factors[d:], *factors[:d]]
    T = _work_tensor(weight, out_shape, in_shape)
    modes = list(range(T.dim()))
    half = max(1, len(modes) // 2)
    groups = [modes[:half], modes[half:]] if len(modes) > 1 else [modes]
    total = float(torch.linalg.vector_norm(T, dtype=torch.float64)) ** 2
    # many small batched GEMMs and eigensolves: one thread while other processes compete (see lapack_threads)
    with lapack_threads(T):
        factors = [_leading_vectors(T, k, r) for k, r in zip(modes, ranks)]
        previous = None
        for _ in range(n_iter_max):
            for group in groups:
                rest = _project(T, factors, [k for k in modes if k not in group])
                for k in group:
                    factors[k] = _leading_vectors(_project(rest, factors, [j for j in group if j != k]), k, ranks[k])
            core = _project(rest, factors, groups[-1])  # rest: T projected on every other group, new factors
            error = max(total - float(torch.linalg.vector_norm(core, dtype=torch.float64)) ** 2, 0.0) ** 0.5
            if previous is not None and previous - error <= tol * max(error, 1e-30 * total ** 0.5):
                break
            previous = error
    return _cast([core], weight)[0], _cast(factors, weight)


def _split(T: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(size of the modes before k, dim_k, size of the modes after k): T as a (before, dim_k, after) view."""
    return math.prod(T.shape[:k]), T.shape[k], math.prod(T.shape[k + 1:])


def _mode_product(T: torch.Tensor, U: torch.Tensor, k: int) -> torch.Tensor:
    """T x_k U^T (mode k of size dim_k becomes r_k for U (dim_k x r_k)), contiguous, without moving axes."""
    before, dim, after = _split(T, k)
    if after == 1:
        out = T.reshape(before, dim) @ U
    else:  # (r x dim) @ (before, dim, after): `before` GEMMs writing (before, r, after) in place order; bmm on
        # an expanded view, not matmul, whose kernel choice depends on requires_grad (the same layer's output
        # would then differ in the last bit between a frozen and a trainable copy)
        out = torch.bmm(U.T.expand(before, *U.T.shape), T.reshape(before, dim, after))
    return out.reshape(*T.shape[:k], U.shape[1], *T.shape[k + 1:])


def _project(T: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int]) -> torch.Tensor:
    """T x_k U_k^T over `modes` (each mode k of size dim_k becomes r_k), largest size reduction first."""
    for k in sorted(modes, key=lambda k: factors[k].shape[1] / factors[k].shape[0]):
        T = _mode_product(T, factors[k], k)
    return T


def _mode_gram(T: torch.Tensor, k: int) -> torch.Tensor:
    """The Gram (dim_k x dim_k, float64) of T's mode-k unfolding, from (before, dim_k, after) views: GEMMs
    in T's precision, no copy of the unfolding. A float32 Gram perturbs the leading subspace by an angle
    theta ~ eps32 ||G|| / gap, which raises the residual by O(theta^2) only, and the next HOOI sweep starts
    from whatever subspace it gets; the result's error is computed from the float32 core either way."""
    before, dim, after = _split(T, k)
    if before == 1:
        flat = T.reshape(dim, after)
        G = flat @ flat.T
    elif after == 1:
        flat = T.reshape(before, dim)
        G = flat.T @ flat
    else:
        view = T.reshape(before, dim, after)
        G = torch.bmm(view, view.transpose(1, 2)).sum(0)  # 4x faster than einsum, which copies the unfolding
    return G.to(torch.float64)


def _leading_vectors(T: torch.Tensor, k: int, rank: int) -> torch.Tensor:
    """The `rank` leading left singular vectors of T's mode-k unfolding (short and wide): eigenvectors of
    its Gram (see _mode_gram), eigensolved in float64 (at most a few hundred rows: microseconds)."""
    from kroncompress.linalg.svd import GRAM_LIMIT, non_finite_error, top_singular_triplets

    rows, cols = T.shape[k], T.numel() // max(T.shape[k], 1)
    if rows > min(cols, GRAM_LIMIT):  # not short and wide (e.g. order 1): the general solver
        return top_singular_triplets(T.movedim(k, 0).reshape(rows, cols), rank, name="tucker_decompose")[0]
    G = _mode_gram(T, k)
    if not bool(torch.isfinite(G).all()):
        raise non_finite_error("tucker_decompose", T.movedim(k, 0).reshape(rows, cols))
    _, vectors = torch.linalg.eigh(G)  # ascending
    return vectors.flip(1)[:, :rank].to(T.dtype)


def cp_decompose(weight: torch.Tensor, out_shape, in_shape, rank: int, n_iter_max: int = 25, tol: float = 1e-8,
                 random_state: int = 0) -> list[torch.Tensor]:
    """[U_k (dim_k x rank)] of the tensorized weight by tensorly's ALS (SVD init, random columns beyond a
    mode's size); the CP weights are folded into the first factor."""
    from tensorly.decomposition import parafac

    from kroncompress.linalg.svd import lapack_threads

    T = _work_tensor(weight, out_shape, in_shape)
    with _tensorly_pytorch(), warnings.catch_warnings(), lapack_threads(T):
        warnings.filterwarnings("ignore", message=".*n_eigenvecs.*")  # rank > mode size: expected, padded randomly
        weights, factors = parafac(T, rank, n_iter_max=n_iter_max, init="svd", tol=tol, random_state=random_state,
                                   normalize_factors=False, svd=_gram_svd)
    factors = list(factors)
    factors[0] = factors[0] * weights
    return _cast(factors, weight)


def tt_decompose(weight: torch.Tensor, out_shape, in_shape, ranks) -> list[torch.Tensor]:
    """TT-matrix cores G_k (r_{k-1}, o_k, i_k, r_k) by tensorly's TT-SVD (deterministic)."""
    from tensorly.decomposition import tensor_train_matrix

    T = _work_tensor(weight, out_shape, in_shape)
    from kroncompress.linalg.svd import lapack_threads

    with _tensorly_pytorch(), lapack_threads(T):  # a chain of LAPACK SVDs: one thread (see lapack_threads)
        cores = tensor_train_matrix(T, rank=[1, *ranks, 1])
    return _cast(list(cores), weight)


# -- reconstruction (export and tests only) ----------------------------------------------------------
def _mode_dot(t: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Contract axis `mode` of t with the columns of matrix (new_dim x old_dim)."""
    return torch.movedim(torch.tensordot(t, matrix, dims=([mode], [1])), -1, mode)


def tucker_to_matrix(core: torch.Tensor, factors: Sequence[torch.Tensor], m: int, n: int) -> torch.Tensor:
    """W from the core, expanding one mode at a time (cheapest order first) with in-place-order GEMMs."""
    full = core
    for k in _best_mode_order(tuple(core.shape), tuple(f.shape[0] for f in factors)):
        full = _mode_product(full, factors[k].T, k)
    return full.reshape(m, n)


def _khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


def cp_to_matrix(factors: Sequence[torch.Tensor], d: int) -> torch.Tensor:
    """W = KR(out factors) KR(in factors)^T, never forming the (m n x R) Khatri-Rao product."""
    return _khatri_rao(factors[:d]) @ _khatri_rao(factors[d:]).T


def tt_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    full = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], cores[0].shape[3])
    for core in cores[1:]:
        O, I, _ = full.shape
        _, o, i, r = core.shape
        full = torch.einsum("xyr,roiz->xoyiz", full, core).reshape(O * o, I * i, r)
    return full.reshape(full.shape[0], full.shape[1])


# -- forward products -------------------------------------------------------------------------------
def _mode_sequence_flops(dims: Sequence[int], new_dims: Sequence[int], order: Sequence[int]) -> int:
    """FLOPs of replacing dims[k] by new_dims[k] one mode at a time (a GEMM of cost 2 * size * new_dim)."""
    current, flops = list(dims), 0
    for k in order:
        flops += 2 * math.prod(current) * new_dims[k]
        current[k] = new_dims[k]
    return flops


def _best_mode_order(dims: Sequence[int], new_dims: Sequence[int]) -> tuple[int, ...]:
    d = len(dims)
    if d <= 5:
        return min(itertools.permutations(range(d)), key=lambda p: _mode_sequence_flops(dims, new_dims, p))
    return tuple(sorted(range(d), key=lambda k: new_dims[k] / dims[k]))  # most shrinking first


def tucker_plan_orders(out_shape, in_shape, ranks) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The cheapest order to shrink the input modes, and to expand the output modes."""
    d = len(out_shape)
    return _best_mode_order(in_shape, ranks[d:]), _best_mode_order(ranks[:d], out_shape)


def tucker_matmul_flops(out_shape, in_shape, ranks) -> int:
    d = len(out_shape)
    in_order, out_order = tucker_plan_orders(out_shape, in_shape, ranks)
    return (_mode_sequence_flops(in_shape, ranks[d:], in_order) + 2 * math.prod(ranks)
            + _mode_sequence_flops(ranks[:d], out_shape, out_order))


def tucker_matmul(x: torch.Tensor, core: torch.Tensor, factors: Sequence[torch.Tensor], orders) -> torch.Tensor:
    """x (B, n) -> x W^T (B, m) for the Tucker W: shrink input modes, apply the core, expand output modes."""
    d = core.dim() // 2
    in_order, out_order = orders
    t = x.reshape(x.shape[0], *(f.shape[0] for f in factors[d:]))
    for k in in_order:  # batched GEMMs on (before, dim, after) views: no movedim copies (see _mode_product)
        t = _mode_product(t, factors[d + k], 1 + k)
    out_ranks = core.shape[:d]
    t = (t.reshape(t.shape[0], -1) @ core.reshape(math.prod(out_ranks), -1).T).reshape(t.shape[0], *out_ranks)
    for k in out_order:
        t = _mode_product(t, factors[k].T, 1 + k)
    return t.reshape(t.shape[0], -1)


def cp_matmul_flops(out_shape, in_shape, rank: int) -> int:
    """2 R (in + out) per token: two GEMMs through the Khatri-Rao factors (whose formation, (in + out) R
    multiplies per call, is shared by all tokens of the call and not counted)."""
    return 2 * rank * (math.prod(in_shape) + math.prod(out_shape))


def cp_matmul(x: torch.Tensor, factors: Sequence[torch.Tensor], d: int) -> torch.Tensor:
    """x (B, n) -> x W^T for the CP W = KR(out factors) KR(in factors)^T, as two GEMMs.

    Any order of contracting x with the CP factors costs at least 2 n R per token in its first step;
    going through the (n x R) and (m x R) Khatri-Rao products makes both steps plain GEMMs, where a
    mode-by-mode contraction would stream (B x n/i_k x R) intermediates through memory-bound kernels.
    """
    return (x @ _khatri_rao(factors[d:])) @ _khatri_rao(factors[:d]).T


def _tt_step_flops(out_shape, in_shape, full_ranks, k: int, right_to_left: bool) -> int:
    core = full_ranks[k] * out_shape[k] * in_shape[k] * full_ranks[k + 1]
    if right_to_left:  # input modes < k still there, output modes > k already produced
        return 2 * core * math.prod(in_shape[:k]) * math.prod(out_shape[k + 1 :])
    return 2 * core * math.prod(out_shape[:k]) * math.prod(in_shape[k + 1 :])


def tt_matmul_flops(out_shape, in_shape, ranks, right_to_left: bool | None = None) -> int:
    """FLOPs per token; right_to_left=None gives the cheaper of the two sweep directions."""
    full = (1, *ranks, 1)
    d = len(out_shape)
    costs = {rtl: sum(_tt_step_flops(out_shape, in_shape, full, k, rtl) for k in range(d)) for rtl in (True, False)}
    return min(costs.values()) if right_to_left is None else costs[right_to_left]


def tt_sweep_right_to_left(out_shape, in_shape, ranks) -> bool:
    return tt_matmul_flops(out_shape, in_shape, ranks, True) <= tt_matmul_flops(out_shape, in_shape, ranks, False)


def tt_matmul(x: torch.Tensor, cores: Sequence[torch.Tensor], right_to_left: bool) -> torch.Tensor:
    """x (B, n) -> x W^T for the TT-matrix W, sweeping the cores in the given direction."""
    B = x.shape[0]
    in_shape = [c.shape[2] for c in cores]
    d = len(cores)
    if right_to_left:
        # t: (B, prod i_<k, i_k, r_k, prod o_>k)
        t = x.reshape(B, math.prod(in_shape[:-1]), in_shape[-1], 1, 1)
        for k in range(d - 1, -1, -1):
            t = torch.einsum("bpirq,soir->bpsoq", t, cores[k])
            if k > 0:
                t = t.reshape(B, math.prod(in_shape[: k - 1]), in_shape[k - 1], cores[k].shape[0], -1)
        return t.reshape(B, -1)
    # t: (B, prod o_<k, r_{k-1}, i_k, prod i_>k)
    t = x.reshape(B, 1, 1, in_shape[0], math.prod(in_shape[1:]))
    for k in range(d):
        t = torch.einsum("bpriq,roiz->bpozq", t, cores[k])
        if k < d - 1:
            t = t.reshape(B, -1, cores[k].shape[3], in_shape[k + 1], math.prod(in_shape[k + 2 :]))
    return t.reshape(B, -1)
