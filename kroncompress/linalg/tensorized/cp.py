"""CP format: the tensorized weight as sum_{c<R} of outer products of the columns of U_k (dim_k x R).

Parameter count, the decomposition (tensorly's ALS), the reconstruction of W and the forward product
(two GEMMs through the Khatri-Rao products of the factors)."""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

from kroncompress.linalg.tensorized.common import cast_like, tensorly_pytorch, work_tensor


def cp_params(out_shape: Sequence[int], in_shape: Sequence[int], rank: int) -> int:
    """rank * (sum of all mode sizes)."""
    return rank * (sum(out_shape) + sum(in_shape))


def _gram_svd(matrix, n_eigenvecs=None, **_):
    """tensorly-compatible truncated SVD (U, S, Vh) through the Gram matrix of the short side.

    Tucker and CP unfoldings are short and very wide (24 x 98304 for a 768 x 3072 weight); LAPACK's SVD
    takes about a second each there, the Gram eigensolve milliseconds."""
    from kroncompress.linalg.svd import top_singular_triplets

    k = min(matrix.shape) if n_eigenvecs is None else min(n_eigenvecs, *matrix.shape)
    U, S, V = top_singular_triplets(matrix, k)
    return U, S, V.T


def cp_decompose(weight: torch.Tensor, out_shape, in_shape, rank: int, n_iter_max: int = 25, tol: float = 1e-8,
                 random_state: int = 0) -> list[torch.Tensor]:
    """[U_k (dim_k x rank)] of the tensorized weight by tensorly's ALS (SVD init, random columns beyond a
    mode's size); the CP weights are folded into the first factor."""
    from tensorly.decomposition import parafac

    from kroncompress.linalg.svd import lapack_threads

    T = work_tensor(weight, out_shape, in_shape)
    with tensorly_pytorch(), warnings.catch_warnings(), lapack_threads(T):
        warnings.filterwarnings("ignore", message=".*n_eigenvecs.*")  # rank > mode size: expected, padded randomly
        weights, factors = parafac(T, rank, n_iter_max=n_iter_max, init="svd", tol=tol, random_state=random_state,
                                   normalize_factors=False, svd=_gram_svd)
    factors = list(factors)
    factors[0] = factors[0] * weights
    return cast_like(factors, weight)


# -- reconstruction (export and tests only) ----------------------------------------------------------
def _khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


def cp_to_matrix(factors: Sequence[torch.Tensor], d: int) -> torch.Tensor:
    """W = KR(out factors) KR(in factors)^T, never forming the (m n x R) Khatri-Rao product."""
    return _khatri_rao(factors[:d]) @ _khatri_rao(factors[d:]).T


# -- forward product ---------------------------------------------------------------------------------
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
