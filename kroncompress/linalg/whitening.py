"""Input second moments, Cholesky whitening and the whitened truncated SVD (SVD-LLM).

A layer y = W x is judged by its output error on real inputs, not by its weight error:

    E(W^) = sum over inputs x of ||(W - W^) x||^2 = tr((W - W^) C (W - W^)^T),   C = sum x x^T.

With the damped C_d = C + damping * mean(diag C) I = L L^T (Cholesky), E = ||(W - W^) L||_F^2, so the
best rank-k W^ is W^ = SVD_k(W L) L^-1 (L is invertible, so W^ -> W^ L is a rank-preserving bijection and
Eckart-Young applies to W L). All of this runs in float64.
"""

from __future__ import annotations

import torch

from kroncompress.errors import DataError
from kroncompress.linalg.svd import lapack_threads

DEFAULT_DAMPING = 0.01


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """C = sum over rows of x x^T (n x n, float64) for inputs x of shape (..., n)."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return rows.T @ rows


def damp(C: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """C + damping * mean(diag C) I in float64 (symmetrised); an all-zero C becomes damping * I."""
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise DataError(f"damp: C must be a square matrix, got shape {tuple(C.shape)}")
    if damping < 0:
        raise DataError(f"damp: damping must be >= 0, got {damping}; 0.01 is the usual choice")
    C = C.to(torch.float64)
    C = (C + C.T) / 2
    scale = C.diagonal().mean().item()
    C.diagonal().add_(damping * (scale if scale > 0 else 1.0))
    return C


def cholesky_factor(C: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Lower-triangular L (float64) with C ~ L L^T; adds growing jitter if C is not numerically SPD."""
    C = C.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) == 0:
        return L
    scale = max(C.diagonal().abs().mean().item(), 1e-300)
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    for step in range(max_tries):
        L, info = torch.linalg.cholesky_ex(C + scale * 10.0 ** (step - 12) * eye)
        if int(info) == 0:
            return L
    raise DataError("cholesky_factor: the second-moment matrix is not positive definite even with jitter; "
                     "raise the damping (e.g. 0.01) or collect more calibration tokens")


def output_error(W: torch.Tensor, W_hat: torch.Tensor, C: torch.Tensor, relative: bool = True) -> float:
    """sqrt(tr((W - W^) C (W - W^)^T)), divided by sqrt(tr(W C W^T)) when relative (the oerr of dataaware.md)."""
    W64, C64 = W.to(torch.float64), C.to(device=W.device, dtype=torch.float64)
    D = W64 - W_hat.to(device=W.device, dtype=torch.float64)
    error = (D * (D @ C64)).sum().clamp_min(0).sqrt().item()
    if not relative:
        return error
    reference = (W64 * (W64 @ C64)).sum().clamp_min(0).sqrt().item()
    return error / reference if reference > 0 else (0.0 if error == 0 else float("inf"))


def whitened_svd(W: torch.Tensor, C: torch.Tensor, rank: int, damping: float = 0.0):
    """(U, V) with W ~ U @ V minimising tr((W - U V) C_d (W - U V)^T) over rank-`rank` products.

    C: the (n x n) input second moment of the layer (W: m x n); `damping` is added here (use 0 when C is
    already damped). sqrt(sigma) goes on each side, as in `truncated_svd`; U: m x k, V: k x n, in W's dtype.
    """
    if W.dim() != 2:
        raise DataError(f"whitened_svd: W must be 2-D, got shape {tuple(W.shape)}")
    m, n = W.shape
    if tuple(C.shape) != (n, n):
        raise DataError(f"whitened_svd: C must be {n} x {n} (the input size of W), got {tuple(C.shape)}; "
                         "pass the second moment of this layer's inputs")
    if not 1 <= rank <= min(m, n):
        raise DataError(f"whitened_svd: rank={rank} is out of range for a {m} x {n} matrix; use 1..{min(m, n)}")
    C = C.to(device=W.device, dtype=torch.float64)
    L = cholesky_factor(damp(C, damping) if damping else C)
    WL = W.to(torch.float64) @ L
    with lapack_threads(WL):
        U, S, Vh = torch.linalg.svd(WL, full_matrices=False)
    root = S[:rank].sqrt()
    left = U[:, :rank] * root
    # V = diag(sqrt s) Vh_k L^-1: solve X L = diag(sqrt s) Vh_k for X.
    right = torch.linalg.solve_triangular(L, root[:, None] * Vh[:rank], upper=False, left=False)
    return left.to(W.dtype), right.contiguous().to(W.dtype)
