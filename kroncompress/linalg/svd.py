"""Top-r singular triplets without a full SVD, and truncated SVD.

The rearranged matrices of a Kronecker fit are usually very tall and thin (a 1 x 2 factor gives two
columns), where a full SVD wastes seconds. When the short side is small we eigensolve its Gram matrix
in float64 (exact to float tolerance for the leading triplets); otherwise we run a randomized
subspace iteration until the leading singular values stop moving.
"""

from __future__ import annotations

import torch

GRAM_LIMIT = 4096  # largest short side for which the Gram eigensolve is used
_CHUNK_ELEMENTS = 1 << 24  # rows are streamed through float64 computations in chunks of about this size
_GRAM_CHUNK_ELEMENTS = 1 << 20  # the Gram's chunks: 8 MiB in float64, cache-sized yet few parallel regions


def _gram(R: torch.Tensor) -> torch.Tensor:
    """R^T R in float64, streamed over row chunks so a huge tall R is never copied whole to float64.

    The chunks are small enough that their float64 copy stays in cache (one reused buffer): for the very
    tall, thin matrices of a (1 x 2)-type fit this is several times faster than big chunks.
    """
    p, q = R.shape
    if R.dtype == torch.float64:
        return R.T @ R
    G = torch.zeros(q, q, dtype=torch.float64, device=R.device)
    # Wide R: chunks of several q rows keep each addmm compute-bound rather than re-writing G per chunk.
    step = max(1, _GRAM_CHUNK_ELEMENTS // max(q, 1), min(4 * q, _CHUNK_ELEMENTS // max(q, 1)))
    # The buffer holds chunk^T (q x rows, rows contiguous): MKL runs G += C C^T far faster than C^T C
    # when q is tiny and the rows many.
    buffer = torch.empty(q, min(step, p), dtype=torch.float64, device=R.device)
    for start in range(0, p, step):
        chunk = R[start : start + step]
        converted = buffer[:, : chunk.shape[0]]
        converted.copy_(chunk.T)
        G.addmm_(converted, converted.T)
    return G


def _triplets_from_gram(R: torch.Tensor, rank: int):
    G = _gram(R)
    evals, evecs = torch.linalg.eigh(G)  # ascending
    evals = evals.flip(0)[:rank].clamp_min(0)
    V = evecs.flip(1)[:, :rank]
    S = evals.sqrt()
    V, S = V.to(R.dtype), S.to(R.dtype)
    # U in R's own precision: V and S are already accurate, and a float64 copy of a huge R costs more
    # than the whole Gram.
    U = R @ (V / torch.where(S > 0, S, torch.ones_like(S)))  # scale the small V, not the tall U
    return U, S, V


def _triplets_randomized(R: torch.Tensor, rank: int, tol: float = 1e-6, max_iter: int = 30):
    """Randomized block power method with a convergence check on the leading singular values."""
    generator = torch.Generator(device=R.device).manual_seed(0)
    q = min(rank + 10, min(R.shape))
    Q = torch.randn(R.shape[1], q, device=R.device, dtype=R.dtype, generator=generator)
    Q, _ = torch.linalg.qr(R @ Q)
    previous = None
    for _ in range(max_iter):
        Z, _ = torch.linalg.qr(R.T @ Q)
        Q, _ = torch.linalg.qr(R @ Z)
        small = Q.T @ R
        Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
        top = S[:rank]
        if previous is not None and torch.allclose(top, previous, rtol=tol, atol=0):
            break
        previous = top
    return (Q @ Us)[:, :rank], S[:rank], Vh[:rank].T


def top_singular_triplets(R: torch.Tensor, rank: int):
    """(U, S, V) with U: p x r, S: r, V: q x r, the leading singular triplets of R (p x q)."""
    p, q = R.shape
    if min(p, q) <= GRAM_LIMIT:
        if q <= p:
            return _triplets_from_gram(R, rank)
        V, S, U = _triplets_from_gram(R.T, rank)
        return U, S, V
    return _triplets_randomized(R, rank)


def truncated_svd(W: torch.Tensor, rank: int):
    """Best rank-`rank` factors (U, V) with W ~ U @ V, sqrt(sigma) on each side; U: m x k, V: k x n."""
    if W.dim() != 2:
        raise ValueError(f"truncated_svd: W must be 2-D, got shape {tuple(W.shape)}")
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"truncated_svd: rank={rank} is out of range for a {m} x {n} matrix; use 1..{min(m, n)}")
    compute_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wc = W.to(compute_dtype)
    if min(m, n) <= GRAM_LIMIT:
        U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].T
    else:
        U, S, V = _triplets_randomized(Wc, rank)
    root = S.sqrt()
    return (U * root).to(W.dtype), (V * root).T.contiguous().to(W.dtype)
