"""One parameter budget for many modules: each module's measured error-versus-parameters curve, weighted by its
measured sensitivity, allocated by `linalg.allocation`.

Curves, per module (W: out x in, C: the damped input second moment over the calibration tokens):
- dense: all m n parameters, no error;
- svd: rank k costs k (m + n) and leaves sum_{j > k} sigma_j^2 of W L (C = L L^T) as squared output error,
  the whole curve from one SVD (the whitened truncated SVD is optimal at every rank);
- kronecker: the shape search's best measured layout at each of a few ratios (terms and shapes its own).
Errors are absolute squared output errors summed over the calibration tokens, times the sensitivity s of
`kroncompress.sensitivity` (divided by the token count, so e predicts the mean loss increase up to 1/2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from kroncompress.linalg.allocation import Allocation, Candidate, allocate
from kroncompress.linalg.svd import lapack_threads
from kroncompress.linalg.whitening import cholesky_factor

KRONECKER_RATIOS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
STRUCTURES = ("svd", "kronecker")


@dataclass(frozen=True)
class Choice:
    """A candidate's label: the strategy ("dense" keeps the module) and its options, hashable."""

    strategy: str
    options: tuple = ()

    def as_options(self) -> dict:
        return dict(self.options)


def svd_curve(W: torch.Tensor, C: torch.Tensor) -> tuple[list[int], list[float]]:
    """(ranks, squared output errors) of the whitened truncated SVD at every rank that saves parameters."""
    m, n = W.shape
    L = cholesky_factor(C.to(device=W.device, dtype=torch.float64))
    WL = W.to(torch.float64) @ L
    with lapack_threads(WL):
        S = torch.linalg.svdvals(WL)
    tail = torch.flip(torch.cumsum(torch.flip(S ** 2, [0]), 0), [0])  # tail[j] = sum_{i >= j} S_i^2
    ranks = [k for k in range(1, min(m, n) + 1) if k * (m + n) < m * n]
    return ranks, [float(tail[k]) if k < len(tail) else 0.0 for k in ranks]


def kronecker_curve(W: torch.Tensor, C: torch.Tensor, ratios: Iterable[float] = KRONECKER_RATIOS,
                    rank: int | str = "auto") -> list[tuple[dict, int, float]]:
    """(options, params, squared output error) of the shape search's best measured layout at each ratio."""
    from kroncompress.linalg.als import KroneckerProblem
    from kroncompress.linalg.shapes import kronecker_shapes

    m, n = W.shape
    problem = KroneckerProblem(W, C)
    points = []
    for ratio in ratios:
        try:
            found = kronecker_shapes(m, n, ratio=ratio, rank=rank, weight=W, stats=problem.C, problem=problem)
        except ValueError:
            continue  # no layout of this matrix at this ratio
        best = found[0]
        options = {"a_shape": list(best.a_shape), "b_shape": list(best.b_shape), "rank": best.rank}
        points.append((options, best.params, max(1.0 - best.score, 0.0) * problem.total))
    return points


def module_candidates(W: torch.Tensor, C: torch.Tensor, weight: float, structures: Iterable[str] = STRUCTURES,
                      kronecker_ratios: Iterable[float] = KRONECKER_RATIOS) -> list[Candidate]:
    """The candidates of one module (labels: `Choice`s), errors scaled by `weight` (sensitivity / tokens)."""
    structures = tuple(structures)
    unknown = sorted(set(structures) - set(STRUCTURES))
    if unknown:
        raise ValueError(f"budget: strategies {unknown} cannot be allocated; choose from {list(STRUCTURES)}")
    m, n = W.shape
    found = [Candidate(m * n, 0.0, Choice("dense"))]
    if "svd" in structures:
        ranks, errors = svd_curve(W, C)
        found += [Candidate(k * (m + n), weight * e, Choice("svd", (("rank", k),))) for k, e in zip(ranks, errors)]
    if "kronecker" in structures:
        for options, params, error in kronecker_curve(W, C, kronecker_ratios):
            frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())
            found.append(Candidate(params, weight * error, Choice("kronecker", frozen)))
    return found


def allocate_budget(weights: Mapping[str, torch.Tensor], moments: Mapping[str, torch.Tensor], budget: int, *,
                    sensitivity: Mapping[str, float] | None = None, tokens: int = 1,
                    structures: Iterable[str] = STRUCTURES, kronecker_ratios: Iterable[float] = KRONECKER_RATIOS
                    ) -> Allocation:
    """The allocation of `budget` weight parameters over `weights` (name -> W, out x in) with input moments
    `moments` (name -> damped C). `sensitivity`: name -> s (None: uniform, every s = 1)."""
    missing = [name for name in weights if name not in moments]
    if missing:
        raise ValueError(f"budget: no calibration statistics for {', '.join(missing[:3])}; the global budget "
                         "needs a calibration section or --calibration-data")
    curves = {}
    for name, W in weights.items():
        s = 1.0 if sensitivity is None else float(sensitivity[name])
        curves[name] = module_candidates(W, moments[name], s / max(tokens, 1), structures, kronecker_ratios)
    return allocate(curves, int(budget))
