"""Data-aware Kronecker embeddings: frequency-weighted nearest Kronecker product, with a tied-head term.

An embedding table E (V x d, V = v1 v2, d = d1 d2) is read one row per token, so on real text the output
error of E^ = sum_r A_r (x) B_r (A_r: v1 x d1, B_r: v2 x d2) is the frequency-weighted row error
sum_t f_t ||E_t - E^_t||^2 (f: token frequencies). A tied LM head (logits = h E^T) reuses the factors;
its output error over final hidden states h is tr((E - E^) C (E - E^)^T), C = the head input's second
moment. The objective minimised here puts both on the scale of their own output norms:

    F(A, B) = sum_t w_t ||D_t||^2 + tr(D Ch D^T),   D = E - E^,
    w_t = f'_t / sum_t f'_t ||E_t||^2,   Ch = C / tr(E C E^T),   f'_t = f_t + floor / V,

i.e. the squared relative embedding error plus the squared relative head error, equally weighted (each is
the layer's own relative output error, the same scale the linear layers' ALS reports). f = counts / total;
the floor (default 0.01 / V, i.e. 1% of the mean frequency, like the 0.01 damping of linear statistics)
keeps tokens unseen in calibration from having zero weight: without a head term they would be
undetermined, with it they are still fitted mostly by the head term.

ALS (rows of E^ indexed (i1, i2), columns (j1, j2); E^[(i1, i2), (j1, j2)] = sum_r A_r[i1, j1] B_r[i2, j2]):
each row t has the metric M_t = w_t I + Ch, and for fixed B the objective splits over i1 into
    (K(i1) (x) I_d1 + G) a_i1 = rhs_i1,   K(i1)[r, s] = sum_i2 w[i1, i2] <B_r[i2], B_s[i2]>,
    G[(r, j1), (s, k1)] = sum_{j2, k2} B_r[:, j2] . B_s[:, k2] Ch4[j1, j2, k1, k2]  (as in linalg.als),
    rhs[i1, (r, j1)] = sum_{i2, j2} B_r[i2, j2] F4[i1, i2, j1, j2],   F = diag(w) E + E Ch,
one small SPD system per row of A ((r x r) without a head term; shifted systems sharing G's eigenvectors
when r = 1). The B-step is the mirror image. Each step is exact, so F never increases over sweeps.

Closed form: when w = w1 (x) w2 (and no head term), F = ||(W1^1/2 (x) W2^1/2)(E - E^)||^2 and
(W1^1/2 (x) W2^1/2)(A (x) B) = (W1^1/2 A) (x) (W2^1/2 B), so the plain NKP of the row-scaled table,
unscaled, is the optimum. With v2 = 1 (KnGPT2's (1 x 2) B factor) every w has this form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kroncompress.errors import DataError
from kroncompress.linalg.als import ALSResult, balance
from kroncompress.linalg.kronecker import kron_sum, nearest_kronecker
from kroncompress.linalg.svd import lapack_threads

Shape = tuple[int, int]
DEFAULT_FLOOR = 0.01  # times the mean frequency 1 / V
_ROWS = 8192  # rows of E per chunk in the objective
_SYSTEM_ELEMENTS = 1 << 24  # float64 entries of the batched (r d) x (r d) systems built at once


@dataclass
class TokenStatistics:
    """What calibration gives an embedding: token `counts` (V,) and, for a tied head, the head input's
    damped second moment `head` (d x d), or None."""

    counts: torch.Tensor
    head: torch.Tensor | None = None


def embedding_weights(E: torch.Tensor, counts: torch.Tensor, head: torch.Tensor | None = None,
                      floor: float = DEFAULT_FLOOR) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(w (V,), Ch (d x d) or None) of the normalised objective (see the module docs), in float64."""
    V, d = E.shape
    if counts.dim() != 1 or counts.numel() != V:
        raise DataError(f"weighted kronecker: counts must have one entry per row of the {V} x {d} table, "
                         f"got shape {tuple(counts.shape)}")
    if floor < 0 or not torch.isfinite(counts).all() or (counts < 0).any():
        raise DataError("weighted kronecker: counts must be finite and >= 0, and floor >= 0")
    E64 = E.to(torch.float64)
    counts = counts.to(device=E.device, dtype=torch.float64)
    total = counts.sum().item()
    f = counts / total if total > 0 else torch.full_like(counts, 1.0 / V)
    f = f + floor / V
    w = f / max((f * E64.pow(2).sum(1)).sum().item(), 1e-300)
    if head is None:
        return w, None
    if tuple(head.shape) != (d, d):
        raise DataError(f"weighted kronecker: the head's second moment must be {d} x {d}, got {tuple(head.shape)}")
    C = head.to(device=E.device, dtype=torch.float64)
    reference = sum((E64[s:s + _ROWS] @ C * E64[s:s + _ROWS]).sum().item() for s in range(0, V, _ROWS))
    return w, C / max(reference, 1e-300)


def weighted_objective(E: torch.Tensor, E_hat: torch.Tensor, w: torch.Tensor, Ch: torch.Tensor | None = None) -> float:
    """sum_t w_t ||E_t - E^_t||^2 + tr((E - E^) Ch (E - E^)^T), streamed over row chunks, float64."""
    total = 0.0
    for s in range(0, E.shape[0], _ROWS):
        D = E[s:s + _ROWS].to(torch.float64) - E_hat[s:s + _ROWS].to(device=E.device, dtype=torch.float64)
        total += (w[s:s + _ROWS] * D.pow(2).sum(1)).sum().item()
        if Ch is not None:
            total += (D @ Ch * D).sum().item()
    return max(total, 0.0)


def weighted_row_error(E: torch.Tensor, E_hat: torch.Tensor, counts: torch.Tensor) -> float:
    """sqrt(sum_t f_t ||E_t - E^_t||^2 / sum_t f_t ||E_t||^2): the embedding's relative output error on the
    calibration text (no floor: exactly what the counted tokens see)."""
    f = counts.to(device=E.device, dtype=torch.float64)
    E64, D = E.to(torch.float64), E.to(torch.float64) - E_hat.to(device=E.device, dtype=torch.float64)
    reference = (f * E64.pow(2).sum(1)).sum().item()
    error = (f * D.pow(2).sum(1)).sum().item()
    return (error / reference) ** 0.5 if reference > 0 else (0.0 if error == 0 else float("inf"))


def _stacked(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (A.unsqueeze(0), B.unsqueeze(0)) if A.dim() == 2 else (A, B)


def kronecker_weighted_nkp(E: torch.Tensor, w: torch.Tensor, a_shape: Shape, b_shape: Shape, rank: int = 1):
    """The closed form for Kronecker-structured row weights: fit w (as v1 x v2) by w1 (x) w2 (its top
    singular pair, non-negative by Perron-Frobenius), NKP the row-scaled table, unscale. Exact when
    w = w1 (x) w2; a start point otherwise. Returns stacked (A, B) in float64."""
    (v1, _), (v2, _) = a_shape, b_shape
    W2 = w.to(torch.float64).reshape(v1, v2)
    U, S, Vh = torch.linalg.svd(W2, full_matrices=False) if min(v1, v2) > 1 else (None, None, None)
    if U is None:  # one of the factors has a single row: w is already w1 (x) w2
        w1, w2 = (W2[:, 0], torch.ones(1, dtype=W2.dtype, device=W2.device)) if v2 == 1 else (
            torch.ones(1, dtype=W2.dtype, device=W2.device), W2[0])
    else:
        w1, w2 = (S[0].sqrt() * U[:, 0]).abs(), (S[0].sqrt() * Vh[0]).abs()
    w1 = w1.clamp_min(w1.max().item() * 1e-12 + 1e-300).sqrt()
    w2 = w2.clamp_min(w2.max().item() * 1e-12 + 1e-300).sqrt()
    scale = (w1[:, None] * w2[None, :]).reshape(-1, 1)
    A, B = _stacked(*nearest_kronecker(E.to(torch.float64) * scale, a_shape, b_shape, rank=rank))
    return A / w1[None, :, None], B / w2[None, :, None]


def _head_matrix(fixed: torch.Tensor, C4: torch.Tensor) -> torch.Tensor:
    """G[(r, j), (s, k)] = sum_{a, b} (X_r^T X_s)[a, b] C4[j, a, k, b] for the fixed factor X (r, v, e)."""
    r, _, e = fixed.shape
    n = C4.shape[0]
    P = torch.einsum("ria,sib->rsab", fixed, fixed).reshape(r * r, e * e)
    G = (P @ C4.permute(1, 3, 0, 2).reshape(e * e, n * n)).reshape(r, r, n, n)
    return G.permute(0, 2, 1, 3).reshape(r * n, r * n)


def _spd_solve(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Minimum-norm solutions of the batched symmetric PSD systems M x = rhs (M (N, n, n), rhs (N, n, k)).

    Cholesky where it succeeds; a row whose M is singular (its terms collinear on that row, or an all-zero
    weight with no head term) gets the eigen pseudo-inverse with rcond = n eps (of the dtype) times its largest
    eigenvalue: rhs lies in M's range (both come from the same least-squares problem), so that is still an
    exact minimiser and the sweep cannot increase the objective. No LU: batched LU solves on CPU fail with
    "Pivots given to lu_solve" after the thread count was changed (torch 2.x with MKL, as lapack_threads does)
    even for well-conditioned SPD systems, and a relative jitter cannot repair either failure."""
    L, info = torch.linalg.cholesky_ex(M)
    out = torch.cholesky_solve(rhs, L)
    n = M.shape[-1]
    # a factor that "succeeds" on a numerically singular M is no better: check the pivots against n eps
    pivots = L.diagonal(dim1=-2, dim2=-1).pow(2)
    scale = M.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(M.dtype).tiny)
    bad = (info != 0) | ~torch.isfinite(out).flatten(1).all(1) | (pivots.amin(-1) <= n * torch.finfo(M.dtype).eps * scale)
    if bad.any():
        evals, Q = torch.linalg.eigh(M[bad])
        cut = n * torch.finfo(M.dtype).eps * evals.amax(-1, keepdim=True).clamp_min(torch.finfo(M.dtype).tiny)
        inverse = torch.where(evals > cut, 1 / evals.clamp_min(torch.finfo(M.dtype).tiny), torch.zeros_like(evals))
        out[bad] = Q @ (inverse[..., None] * (Q.mT @ rhs[bad]))
    return out


def _solve_rows(K: torch.Tensor, G: torch.Tensor | None, rhs: torch.Tensor) -> torch.Tensor:
    """Solve (K_i (x) I + G) x_i = rhs_i for every row i (minimum norm where singular); K (N, r, r),
    G (r k x r k) or None, rhs (N, r, k)."""
    N, r, k = rhs.shape
    if G is None:
        return _spd_solve(K, rhs)
    with lapack_threads(G):
        evals, Q = torch.linalg.eigh((G + G.T) / 2)
    if r == 1:  # shifted systems: one eigendecomposition serves every row
        den = K[:, 0, 0, None] + evals.clamp_min(0)[None]
        cut = k * torch.finfo(den.dtype).eps * den.amax(-1, keepdim=True)
        y = (rhs[:, 0] @ Q) * torch.where(den > cut, 1 / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
        return (y @ Q.T)[:, None]
    eye = torch.eye(k, dtype=K.dtype, device=K.device)
    out = torch.empty_like(rhs)
    step = max(1, _SYSTEM_ELEMENTS // (r * k) ** 2)
    for s in range(0, N, step):
        M = torch.einsum("nrs,jk->nrjsk", K[s:s + step], eye).reshape(-1, r * k, r * k) + (G + G.T) / 2
        out[s:s + step] = _spd_solve(M, rhs[s:s + step].reshape(-1, r * k, 1)).reshape(-1, r, k)
    return out


def _a_step(B, F4, w2, C4):
    """Exact minimiser over A for fixed B (r, v2, d2); F4 = (diag(w) E + E Ch) as (v1, v2, d1, d2)."""
    r, v2, _ = B.shape
    rhs = torch.tensordot(B, F4, dims=([1, 2], [1, 3])).permute(1, 0, 2)  # (v1, r, d1)
    K = (w2 @ torch.einsum("ria,sia->irs", B, B).reshape(v2, r * r)).reshape(-1, r, r)
    G = None if C4 is None else _head_matrix(B, C4)
    return _solve_rows(K, G, rhs).permute(1, 0, 2)


def _b_step(A, F4, w2, C4):
    """The mirror image: exact minimiser over B for fixed A (r, v1, d1)."""
    r, v1, _ = A.shape
    rhs = torch.tensordot(A, F4, dims=([1, 2], [0, 2])).permute(1, 0, 2)  # (v2, r, d2)
    K = (w2.T @ torch.einsum("rxj,sxj->xrs", A, A).reshape(v1, r * r)).reshape(-1, r, r)
    G = None if C4 is None else _head_matrix(A, C4.permute(1, 0, 3, 2))
    return _solve_rows(K, G, rhs).permute(1, 0, 2)


def weighted_kronecker_als(E: torch.Tensor, stats: TokenStatistics, a_shape: Shape, b_shape: Shape, rank: int = 1, *,
                           start: str | tuple[torch.Tensor, torch.Tensor] = "best", max_sweeps: int = 6,
                           tol: float = 1e-4, floor: float = DEFAULT_FLOOR) -> ALSResult:
    """Kronecker sum of `rank` terms minimising the normalised frequency-weighted (+ tied-head) error.

    E: the V x d embedding table; `stats`: token counts and the tied head's second moment (or None).
    `start`: "nkp" (weight-only), "kron" (the closed form for Kronecker-fitted weights), "best" (the
    lower objective of the two) or a pair (A, B). `history` holds sqrt(F) (see the module docs: the root
    of the sum of the squared relative embedding and head errors) of the start and after each sweep.
    Stops after `max_sweeps` sweeps or when one lowers sqrt(F) by less than `tol` (relative).
    """
    if E.dim() != 2:
        raise DataError(f"weighted_kronecker_als: E must be 2-D (vocab x dim), got shape {tuple(E.shape)}")
    (v1, d1), (v2, d2) = a_shape, b_shape
    if v1 * v2 != E.shape[0] or d1 * d2 != E.shape[1]:
        raise DataError(f"weighted_kronecker_als: A {tuple(a_shape)} (x) B {tuple(b_shape)} does not tile a "
                         f"{E.shape[0]} x {E.shape[1]} table")
    if max_sweeps < 0:
        raise DataError(f"weighted_kronecker_als: max_sweeps must be >= 0, got {max_sweeps}")
    E64 = E.to(torch.float64)
    w, Ch = embedding_weights(E64, stats.counts, stats.head, floor)

    def objective(A, B):
        return weighted_objective(E64, kron_sum(A, B), w, Ch) ** 0.5

    if isinstance(start, str):
        if start not in ("nkp", "kron", "best"):
            raise DataError(f"weighted_kronecker_als: start must be 'nkp', 'kron', 'best' or (A, B), got {start!r}")
        starts = []
        if start in ("nkp", "best"):
            starts.append(_stacked(*nearest_kronecker(E64, a_shape, b_shape, rank=rank)))
        if start in ("kron", "best"):
            starts.append(kronecker_weighted_nkp(E64, w, a_shape, b_shape, rank))
        A, B = min(starts, key=lambda pair: objective(*pair))
    else:
        A, B = (t.to(device=E.device, dtype=torch.float64) for t in start)
        if tuple(A.shape) != (rank, *a_shape) or tuple(B.shape) != (rank, *b_shape):
            raise DataError(f"weighted_kronecker_als: start factors must be {(rank, *a_shape)} and "
                             f"{(rank, *b_shape)}, got {tuple(A.shape)} and {tuple(B.shape)}")
    F4 = (w[:, None] * E64 + (E64 @ Ch if Ch is not None else 0)).reshape(v1, v2, d1, d2)
    w2 = w.reshape(v1, v2)
    C4 = None if Ch is None else Ch.reshape(d1, d2, d1, d2)
    A, B = balance(A, B)
    history = [objective(A, B)]
    converged, sweeps = False, 0
    for sweeps in range(1, max_sweeps + 1):
        A = _a_step(B, F4, w2, C4)
        B = _b_step(A, F4, w2, C4)
        A, B = balance(A, B)
        history.append(objective(A, B))
        if history[-2] - history[-1] <= tol * history[-2]:
            converged = True
            break
    return ALSResult(A.to(E.dtype), B.to(E.dtype), history, sweeps, converged)
