"""Activation-aware Kronecker sums: Kronecker-factored whitening and alternating least squares (ALS).

Find W^ = sum_{r} A_r (x) B_r (A_r: m1 x n1, B_r: m2 x n2) minimising the output error

    f(A, B) = tr((W - W^) C (W - W^)^T),   C = damped input second moment (n x n, n = n1 n2).

Derivation (index W^ rows as (i1, i2) and columns as (j, a), so W^[(i1, i2), (j, a)] = sum_r A_r[i1, j]
B_r[i2, a]; view C as C4[j, a, k, b] and V = W C as V[i1, i2, k, b]). f = tr(W C W^T) - 2 tr(W^ C W^T)
+ tr(W^ C W^^T), and for fixed B both traces are in the rows a_{i1} = (A_r[i1, j])_{r, j} of A:

    tr(W^ C W^T)  = sum_{i1} a_{i1} . rhs_{i1},   rhs[i1, (s, k)] = sum_{i2, b} B_s[i2, b] V[i1, i2, k, b]
    tr(W^ C W^^T) = sum_{i1} a_{i1}^T G a_{i1},   G[(r, j), (s, k)] = sum_{a, b} (B_r^T B_s)[a, b] C4[j, a, k, b]

so f is a convex quadratic in A whose minimiser solves G a_{i1} = rhs_{i1} for every row: one shared
(r n1) x (r n1) SPD system (SPD when C is and the B_r are linearly independent), solved by Cholesky.
The B-step is the mirror image: H[(r, a), (s, b)] = sum_{j, k} (A_r^T A_s)[j, k] C4[j, a, k, b] and
rhs[i2, (s, b)] = sum_{i1, k} A_s[i1, k] V[i1, i2, k, b]. Each step solves its block exactly, so f never
increases from sweep to sweep (up to rounding).

Start (Kronecker-factored whitening): fit C ~ C1 (x) C2 (nearest Kronecker product), C_k = L_k L_k^T
(Cholesky); because (A (x) B)(L1 (x) L2) = (A L1) (x) (B L2) and C1 (x) C2 = (L1 (x) L2)(L1 (x) L2)^T,
tr(D (C1 (x) C2) D^T) = ||D (L1 (x) L2)||^2, so the NKP of W (L1 (x) L2) gives the exact optimum when
C = C1 (x) C2, and a start point otherwise: A = A~ L1^-1, B = B~ L2^-1. Any square root of C1 (x) C2 gives
the same minimiser; the triangular one costs a Cholesky per factor instead of an eigensolve and two products.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from kroncompress.errors import DataError
from kroncompress.linalg.kronecker import kron_sum, nearest_kronecker
from kroncompress.linalg.whitening import cholesky_factor, output_error

Shape = tuple[int, int]


@dataclass
class ALSResult:
    """Factors A (r, m1, n1) and B (r, m2, n2) in W's dtype; `history`: the relative output error
    sqrt(f / tr(W C W^T)) of the start (index 0) and after each sweep; `sweeps` run; `converged`: the
    last sweep improved the error by less than `tol` (relative)."""

    a: torch.Tensor
    b: torch.Tensor
    history: list[float] = field(default_factory=list)
    sweeps: int = 0
    converged: bool = False


@dataclass
class KroneckerWhitening:
    """C ~ C1 (x) C2 with lower Cholesky factors C_k = L_k L_k^T; `misfit` = ||C - C1 (x) C2|| / ||C||."""

    l1: torch.Tensor
    l2: torch.Tensor
    misfit: float


def _check(W: torch.Tensor, C: torch.Tensor, a_shape: Shape, b_shape: Shape) -> None:
    m, n = W.shape
    (m1, n1), (m2, n2) = a_shape, b_shape
    if m1 * m2 != m or n1 * n2 != n:
        raise DataError(f"kronecker ALS: A {tuple(a_shape)} (x) B {tuple(b_shape)} does not tile a {m} x {n} weight")
    if tuple(C.shape) != (n, n):
        raise DataError(f"kronecker ALS: C must be {n} x {n} (the input size of W), got {tuple(C.shape)}")


def kronecker_whitening(C: torch.Tensor, n1: int, n2: int) -> KroneckerWhitening:
    """Fit the SPD matrix C (n1 n2 x n1 n2) by C1 (x) C2 (n1 x n1, n2 x n2) and return their Cholesky factors.

    The nearest Kronecker product of an SPD matrix has definite factors up to a common sign, which is
    fixed so both are positive; a factor that is not numerically definite gets the jitter of
    `cholesky_factor`, so L1 and L2 are invertible.
    """
    C = C.to(torch.float64)
    C1, C2, residual = nearest_kronecker(C, (n1, n1), (n2, n2), rank=1, return_residual=True)
    if C1.trace() < 0:
        C1, C2 = -C1, -C2
    l1, l2 = (cholesky_factor((M + M.T) / 2) for M in (C1, C2))
    return KroneckerWhitening(l1, l2, residual / max(C.norm().item(), 1e-300))


def _apply_right(W: torch.Tensor, S1: torch.Tensor, S2: torch.Tensor) -> torch.Tensor:
    """W (S1 (x) S2) without forming the Kronecker product (any n1 x n1 S1 and n2 x n2 S2)."""
    m = W.shape[0]
    n1, n2 = S1.shape[0], S2.shape[0]
    return torch.einsum("xkb,kj,ba->xja", W.reshape(m, n1, n2), S1, S2).reshape(m, n1 * n2)


def whitened_nkp(W: torch.Tensor, C: torch.Tensor, a_shape: Shape, b_shape: Shape, rank: int = 1,
                 whitening: KroneckerWhitening | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The Kronecker-factored whitening fit: (A (r, m1, n1), B (r, m2, n2), proxy error) in float64.

    The proxy error is ||(W - W^)(L1 (x) L2)|| / ||W (L1 (x) L2)||: the relative output error if C were
    exactly C1 (x) C2 (the cheap criterion of the shape search).
    """
    _check(W, C, a_shape, b_shape)
    w = whitening or kronecker_whitening(C, a_shape[1], b_shape[1])
    WL = _apply_right(W.to(torch.float64), w.l1, w.l2)
    A, B, residual = nearest_kronecker(WL, a_shape, b_shape, rank=rank, return_residual=True)
    if rank == 1:
        A, B = A.unsqueeze(0), B.unsqueeze(0)
    proxy = residual / max(WL.norm().item(), 1e-300)
    unwhiten = torch.linalg.solve_triangular  # X L = Y  ->  X = Y L^-1, batched over the terms
    return unwhiten(w.l1, A, upper=False, left=False), unwhiten(w.l2, B, upper=False, left=False), proxy


def _solve_spd(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """G X = rhs for a symmetric positive (semi)definite G by Cholesky, with jitter if it is singular."""
    G = (G + G.T) / 2
    L, info = torch.linalg.cholesky_ex(G)
    scale = max(G.diagonal().abs().mean().item(), 1e-300)
    step = 0
    while int(info) != 0:
        if step > 10:
            raise DataError("kronecker ALS: the normal equations are singular (linearly dependent factors); "
                             "lower the rank or raise the damping")
        L, info = torch.linalg.cholesky_ex(G + scale * 10.0 ** (step - 14) * torch.eye(len(G), dtype=G.dtype, device=G.device))
        step += 1
    return torch.cholesky_solve(rhs, L)


def _symmetric_system(P: torch.Tensor, view: torch.Tensor, k: int) -> torch.Tensor:
    """The (r k x r k) normal matrix whose (r, s) block is P[r, s] @ view reshaped k x k. It is symmetric
    (block (s, r) is block (r, s) transposed, C being symmetric), so only the r (r + 1) / 2 blocks with
    r <= s are multiplied: the r^2 n^2 product that dominates a sweep with many terms, halved."""
    r = P.shape[0]
    rows, cols = torch.triu_indices(r, r, device=P.device)
    blocks = (P[rows, cols] @ view).reshape(-1, k, k)
    G = P.new_empty(r, r, k, k)
    G[rows, cols] = blocks
    G[cols, rows] = blocks.transpose(1, 2)
    return G.permute(0, 2, 1, 3).reshape(r * k, r * k)


def _a_system(B: torch.Tensor, V4: torch.Tensor, Ca: torch.Tensor):
    """(G, rhs) of the A-step: G (r n1 x r n1), rhs (r n1 x m1); Ca = C4 as [(a, b), (j, k)] (n2^2 x n1^2)."""
    r, m2, n2 = B.shape
    m1, _, n1, _ = V4.shape
    G = _symmetric_system(torch.einsum("ria,sib->rsab", B, B).reshape(r, r, n2 * n2), Ca, n1)
    rhs = torch.einsum("sib,xikb->xsk", B, V4).reshape(m1, r * n1)
    return G, rhs.T


def _b_system(A: torch.Tensor, V4: torch.Tensor, Cb: torch.Tensor):
    """(H, rhs) of the B-step: H (r n2 x r n2), rhs (r n2 x m2); Cb = C4 as [(j, k), (a, b)] (n1^2 x n2^2)."""
    r, m1, n1 = A.shape
    _, m2, _, n2 = V4.shape
    H = _symmetric_system(torch.einsum("rxj,sxk->rsjk", A, A).reshape(r, r, n1 * n1), Cb, n2)
    rhs = torch.einsum("sxk,xikb->isb", A, V4).reshape(m2, r * n2)
    return H, rhs.T


def _quadratic_error(total: float, system: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor) -> float:
    """f = tr(W C W^T) - 2 tr(W^ C W^T) + tr(W^ C W^^T) from a step's system: the two traces are x . rhs and
    x . (system x) for the stacked factor x (r k x rows). Exact up to rounding of order eps tr(W C W^T), so the
    relative output error it gives is good to about eps / (2 oerr); the m n^2 product D C is never formed."""
    return max(total - 2 * float((x * rhs).sum()) + float((x * (system @ x)).sum()), 0.0)


def _a_step(B: torch.Tensor, V4: torch.Tensor, C4: torch.Tensor) -> torch.Tensor:
    n1, n2 = C4.shape[0], C4.shape[1]
    G, rhs = _a_system(B, V4, C4.permute(1, 3, 0, 2).reshape(n2 * n2, n1 * n1))
    return _solve_spd(G, rhs).reshape(B.shape[0], n1, -1).permute(0, 2, 1)


def _b_step(A: torch.Tensor, V4: torch.Tensor, C4: torch.Tensor) -> torch.Tensor:
    n1, n2 = C4.shape[0], C4.shape[1]
    H, rhs = _b_system(A, V4, C4.permute(0, 2, 1, 3).reshape(n1 * n1, n2 * n2))
    return _solve_spd(H, rhs).reshape(A.shape[0], n2, -1).permute(0, 2, 1)


def balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale A_r by c and B_r by 1/c so ||A_r|| = ||B_r|| (W^ unchanged; keeps the systems well scaled)."""
    a_norm = A.flatten(1).norm(dim=1).clamp_min(1e-300)
    b_norm = B.flatten(1).norm(dim=1).clamp_min(1e-300)
    c = (b_norm / a_norm).sqrt()[:, None, None]
    return A * c, B / c


def content_key(t: torch.Tensor) -> tuple:
    """A key identifying a tensor by its content (shape, dtype and a hash of its bytes): what lets a
    strategy find what it computed for the same weight or statistics in an earlier call (plan, then
    decompose; q, k and v reading one input), although each call receives a new tensor object."""
    data = t.detach().contiguous().cpu()
    raw = (data if data.dtype != torch.bool else data.to(torch.uint8)).reshape(-1).view(torch.uint8)
    return tuple(t.shape), str(t.dtype), hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


class MomentCache:
    """One input second moment C (float64) and what is derived from it, computed once per split and shared by
    every weight that reads this input (q/k/v, gate/up) and every candidate shape: the Kronecker-factored
    whitening per n1 (`whitening`), and C4 = C viewed as n1 x n2 x n1 x n2, permuted for the A-step
    (`a_view`, [(a, b), (j, k)]; its transpose is the B-step's), the last `keep_views` splits (n^2 each)."""

    def __init__(self, C: torch.Tensor, keep_views: int = 4):
        if C.dim() != 2 or C.shape[0] != C.shape[1]:
            raise DataError(f"MomentCache: C must be a square matrix, got shape {tuple(C.shape)}")
        self.C = C.to(torch.float64)
        self.keep_views = keep_views
        self._whitenings: dict[int, KroneckerWhitening] = {}
        self._views: dict[int, torch.Tensor] = {}

    @property
    def n(self) -> int:
        return self.C.shape[0]

    def whitening(self, n1: int, n2: int) -> KroneckerWhitening:
        if n1 not in self._whitenings:
            self._whitenings[n1] = kronecker_whitening(self.C, n1, n2)
        return self._whitenings[n1]

    def a_view(self, n1: int, n2: int) -> torch.Tensor:
        view = self._views.pop(n1, None)
        if view is None:
            view = self.C.reshape(n1, n2, n1, n2).permute(1, 3, 0, 2).reshape(n2 * n2, n1 * n1)
        self._views[n1] = view  # most recently used last
        while len(self._views) > self.keep_views:
            self._views.pop(next(iter(self._views)))
        return view


class KroneckerProblem:
    """min over Kronecker sums of tr((W - W^) C (W - W^)^T) for one weight: W and C in float64 on W's device,
    V = W C and tr(W C W^T) (computed once, on first use), and the MomentCache of C (shared by the weights
    that read the same input). Every candidate shape and every ALS run on this W reuses them."""

    def __init__(self, W: torch.Tensor, C: "torch.Tensor | MomentCache"):
        if W.dim() != 2:
            raise DataError(f"kronecker ALS: W must be 2-D, got shape {tuple(W.shape)}")
        self.W = W.to(torch.float64)
        moments = C if isinstance(C, MomentCache) else MomentCache(C.to(device=W.device))
        if moments.C.device != self.W.device:
            moments = MomentCache(moments.C.to(self.W.device))
        self.moments = moments
        self._V: torch.Tensor | None = None
        self._total: float | None = None

    @property
    def C(self) -> torch.Tensor:
        return self.moments.C

    @property
    def V(self) -> torch.Tensor:
        if self._V is None:
            self._V = self.W @ self.C
        return self._V

    @property
    def total(self) -> float:
        """tr(W C W^T), the squared output norm the relative error is measured against."""
        if self._total is None:
            self._total = float((self.W * self.V).sum())
        return self._total

    def relative(self, f: float) -> float:
        total = self.total
        return (f / total) ** 0.5 if total > 0 else (0.0 if f == 0 else float("inf"))

    @classmethod
    def with_targets(cls, W: torch.Tensor, C: "torch.Tensor | MomentCache", V: torch.Tensor, total: float) -> "KroneckerProblem":
        """The problem min tr(W^ C W^^T) - 2 tr(W^ V^T) + total, for a V other than W C: the refit against the
        teacher's outputs on the student's inputs (`kroncompress.linalg.refit`: C = Css, V = W Cts,
        total = tr(W Ctt W^T))."""
        problem = cls(W, C)
        if tuple(V.shape) != tuple(problem.W.shape):
            raise DataError(f"KroneckerProblem: V must have W's shape {tuple(problem.W.shape)}, got {tuple(V.shape)}")
        problem._V, problem._total = V.to(device=problem.W.device, dtype=torch.float64), float(total)
        return problem

    def a_step(self, B: torch.Tensor, n1: int, A: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float | None]:
        """The exact A given B (r, m2, n2): (A (r, m1, n1), relative error after, relative error of `A` before)."""
        r, m2, n2 = B.shape
        m1 = self.W.shape[0] // m2
        G, rhs = _a_system(B, self.V.reshape(m1, m2, n1, n2), self.moments.a_view(n1, n2))
        before = None if A is None else self.relative(
            _quadratic_error(self.total, G, rhs, A.permute(0, 2, 1).reshape(r * n1, m1)))
        x = _solve_spd(G, rhs)
        return x.reshape(r, n1, m1).permute(0, 2, 1), self.relative(_quadratic_error(self.total, G, rhs, x)), before

    def b_step(self, A: torch.Tensor, n2: int) -> tuple[torch.Tensor, float]:
        """The exact B given A (r, m1, n1): (B (r, m2, n2), relative error after)."""
        r, m1, n1 = A.shape
        m2 = self.W.shape[0] // m1
        H, rhs = _b_system(A, self.V.reshape(m1, m2, n1, n2), self.moments.a_view(n1, n2).T)
        x = _solve_spd(H, rhs)
        return x.reshape(r, n2, m2).permute(0, 2, 1), self.relative(_quadratic_error(self.total, H, rhs, x))


def kronecker_als(W: torch.Tensor, C: "torch.Tensor | MomentCache", a_shape: Shape, b_shape: Shape, rank: int = 1, *,
                  start: "str | tuple[torch.Tensor, torch.Tensor] | ALSResult" = "whitened", max_sweeps: int = 6,
                  tol: float = 1e-4, problem: KroneckerProblem | None = None) -> ALSResult:
    """Kronecker sum of `rank` terms minimising tr((W - W^) C (W - W^)^T) by ALS (see the module docs).

    W: m x n weight (out x in); C: its n x n input second moment, already damped (see
    `kroncompress.linalg.whitening.damp`), or a MomentCache of it. `start`: "whitened" (Kronecker-factored
    whitening), "nkp" (weight-only nearest Kronecker product), a pair (A, B) of stacked factors, or an
    earlier ALSResult of this problem, which is resumed: its sweeps and history count, so resuming a
    2-sweep run up to max_sweeps=6 gives the 6-sweep run. Stops after `max_sweeps` sweeps in all (one
    A-step and one B-step each) or when a sweep lowers the relative output error by less than `tol`
    (relative); max_sweeps=0 returns the start. `problem`: a KroneckerProblem of this W and C to reuse
    (V = W C, the whitening, C's permuted views). Runs in float64 on W's device.
    """
    if W.dim() != 2:
        raise DataError(f"kronecker_als: W must be 2-D, got shape {tuple(W.shape)}")
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    _check(W, C.C if isinstance(C, MomentCache) else C, a_shape, b_shape)
    if max_sweeps < 0:
        raise DataError(f"kronecker_als: max_sweeps must be >= 0, got {max_sweeps}")
    problem = problem or KroneckerProblem(W, C)
    W64, C64 = problem.W, problem.C
    (m1, n1), (m2, n2) = a_shape, b_shape
    history: list[float] = []
    done = 0
    if isinstance(start, ALSResult):
        if start.converged or start.sweeps >= max_sweeps:
            return start
        A, B = (t.to(device=W.device, dtype=torch.float64) for t in (start.a, start.b))
        history, done = list(start.history), start.sweeps
    elif isinstance(start, str):
        if start == "whitened":
            A, B, _ = whitened_nkp(W64, C64, a_shape, b_shape, rank, whitening=problem.moments.whitening(n1, n2))
        elif start == "nkp":
            A, B = nearest_kronecker(W64, a_shape, b_shape, rank=rank)
            if rank == 1:
                A, B = A.unsqueeze(0), B.unsqueeze(0)
        else:
            raise DataError(f"kronecker_als: start must be 'whitened', 'nkp', a pair (A, B) or an ALSResult, got {start!r}")
    else:
        A, B = (t.to(device=W.device, dtype=torch.float64) for t in start)
    if tuple(A.shape) != (rank, *a_shape) or tuple(B.shape) != (rank, *b_shape):
        raise DataError(f"kronecker_als: start factors must be {(rank, *a_shape)} and {(rank, *b_shape)}, "
                         f"got {tuple(A.shape)} and {tuple(B.shape)}")
    if max_sweeps == done:
        history = history or [output_error(W64, kron_sum(A, B), C64)]
        return ALSResult(A.to(W.dtype), B.to(W.dtype), history, done, False)
    V4 = problem.V.reshape(m1, m2, n1, n2)
    Ca = problem.moments.a_view(n1, n2)
    A, B = balance(A, B)
    converged, sweeps = False, done
    for sweeps in range(done + 1, max_sweeps + 1):
        G, rhs = _a_system(B, V4, Ca)
        if not history:  # the start's error, from the first A-step's system
            history.append(problem.relative(_quadratic_error(problem.total, G, rhs, A.permute(0, 2, 1).reshape(rank * n1, m1))))
        A = _solve_spd(G, rhs).reshape(rank, n1, m1).permute(0, 2, 1)
        H, rhs = _b_system(A, V4, Ca.T)
        x = _solve_spd(H, rhs)
        B = x.reshape(rank, n2, m2).permute(0, 2, 1)
        history.append(problem.relative(_quadratic_error(problem.total, H, rhs, x)))
        A, B = balance(A, B)
        if history[-2] - history[-1] <= tol * history[-2]:
            converged = True
            break
    return ALSResult(A.to(W.dtype), B.to(W.dtype), history, sweeps, converged)
