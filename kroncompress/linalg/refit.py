"""Closed-form refits after truncation, against the teacher's outputs on the student's inputs.

A layer W (m x n) of the teacher sees inputs x_t; its compressed replacement W^ sees x_s, the inputs the
student computes with the layers before it already compressed (x_s = x_t when nothing upstream changed).
Over the calibration tokens the error it should minimise is

    E(W^) = sum ||W x_t - W^ x_s||^2 = tr(W Ctt W^T) - 2 tr(W^ Cst W^T) + tr(W^ Css W^^T),

with Css = sum x_s x_s^T (damped), Cst = sum x_s x_t^T = Cts^T and Ctt = sum x_t x_t^T. Everything below
minimises E exactly; when x_s = x_t (Cts = Css) it reduces to the whitened problems of `whitening` and `als`.

- Fixed right factor R (k x n), W^ = U R: E is a convex quadratic in U with minimiser
  U = W Cts R^T (R Css R^T)^-1 (SVD-LLM's update of U given V).
- Free rank-k W^: with Css = L L^T, E = ||W^ L - T||_F^2 + const for T = W Cts L^-T, so the best rank-k W^
  is SVD_k(T) L^-1 (Eckart-Young on T; L is invertible).
- Kronecker sum: E is quadratic in the A factors given the B factors and the other way round: the ALS of
  `als` with V = W Cts in place of W C, started from the truncated factors.
All of it runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kroncompress.errors import DataError
from kroncompress.linalg.svd import lapack_threads
from kroncompress.linalg.whitening import cholesky_factor


@dataclass
class CrossMoments:
    """Css (damped, n x n), Cts = sum x_t x_s^T (n x n) and tr_weight = tr(W Ctt W^T) inputs for one layer.

    `tt` may be None when the student's inputs are the teacher's (then Ctt = Cts = Css, undamped up to the
    damping): use `CrossMoments.parallel(C)`.
    """

    ss: torch.Tensor
    ts: torch.Tensor
    tt: torch.Tensor

    @classmethod
    def parallel(cls, C: torch.Tensor) -> "CrossMoments":
        """The moments of a layer whose student inputs equal the teacher's: Css = Cts = Ctt = C."""
        C = C.to(torch.float64)
        return cls(C, C, C)

    def __post_init__(self):
        shapes = {tuple(t.shape) for t in (self.ss, self.ts, self.tt)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or self.ss.shape[0] != self.ss.shape[1]:
            raise DataError(f"CrossMoments: Css, Cts and Ctt must be square and of one size, got {sorted(shapes)}")
        self.ss, self.ts, self.tt = (t.to(torch.float64) for t in (self.ss, self.ts, self.tt))

    @property
    def n(self) -> int:
        return self.ss.shape[0]

    def to(self, device) -> "CrossMoments":
        return CrossMoments(self.ss.to(device), self.ts.to(device), self.tt.to(device))


def _check(W: torch.Tensor, moments: CrossMoments, name: str) -> None:
    if W.dim() != 2:
        raise DataError(f"{name}: W must be 2-D, got shape {tuple(W.shape)}")
    if W.shape[1] != moments.n:
        raise DataError(f"{name}: the moments are {moments.n} x {moments.n} but W has {W.shape[1]} inputs; "
                         "pass the statistics of this layer's inputs")


def target_energy(W: torch.Tensor, moments: CrossMoments) -> float:
    """tr(W Ctt W^T): the teacher's output energy, what relative errors are measured against."""
    W64 = W.to(torch.float64)
    return float((W64 * (W64 @ moments.tt.to(W.device))).sum())


def cross_output_error(W: torch.Tensor, W_hat: torch.Tensor, moments: CrossMoments, relative: bool = True) -> float:
    """sqrt(E(W^)) (see the module docs), divided by sqrt(tr(W Ctt W^T)) when relative."""
    _check(W, moments, "cross_output_error")
    m = moments.to(W.device)
    W64, H = W.to(torch.float64), W_hat.to(device=W.device, dtype=torch.float64)
    total = target_energy(W64, m)
    value = total - 2 * float((H * (W64 @ m.ts)).sum()) + float((H * (H @ m.ss)).sum())
    error = max(value, 0.0) ** 0.5
    if not relative:
        return error
    return error / total ** 0.5 if total > 0 else (0.0 if error == 0 else float("inf"))


def refit_left(W: torch.Tensor, right: torch.Tensor, moments: CrossMoments) -> torch.Tensor:
    """The U (m x k) minimising E(U R) for a fixed right factor R (k x n): W Cts R^T (R Css R^T)^-1, W's dtype."""
    _check(W, moments, "refit_left")
    if right.dim() != 2 or right.shape[1] != W.shape[1]:
        raise DataError(f"refit_left: the right factor must be k x {W.shape[1]}, got {tuple(right.shape)}")
    m = moments.to(W.device)
    R = right.to(device=W.device, dtype=torch.float64)
    gram = R @ m.ss @ R.T
    rhs = R @ (m.ts.T @ W.to(torch.float64).T)  # (R Cst W^T) = (W Cts R^T)^T, k x m
    L = cholesky_factor(gram)
    return torch.cholesky_solve(rhs, L).T.contiguous().to(W.dtype)


def cross_whitened_spectrum(W: torch.Tensor, moments: CrossMoments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(U, S, Vh, L, constant): T = W Cts L^-T = U diag(S) Vh with Css = L L^T, and constant =
    tr(W Ctt W^T) - ||T||^2 >= 0 (the error no W^ can remove). E at rank k is sum_{j > k} S_j^2 + constant:
    the whole error-versus-rank curve from one SVD."""
    _check(W, moments, "cross_whitened_spectrum")
    m = moments.to(W.device)
    L = cholesky_factor(m.ss)
    # T = W Cts L^-T  <=>  T L^T = W Cts: solve X L^T = Y, i.e. L X^T = Y^T.
    T = torch.linalg.solve_triangular(L, (W.to(torch.float64) @ m.ts).T, upper=False).T
    with lapack_threads(T):
        U, S, Vh = torch.linalg.svd(T, full_matrices=False)
    constant = max(target_energy(W, m) - float((S ** 2).sum()), 0.0)
    return U, S, Vh, L, constant


def cross_whitened_svd(W: torch.Tensor, moments: CrossMoments, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V), W ~ U @ V of rank `rank` minimising E exactly (sqrt(sigma) on each side), in W's dtype."""
    if not 1 <= rank <= min(W.shape):
        raise DataError(f"cross_whitened_svd: rank={rank} is out of range for a {W.shape[0]} x {W.shape[1]} "
                         f"matrix; use 1..{min(W.shape)}")
    U, S, Vh, L, _ = cross_whitened_spectrum(W, moments)
    root = S[:rank].sqrt()
    left = U[:, :rank] * root
    right = torch.linalg.solve_triangular(L, root[:, None] * Vh[:rank], upper=False, left=False)
    return left.to(W.dtype), right.contiguous().to(W.dtype)


def kronecker_refit(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, moments: CrossMoments, *,
                    sweeps: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Refit a Kronecker sum (A: r x m1 x n1, B: r x m2 x n2) against E: the exact A-step given B, then
    `sweeps` full alternating sweeps (B-step, A-step). Returns (A, B, history) with the relative error
    sqrt(E / tr(W Ctt W^T)) before and after each step; E never increases (each step is an exact block
    minimiser). Factors in W's dtype."""
    from kroncompress.linalg.als import KroneckerProblem

    _check(W, moments, "kronecker_refit")
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0]:
        raise DataError(f"kronecker_refit: factors must be stacked (r, m1, n1) and (r, m2, n2), got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    if sweeps < 0:
        raise DataError(f"kronecker_refit: sweeps must be >= 0, got {sweeps}")
    m = moments.to(W.device)
    problem = KroneckerProblem.with_targets(W, m.ss, W.to(torch.float64) @ m.ts, target_energy(W, m))
    n1, n2 = A.shape[2], B.shape[2]
    A64, B64 = (t.to(device=W.device, dtype=torch.float64) for t in (A, B))
    A64, error, before = problem.a_step(B64, n1, A=A64)
    history = [before, error]
    for _ in range(sweeps):
        B64, error = problem.b_step(A64, n2)
        history.append(error)
        A64, error, _ = problem.a_step(B64, n1)
        history.append(error)
    return A64.to(W.dtype), B64.to(W.dtype), history
