"""Tensorized weights: Tucker, CP and tensor-train (TT-matrix) formats of an (out x in) matrix.

W (m x n) is viewed as a tensor by splitting out = o_1 ... o_d and in = i_1 ... i_d (row-major, the
same as `W.reshape(*out_shape, *in_shape)`):

- Tucker: the order-2d tensor (o_1..o_d, i_1..i_d) = core (r_1..r_2d) x_k U_k, U_k (dim_k x r_k);
- CP: the same order-2d tensor as sum_{c<R} of outer products of the columns of U_k (dim_k x R);
- TT-matrix: W[(o),(i)] = G_1[o_1, i_1] ... G_d[o_d, i_d], cores G_k (r_{k-1}, o_k, i_k, r_k), r_0 = r_d = 1
  (with d = 2 this is a rank-r Kronecker sum, so TT is most useful with d >= 3).

Decompositions call tensorly (HOOI, ALS, TT-SVD) through its pytorch backend inside a thread-local
backend context, on the weight's device, in float32 (float64 for float64 weights). Forward products
(`*_matmul`) contract an input with the factors mode by mode, never building W; `*_matmul_flops` give
their cost per token, and the order of the contractions is the cheaper one for the shapes.

Import every name from `kroncompress.linalg.tensorized`; the code lives in one submodule per format:
`tucker`, `cp` and `tt` (parameter counts, rank limits, decomposition, reconstruction and forward product
of each), and `common` (tensorization, the rank search under a budget, the tensorly plumbing they share).
"""

from __future__ import annotations

from kroncompress.linalg.tensorized.common import Shape, balanced_factors, check_tensorization, solve_ranks
from kroncompress.linalg.tensorized.cp import (
    cp_decompose, cp_matmul, cp_matmul_flops, cp_params, cp_to_matrix,
)
from kroncompress.linalg.tensorized.tt import (
    tt_decompose, tt_matmul, tt_matmul_flops, tt_max_ranks, tt_params, tt_ranks_problem, tt_sweep_right_to_left,
    tt_to_matrix,
)
from kroncompress.linalg.tensorized.tucker import (
    tucker_decompose, tucker_matmul, tucker_matmul_flops, tucker_max_ranks, tucker_params, tucker_params_grid,
    tucker_plan_orders, tucker_ranks_problem, tucker_to_matrix,
)

__all__ = [
    "Shape", "balanced_factors", "check_tensorization", "solve_ranks",
    "tucker_params", "tucker_params_grid", "tucker_max_ranks", "tucker_ranks_problem", "tucker_decompose",
    "tucker_to_matrix", "tucker_plan_orders", "tucker_matmul_flops", "tucker_matmul",
    "cp_params", "cp_decompose", "cp_to_matrix", "cp_matmul_flops", "cp_matmul",
    "tt_params", "tt_max_ranks", "tt_ranks_problem", "tt_decompose", "tt_to_matrix", "tt_matmul_flops",
    "tt_sweep_right_to_left", "tt_matmul",
]
