"""One parameter budget over many modules: pick one candidate per module (a rank, a Kronecker layout, or the
dense weight) minimising the total weighted error under the budget.

Each module i offers candidates (params p, error e): e is the module's sensitivity-weighted squared output
error at that size (0 for the dense weight). The problem, min sum e_i subject to sum p_i <= budget, is a
multiple-choice knapsack. The Lagrangian relaxation min sum (e_i + lam p_i) separates per module; sweeping
lam walks every module down the lower convex hull of its (p, e) points. The greedy below takes hull steps in
order of error removed per parameter added (the slope), which visits exactly the Lagrangian solutions, so:

- every allocation it passes through is optimal for the parameter count it uses (Everett's theorem: a
  minimiser of sum e_i + lam p_i minimises sum e_i among allocations with at most its sum p_i);
- it stops at the first step that no longer fits (`lagrangian`), then fills the rest of the budget with the
  best-slope steps that still fit (`fill`), which can only lower the error.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

from kroncompress.errors import DataError


@dataclass(frozen=True)
class Candidate:
    """One way to store a module: `params` it keeps, its weighted squared `error`, and a `label` (any value
    the caller uses to build it: a rank, a KroneckerShape, "dense")."""

    params: int
    error: float
    label: Any = None


@dataclass
class Allocation:
    """The chosen candidate per module, their totals, and the budget."""

    choice: dict[Hashable, Candidate]
    params: int
    error: float
    budget: int
    lagrangian_params: int  # the parameters used where the provably optimal greedy stopped
    lagrangian_error: float


def lower_hull(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates on the lower convex hull of (params, error), by increasing params and decreasing error:
    the only ones a Lagrangian allocation ever picks. Dominated and non-convex points are dropped."""
    best: dict[int, Candidate] = {}
    for c in candidates:
        if c.params < 0 or not (math.isfinite(c.error) and c.error >= 0):
            raise DataError(f"allocation: a candidate needs params >= 0 and a finite error >= 0, got {c}")
        if c.params not in best or c.error < best[c.params].error:
            best[c.params] = c
    hull: list[Candidate] = []
    for c in sorted(best.values(), key=lambda c: c.params):
        if hull and c.error >= hull[-1].error:
            continue  # more parameters, no less error: dominated
        while len(hull) >= 2:
            p0, p1 = hull[-2], hull[-1]
            # drop p1 when it lies on or above the segment p0 -> c
            if (p1.error - p0.error) * (c.params - p0.params) >= (c.error - p0.error) * (p1.params - p0.params):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def allocate(curves: Mapping[Hashable, Sequence[Candidate]], budget: int) -> Allocation:
    """The allocation of `budget` parameters over the modules of `curves` (module -> its candidates)."""
    if not curves:
        raise DataError("allocation: no modules to allocate a budget over")
    hulls = {}
    for name, candidates in curves.items():
        if not candidates:
            raise DataError(f"allocation: module {name!r} has no candidates")
        hulls[name] = lower_hull(candidates)
    position = {name: 0 for name in hulls}
    used = sum(h[0].params for h in hulls.values())
    if used > budget:
        raise DataError(f"allocation: the budget of {budget:,} parameters is below the smallest choice of every "
                         f"module ({used:,}); raise the budget or compress more modules")

    def push(heap, name):
        hull, k = hulls[name], position[name]
        if k + 1 < len(hull):
            step, cut = hull[k + 1].params - hull[k].params, hull[k].error - hull[k + 1].error
            heapq.heappush(heap, (-cut / step, str(name), name, step))

    heap: list = []
    for name in hulls:
        push(heap, name)
    lagrangian = None
    while heap:
        _, _, name, step = heapq.heappop(heap)
        if used + step > budget:
            if lagrangian is None:
                lagrangian = (used, _total(hulls, position))
            continue  # fill: later, smaller steps of other modules may still fit
        position[name] += 1
        used += step
        push(heap, name)
    error = _total(hulls, position)
    lagrangian = lagrangian or (used, error)
    choice = {name: hulls[name][position[name]] for name in hulls}
    return Allocation(choice, used, error, budget, lagrangian[0], lagrangian[1])


def _total(hulls, position) -> float:
    return sum(hulls[name][k].error for name, k in position.items())
