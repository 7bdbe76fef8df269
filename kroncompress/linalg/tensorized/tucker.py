"""Tucker format: the tensorized weight (o_1..o_d, i_1..i_d) = core (r_1..r_2d) x_k U_k, U_k (dim_k x r_k).

Parameter counts and rank limits, the decomposition (HOSVD start, HOOI sweeps on Gram eigensolves), the
reconstruction of W, and the forward product mode by mode in the cheaper order."""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from kroncompress.linalg.tensorized.common import cast_like, work_tensor


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


def tucker_max_ranks(out_shape: Sequence[int], in_shape: Sequence[int]) -> list[int]:
    """A mode's Tucker rank cannot exceed its size."""
    return [*out_shape, *in_shape]


def tucker_ranks_problem(ranks: Sequence[int]) -> str | None:
    """Why these Tucker ranks cannot come out of HOOI (a mode rank above the product of the others), or None."""
    for k, r in enumerate(ranks):
        others = math.prod(ranks) // r
        if r > others:
            return f"rank {r} of mode {k} exceeds the product of the other ranks ({others})"
    return None


# -- decomposition -----------------------------------------------------------------------------------
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
    T = work_tensor(weight, out_shape, in_shape)
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
    return cast_like([core], weight)[0], cast_like(factors, weight)


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
    from kroncompress.errors import DataError
    from kroncompress.linalg.svd import GRAM_LIMIT, non_finite_problem, top_singular_triplets

    rows, cols = T.shape[k], T.numel() // max(T.shape[k], 1)
    if rows > min(cols, GRAM_LIMIT):  # not short and wide (e.g. order 1): the general solver
        return top_singular_triplets(T.movedim(k, 0).reshape(rows, cols), rank, name="tucker_decompose")[0]
    G = _mode_gram(T, k)
    if not bool(torch.isfinite(G).all()):
        raise DataError(non_finite_problem(T.movedim(k, 0).reshape(rows, cols)), where="tucker_decompose")
    _, vectors = torch.linalg.eigh(G)  # ascending
    return vectors.flip(1)[:, :rank].to(T.dtype)


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


# -- forward product ---------------------------------------------------------------------------------
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
