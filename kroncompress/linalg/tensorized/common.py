"""What the Tucker, CP and TT formats share: tensorizing a weight (`balanced_factors`,
`check_tensorization`), choosing ranks under a parameter budget (`solve_ranks`), and the working
precision and tensorly backend their decompositions run under."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

from kroncompress.errors import DataError

Shape = tuple[int, ...]


# -- tensorization ------------------------------------------------------------------------------------
def balanced_factors(k: int, order: int) -> Shape:
    """Split k into `order` factors (ascending) whose largest is as small as possible, e.g. 3072, 2 -> (48, 64)."""
    if k < 1 or order < 1:
        raise DataError(f"balanced_factors: need k >= 1 and order >= 1, got k={k}, order={order}")

    def splits(rest: int, parts: int, low: int):
        if parts == 1:
            if rest >= low:
                yield (rest,)
            return
        for f in range(low, int(round(rest ** (1.0 / parts))) + 2):
            if rest % f == 0 and f <= rest // f:
                for tail in splits(rest // f, parts - 1, f):
                    yield (f, *tail)

    options = list(splits(k, order, 1)) or [(1,) * (order - 1) + (k,)]
    return min(options, key=lambda s: (max(s), -min(s)))


def check_tensorization(m: int, n: int, out_shape: Sequence[int], in_shape: Sequence[int]) -> None:
    """ValueError (naming out_shape / in_shape and the fix) unless the shapes multiply to (m, n) with equal order."""
    for name, shape, size in (("out_shape", out_shape, m), ("in_shape", in_shape, n)):
        if math.prod(shape) != size:
            raise DataError(f"{name}={list(shape)} multiplies to {math.prod(shape)}, but the weight has {size} "
                             f"{'rows (out features)' if name == 'out_shape' else 'columns (in features)'}; "
                             f"give factors whose product is {size}, e.g. {list(balanced_factors(size, len(shape)))}")
    if len(out_shape) != len(in_shape):
        raise DataError(f"out_shape={list(out_shape)} and in_shape={list(in_shape)} must have the same number of "
                         "factors (pad with 1s)")


# -- rank choice under a parameter budget ------------------------------------------------------
def solve_ranks(params_of: Callable[[Sequence[int]], int], max_ranks: Sequence[int], budget: float,
                radius: int | None = None, params_of_grid: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> list[int] | None:
    """The ranks (each in 1..max) with the most parameters at or under `budget`, or None if all-ones exceeds it.

    Ranks proportional to `max_ranks` are scaled (bisection) to the largest that fits, then every
    combination within +-radius of that point is tried and the one using most of the budget kept (ties:
    closest to proportional); by default radius keeps that to about 20000 combinations. The result never exceeds the budget (so the ratio is met or exceeded) and
    lands within about 1% below it unless the rank grid is too coarse or every rank is at its maximum.
    `params_of_grid` (optional) is params_of for a whole (N x k) int64 tensor of rank rows at once, giving
    float64 counts (inf where infeasible): the same choice, without 20000 Python calls.
    """
    k = len(max_ranks)
    if k == 0:
        return []
    if params_of([1] * k) > budget:
        return None

    def at(t: float) -> list[int]:
        return [max(1, min(mr, int(t * mr))) for mr in max_ranks]

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params_of(at(mid)) <= budget else (lo, mid)
    if radius is None:
        radius = max(1, min(20, int((20000 ** (1.0 / k) - 1) / 2)))
    base = at(1.0) if params_of(at(1.0)) <= budget else at(lo)
    if params_of_grid is not None:
        deltas = torch.cartesian_prod(*[torch.arange(-radius, radius + 1)] * k).reshape(-1, k)
        grid = torch.minimum(torch.clamp(torch.tensor(base) + deltas, min=1), torch.tensor(list(max_ranks)))
        counts = params_of_grid(grid)
        counts = torch.where(counts <= budget, counts, torch.full_like(counts, -math.inf))
        distance = deltas.abs().sum(1)
        # the itertools order and key of the loop below: most parameters, then nearest, then first
        ties = torch.where(counts == counts.max(), distance, torch.full_like(distance, 1 << 40))
        return grid[int(torch.argmin(ties))].tolist()
    best, best_key = base, (params_of(base), 0)
    for delta in itertools.product(range(-radius, radius + 1), repeat=k):
        ranks = [min(mr, max(1, b + d)) for b, d, mr in zip(base, delta, max_ranks)]
        p = params_of(ranks)
        key = (p, -sum(abs(d) for d in delta))
        if p <= budget and key > best_key:
            best, best_key = ranks, key
    return best


# -- decompositions (tensorly) ------------------------------------------------------------------------
def work_tensor(weight: torch.Tensor, out_shape, in_shape) -> torch.Tensor:
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.detach().to(dtype).reshape(*out_shape, *in_shape).contiguous()


def tensorly_pytorch():
    import tensorly as tl

    # Thread-local and restored on exit: other code keeps whatever backend it had.
    return tl.backend_context("pytorch", local_threadsafe=True)


def cast_like(tensors, like: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device=like.device, dtype=like.dtype).contiguous() for t in tensors]
