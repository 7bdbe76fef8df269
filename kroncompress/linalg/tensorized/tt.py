"""Tensor-train (TT-matrix) format: W[(o),(i)] = G_1[o_1, i_1] ... G_d[o_d, i_d], cores G_k (r_{k-1}, o_k, i_k, r_k),
r_0 = r_d = 1.

Parameter count and rank limits, the decomposition (tensorly's TT-SVD), the reconstruction of W and the
forward product (a sweep over the cores in the cheaper direction)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from kroncompress.linalg.tensorized.common import cast_like, tensorly_pytorch, work_tensor


# -- parameter count and rank limits -----------------------------------------------------------------
def tt_params(out_shape: Sequence[int], in_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """sum_k r_{k-1} o_k i_k r_k with boundary ranks 1; `ranks` are the d - 1 inner ranks."""
    full = (1, *ranks, 1)
    return sum(full[k] * o * i * full[k + 1] for k, (o, i) in enumerate(zip(out_shape, in_shape)))


def tt_max_ranks(out_shape: Sequence[int], in_shape: Sequence[int]) -> list[int]:
    """r_k <= min(prod_{j<=k} o_j i_j, prod_{j>k} o_j i_j): the ranks of the TT-SVD unfoldings."""
    pairs = [o * i for o, i in zip(out_shape, in_shape)]
    return [min(math.prod(pairs[: k + 1]), math.prod(pairs[k + 1 :])) for k in range(len(pairs) - 1)]


def tt_ranks_problem(out_shape: Sequence[int], in_shape: Sequence[int], ranks: Sequence[int]) -> str | None:
    """Why these inner TT ranks cannot come out of TT-SVD (r_k > r_{k-1} o_k i_k or > o_{k+1} i_{k+1} r_{k+1}), or None."""
    full = (1, *ranks, 1)
    pairs = [o * i for o, i in zip(out_shape, in_shape)]
    for k in range(1, len(full) - 1):
        if full[k] > full[k - 1] * pairs[k - 1] or full[k] > pairs[k] * full[k + 1]:
            return (f"rank r_{k}={full[k]} exceeds r_{k-1} o_{k} i_{k} = {full[k - 1] * pairs[k - 1]} or "
                    f"o_{k+1} i_{k+1} r_{k+1} = {pairs[k] * full[k + 1]}")
    return None


# -- decomposition -----------------------------------------------------------------------------------
def tt_decompose(weight: torch.Tensor, out_shape, in_shape, ranks) -> list[torch.Tensor]:
    """TT-matrix cores G_k (r_{k-1}, o_k, i_k, r_k) by tensorly's TT-SVD (deterministic)."""
    from tensorly.decomposition import tensor_train_matrix

    T = work_tensor(weight, out_shape, in_shape)
    from kroncompress.linalg.svd import lapack_threads

    with tensorly_pytorch(), lapack_threads(T):  # a chain of LAPACK SVDs: one thread (see lapack_threads)
        cores = tensor_train_matrix(T, rank=[1, *ranks, 1])
    return cast_like(list(cores), weight)


# -- reconstruction (export and tests only) ----------------------------------------------------------
def tt_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    full = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], cores[0].shape[3])
    for core in cores[1:]:
        O, I, _ = full.shape
        _, o, i, r = core.shape
        full = torch.einsum("xyr,roiz->xoyiz", full, core).reshape(O * o, I * i, r)
    return full.reshape(full.shape[0], full.shape[1])


# -- forward product ---------------------------------------------------------------------------------
def _tt_step_flops(out_shape, in_shape, full_ranks, k: int, right_to_left: bool) -> int:
    core = full_ranks[k] * out_shape[k] * in_shape[k] * full_ranks[k + 1]
    if right_to_left:  # input modes < k still there, output modes > k already produced
        return 2 * core * math.prod(in_shape[:k]) * math.prod(out_shape[k + 1 :])
    return 2 * core * math.prod(out_shape[:k]) * math.prod(in_shape[k + 1 :])


def tt_matmul_flops(out_shape, in_shape, ranks, right_to_left: bool | None = None) -> int:
    """FLOPs per token; right_to_left=None gives the cheaper of the two sweep directions."""
    full = (1, *ranks, 1)
    d = len(out_shape)
    costs = {rtl: sum(_tt_step_flops(out_shape, in_shape, full, k, rtl) for k in range(d)) for rtl in (True, False)}
    return min(costs.values()) if right_to_left is None else costs[right_to_left]


def tt_sweep_right_to_left(out_shape, in_shape, ranks) -> bool:
    return tt_matmul_flops(out_shape, in_shape, ranks, True) <= tt_matmul_flops(out_shape, in_shape, ranks, False)


def tt_matmul(x: torch.Tensor, cores: Sequence[torch.Tensor], right_to_left: bool) -> torch.Tensor:
    """x (B, n) -> x W^T for the TT-matrix W, sweeping the cores in the given direction."""
    B = x.shape[0]
    in_shape = [c.shape[2] for c in cores]
    d = len(cores)
    if right_to_left:
        # t: (B, prod i_<k, i_k, r_k, prod o_>k)
        t = x.reshape(B, math.prod(in_shape[:-1]), in_shape[-1], 1, 1)
        for k in range(d - 1, -1, -1):
            t = torch.einsum("bpirq,soir->bpsoq", t, cores[k])
            if k > 0:
                t = t.reshape(B, math.prod(in_shape[: k - 1]), in_shape[k - 1], cores[k].shape[0], -1)
        return t.reshape(B, -1)
    # t: (B, prod o_<k, r_{k-1}, i_k, prod i_>k)
    t = x.reshape(B, 1, 1, in_shape[0], math.prod(in_shape[1:]))
    for k in range(d):
        t = torch.einsum("bpriq,roiz->bpozq", t, cores[k])
        if k < d - 1:
            t = t.reshape(B, -1, cores[k].shape[3], in_shape[k + 1], math.prod(in_shape[k + 2 :]))
    return t.reshape(B, -1)
