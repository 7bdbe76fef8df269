"""Kronecker factor-shape search: which (m1 x n1) (x) (m2 x n2) split, and how many terms, fit a budget.

Without weights, candidates are ordered by how much of the budget they use (deterministic, so a plan
on the meta device is reproducible). Given W, they are ranked by a pluggable criterion; the default is
the energy the nearest Kronecker sum keeps (top-r squared singular values of R(W) over ||W||^2).
Degenerate shapes A (m x 1) (x) B (1 x n) (and the mirrored (1 x n) (x) (m x 1)) are outer products, so a
sum of them is plain low rank: they are excluded unless allow_degenerate=True (use `svd` for that).

With calibration statistics (`stats`, the layer's damped input second moment C), candidates are ranked by
the output error tr((W - W^) C (W - W^)^T) instead, which is what predicts model quality: first by a cheap
proxy (the Kronecker-factored whitening NKP, exact when C is a Kronecker product), then the `shortlist`
best are refined by a few ALS sweeps and re-ranked by the output error they reach.

ALS cost rule (rank "auto"): a sweep of ALS on a shape with r terms solves systems of size r n1 and r n2
and assembles them from (r n)^2 products, about (r n1)^3 + (r n2)^3 + r^2 n^2 flops (`als_cost`). With
as many terms as the budget allows, Gemma's 640 x 2048 weights at ratio 2 got 123-287 terms and systems of
up to 300k unknowns. A shape is offered only when its sweep costs at most MAX_ALS_COST times a whitened
SVD of the same matrix (m n min(m, n) + n^3, `whitened_svd_cost`) or at most ALS_FLOPS_FREE flops (small
matrices are never limited); if none is left, ValueError says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kroncompress.errors import DataError
from kroncompress.linalg.kronecker import kron_rearrange
from kroncompress.linalg.svd import top_singular_values


ALS_FLOPS_FREE = 10 ** 9  # sweeps cheaper than this (well under a second) are never excluded: small matrices
MAX_ALS_COST = 4  # an ALS sweep of an offered rank-auto shape costs at most this many whitened SVDs


def als_cost(m: int, n: int, a_shape, b_shape, rank: int) -> int:
    """Flops of one ALS sweep, to leading order: the (r n1) and (r n2) systems and their assembly."""
    (_, n1), (_, n2) = a_shape, b_shape
    return (rank * n1) ** 3 + (rank * n2) ** 3 + rank * rank * n * n


def whitened_svd_cost(m: int, n: int) -> int:
    """Flops of a whitened SVD of an m x n weight to leading order: the SVD and the n x n eigensolve."""
    return m * n * min(m, n) + n ** 3


@dataclass(frozen=True)
class KroneckerShape:
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    rank: int
    params: int
    score: float | None = field(default=None, compare=False)
    fit: object = field(default=None, compare=False, repr=False)  # the shortlist's ALSResult, for resuming

    @property
    def degenerate(self) -> bool:
        return is_degenerate(self.a_shape, self.b_shape)


def divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def is_degenerate(a_shape, b_shape) -> bool:
    (m1, n1), (m2, n2) = a_shape, b_shape
    return (n1 == 1 and m2 == 1) or (m1 == 1 and n2 == 1)


def energy_kept(W: torch.Tensor, shape: KroneckerShape) -> float:
    """Share of ||W||_F^2 kept by the optimal rank-r Kronecker sum of this shape (1.0 = exact)."""
    R = kron_rearrange(W.to(torch.float32 if W.dtype != torch.float64 else W.dtype), shape.a_shape, shape.b_shape)
    S, total = top_singular_values(R, shape.rank, name="energy_kept")  # no singular vectors: one pass over W
    return float(S.pow(2).sum().item() / total) if total > 0 else 1.0


def kronecker_shapes(
    m: int,
    n: int,
    *,
    ratio: float | None = None,
    budget: int | None = None,
    rank: int | str = 1,
    weight: torch.Tensor | None = None,
    criterion: Callable[[torch.Tensor, KroneckerShape], float] | None = energy_kept,
    allow_degenerate: bool = False,
    tolerance: float = 0.01,
    band: float = 0.05,
    max_candidates: int = 16,
    stats: torch.Tensor | None = None,
    shortlist: int = 3,
    sweeps: int = 2,
    problem=None,
    max_als_cost: float | None = MAX_ALS_COST,
) -> list[KroneckerShape]:
    """Feasible factor shapes for an m x n matrix under `ratio` (m n / params) or a parameter `budget`.

    rank: a fixed number of Kronecker terms, or "auto" for the most terms that fit each shape.
    A shape is feasible when its parameters are at most budget * (1 + tolerance) (so the paper's
    (1 x 2) factors, which cost two parameters over m n / 2, count as 2x). Only shapes within `band`
    of the largest feasible parameter count are kept: a 2x recipe never silently compresses 8x.
    Returns them best first: by `criterion(weight, shape)` (higher is better) when weight is given,
    otherwise by parameters used, then by the smaller B factor. With `weight` and `stats`, the score is
    the output energy kept, 1 - oerr^2 (see the module docs; `shortlist`, `sweeps`: the ALS refinement;
    `problem`: a `KroneckerProblem` of weight and stats to reuse, e.g. one whose MomentCache is shared by
    the weights that read the same input). `max_als_cost`: with rank "auto", offer only shapes whose ALS
    sweep costs at most this many whitened SVDs of the matrix (see the module docs; None: no limit).
    """
    if (ratio is None) == (budget is None):
        raise DataError("kronecker_shapes: give exactly one of ratio= (e.g. 2.0) or budget= (a parameter count)")
    if ratio is not None:
        if not ratio > 1:
            raise DataError(f"kronecker_shapes: ratio={ratio} must be > 1 (2 halves the parameters)")
        budget = m * n / ratio
    if budget <= 0:
        raise DataError(f"kronecker_shapes: budget={budget} must be positive")
    if rank != "auto" and (not isinstance(rank, int) or rank < 1):
        raise DataError(f"kronecker_shapes: rank={rank!r} must be a positive int or 'auto'")
    limit = budget * (1 + tolerance)

    found: list[KroneckerShape] = []
    for m1 in divisors(m):
        for n1 in divisors(n):
            a, b = (m1, n1), (m // m1, n // n1)
            if not allow_degenerate and is_degenerate(a, b):
                continue
            per_term = a[0] * a[1] + b[0] * b[1]
            max_rank = min(a[0] * a[1], b[0] * b[1])
            r = min(max_rank, int(limit // per_term)) if rank == "auto" else rank
            if r < 1 or r > max_rank or r * per_term > limit:
                continue
            found.append(KroneckerShape(a, b, r, r * per_term))
    if not found:
        raise DataError(
            f"kronecker_shapes: no Kronecker shape of a {m} x {n} matrix fits {int(budget)} parameters "
            f"with rank={rank}; lower the ratio, use rank='auto', or allow_degenerate=True"
        )
    top = max(s.params for s in found)
    found = [s for s in found if s.params >= (1 - band) * top]
    if rank == "auto" and max_als_cost is not None:
        limit_cost = max(max_als_cost * whitened_svd_cost(m, n), ALS_FLOPS_FREE)
        affordable = [s for s in found if als_cost(m, n, s.a_shape, s.b_shape, s.rank) <= limit_cost]
        if not affordable:
            cheapest = min(found, key=lambda s: als_cost(m, n, s.a_shape, s.b_shape, s.rank))
            ratio_cost = als_cost(m, n, cheapest.a_shape, cheapest.b_shape, cheapest.rank) / whitened_svd_cost(m, n)
            raise DataError(
                f"kronecker_shapes: every Kronecker shape of a {m} x {n} matrix that fits {int(budget)} parameters "
                f"with rank='auto' needs so many terms that one ALS sweep costs more than {max_als_cost:g} whitened "
                f"SVDs (the cheapest, A {cheapest.a_shape} (x) B {cheapest.b_shape} with {cheapest.rank} terms, "
                f"{ratio_cost:.3g}); use a higher ratio, a fixed rank, or strategy svd")
        found = affordable
    found.sort(key=lambda s: (-s.params, s.b_shape[0] * s.b_shape[1], s.b_shape[0]))
    found = found[:max_candidates]
    if weight is not None and stats is not None:
        ranked = rank_by_output_error(weight, stats, found, shortlist=shortlist, sweeps=sweeps, problem=problem)
        if rank != "auto":
            return ranked
        # More terms are a guess the proxy can get wrong: the measured best one-term layout at the same budget
        # (from all one-term candidates: their ALS is cheap) competes with the measured many-term ones, so
        # "auto" never loses to its own one-term candidate.
        try:
            single = kronecker_shapes(m, n, budget=budget, rank=1, weight=weight, criterion=criterion,
                                      allow_degenerate=allow_degenerate, tolerance=tolerance, band=band,
                                      stats=stats, shortlist=shortlist, sweeps=sweeps, problem=problem)
        except ValueError:
            return ranked  # no one-term layout fits this budget
        measured = [s for s in ranked if s.fit is not None] + [s for s in single[:1] if s not in ranked]
        measured.sort(key=lambda s: -s.score)
        return measured + [s for s in ranked if s.fit is None]
    if weight is not None and criterion is not None:
        scored = [KroneckerShape(s.a_shape, s.b_shape, s.rank, s.params, criterion(weight, s)) for s in found]
        found = sorted(scored, key=lambda s: -s.score)
    return found


def rank_by_output_error(W: torch.Tensor, C, candidates: list[KroneckerShape], *,
                         shortlist: int = 3, sweeps: int = 2, problem=None) -> list[KroneckerShape]:
    """Candidates best first by output energy kept, 1 - oerr^2 (higher is better).

    All are scored by the whitened-NKP proxy; the `shortlist` best are re-scored by the true output error
    after `sweeps` ALS sweeps started from their proxy factors, and lead the list carrying their ALSResult
    (`fit`, which decompose can resume); the rest keep their proxy scores. C: the second moment, or a
    MomentCache of it; `problem`: a KroneckerProblem of W and C to reuse (V = W C, whitenings).
    """
    from kroncompress.linalg.als import KroneckerProblem, kronecker_als, whitened_nkp

    problem = problem or KroneckerProblem(W, C)
    proxied, starts = [], {}
    for s in candidates:
        whitening = problem.moments.whitening(s.a_shape[1], s.b_shape[1])
        A, B, proxy = whitened_nkp(problem.W, problem.C, s.a_shape, s.b_shape, s.rank, whitening=whitening)
        shape = KroneckerShape(s.a_shape, s.b_shape, s.rank, s.params, 1 - proxy ** 2)
        starts[shape] = (A, B)
        proxied.append(shape)
    proxied.sort(key=lambda s: -s.score)
    refined = []
    for s in proxied[:max(shortlist, 0)]:
        fit = kronecker_als(problem.W, problem.C, s.a_shape, s.b_shape, s.rank, start=starts[s], max_sweeps=sweeps,
                            problem=problem)
        refined.append(KroneckerShape(s.a_shape, s.b_shape, s.rank, s.params, 1 - fit.history[-1] ** 2, fit))
    refined.sort(key=lambda s: -s.score)
    return refined + proxied[len(refined):]
