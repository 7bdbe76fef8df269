"""Nearest Kronecker product (Van Loan & Pitsianis) and the factored matmul it enables.

W (m x n) ~ sum_i A_i (x) B_i with A_i: m1 x n1, B_i: m2 x n2, m = m1 m2, n = n1 n2.
Rearranging W into R (m1 n1 x m2 n2), R[(i1, j1), (i2, j2)] = W[i1 m2 + i2, j1 n2 + j2], turns the
Kronecker fit into a rank-r matrix approximation of R, solved by its top-r singular triplets.
"""

from __future__ import annotations

import math

import torch

from kroncompress.errors import DataError
from kroncompress.linalg.svd import CHUNK_ELEMENTS, top_singular_triplets

Shape = tuple[int, int]


def _shape_pair(name: str, shape):
    """A factor shape as a 2-list of positive ints or None; ValueError naming it otherwise."""
    if shape is None:
        return [None, None]
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 2:
        raise DataError(f"nearest_kronecker: {name} must be a pair (rows, columns) such as (1, 2), got {shape!r}")
    pair = []
    for entry in shape:
        if entry is None:
            pair.append(None)
            continue
        if isinstance(entry, bool) or not hasattr(entry, "__index__") or entry.__index__() < 1:
            raise DataError(f"nearest_kronecker: {name} entries must be positive ints or None, got {shape!r}")
        pair.append(entry.__index__())
    return pair


def infer_shapes(m: int, n: int, a_shape, b_shape) -> tuple[Shape, Shape]:
    if a_shape is None and b_shape is None:
        raise DataError(
            f"nearest_kronecker: give a_shape or b_shape for a {m} x {n} matrix "
            "(the other is inferred), e.g. b_shape=(1, 2)"
        )
    a_shape, b_shape = _shape_pair("a_shape", a_shape), _shape_pair("b_shape", b_shape)
    for axis, (total, label) in enumerate(((m, "rows"), (n, "columns"))):
        a, b = a_shape[axis], b_shape[axis]
        if a is None and b is None:
            raise DataError(f"nearest_kronecker: a_shape[{axis}] and b_shape[{axis}] are both None; give one")
        if a is None:
            a = total // b if b and total % b == 0 else None
        if b is None:
            b = total // a if a and total % a == 0 else None
        if a is None or b is None or a * b != total or a < 1 or b < 1:
            raise DataError(
                f"nearest_kronecker: the {label} of W ({total}) are not a_shape[{axis}] x b_shape[{axis}] "
                f"({a_shape[axis]} x {b_shape[axis]}); pick factors whose product is {total}"
            )
        a_shape[axis], b_shape[axis] = a, b
    return (int(a_shape[0]), int(a_shape[1])), (int(b_shape[0]), int(b_shape[1]))


def kron_rearrange(W: torch.Tensor, a_shape: Shape, b_shape: Shape) -> torch.Tensor:
    """R(W): (m1 n1) x (m2 n2); a sum of r Kronecker products becomes a rank-r matrix."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    return W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Dense sum_i A_i (x) B_i for stacked factors A (r, m1, n1), B (r, m2, n2); 2-D inputs mean r = 1."""
    if A.dim() == 2:
        A, B = A.unsqueeze(0), B.unsqueeze(0)
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    return torch.einsum("rac,rbd->abcd", A, B).reshape(m1 * m2, n1 * n2)


def nearest_kronecker(
    W: torch.Tensor,
    a_shape: tuple[int | None, int | None] | None = None,
    b_shape: tuple[int | None, int | None] | None = None,
    rank: int = 1,
    *,
    return_residual: bool = False,
):
    """Frobenius-optimal sum of `rank` Kronecker products approximating the 2-D tensor W.

    Returns (A, B): 2-D tensors for rank=1, stacked (rank, m1, n1) and (rank, m2, n2) otherwise, in W's
    dtype and device. sqrt(sigma_i) goes on each factor. With return_residual=True, also returns
    ||W - sum A_i (x) B_i||_F (a float) for the factors in compute precision (float32, or float64 for
    float64 input); by Eckart-Young on R(W) it equals sqrt(sum of sigma_i^2 for i > rank).

    Integer and bool W are factorised in float32 and the factors come back in torch's default float
    dtype (a sum of Kronecker products of an integer matrix is not integer in general). Complex W, NaN
    or inf entries, and shapes that are not pairs of positive ints raise ValueError naming the problem.

    Cost for the tall, thin rearrangements of (1 x k)-type factors: one streamed pass over W for the
    small float64 Gram matrix, an eigensolve of that q x q matrix, and one pass that writes A directly
    (sqrt(sigma) folded in); no copy of W when R(W) is a view of it ((1 x k) factors, contiguous W).
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise DataError(f"nearest_kronecker: W must be a 2-D tensor, got shape {shape}; reshape it to (out, in)")
    if W.is_complex():
        raise DataError(f"nearest_kronecker: W is complex ({W.dtype}); only real matrices are supported "
                         "(fit W.real and W.imag separately if that is what you mean)")
    m, n = W.shape
    a_shape, b_shape = infer_shapes(m, n, a_shape, b_shape)
    max_rank = min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise DataError(
            f"nearest_kronecker: rank={rank} is out of range for A {a_shape} (x) B {b_shape}; "
            f"use 1 <= rank <= {max_rank} (= min(m1*n1, m2*n2))"
        )
    out_dtype = W.dtype if W.is_floating_point() else torch.get_default_dtype()
    compute_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    R = kron_rearrange(W.to(compute_dtype), a_shape, b_shape)
    left, S, right = top_singular_triplets(R, rank, scaled=True, name="nearest_kronecker")
    A = left.T.reshape(rank, *a_shape).to(out_dtype)
    B = right.T.reshape(rank, *b_shape).to(out_dtype)
    if rank == 1:
        A, B = A[0], B[0]
    if not return_residual:
        return A, B
    root = S.clamp_min(0).sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    return A, B, _residual(R, left / safe, S, right / safe)


def _residual(R: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> float:
    """||R - U diag(S) V^T||_F in float64, streamed over row chunks.

    Measured directly rather than as sqrt(||R||^2 - sum S^2): that difference cancels catastrophically
    and is only accurate to sqrt(eps) * ||R||, far from "exact" when W is (nearly) a Kronecker sum.
    """
    p, q = R.shape
    Vt, S = V.to(torch.float64).T, S.to(torch.float64)
    step = max(1, CHUNK_ELEMENTS // max(q, 1))
    total = torch.zeros((), dtype=torch.float64, device=R.device)
    for start in range(0, p, step):
        rows = slice(start, start + step)
        diff = R[rows].to(torch.float64) - (U[rows].to(torch.float64) * S) @ Vt
        total += diff.pow(2).sum()
    return total.sqrt().item()


KRON_ORDERS = ("b_first", "a_first")


def kron_matmul(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                order: str | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W = sum_i A_i (x) B_i (out x in), without building W.

    x: (..., n1 n2); A: (r, m1, n1); B: (r, m2, n2). The r terms are contracted as two batched GEMMs
    over the stacked factors; the order (B first or A first) is chosen by FLOPs. When m2 = 1 (the
    (1 x k) factors of KnGPT2) the second GEMM writes the output directly and takes the bias as addmm's
    addend: no permute copy and no separate pass for the bias. `order` ("b_first" / "a_first") forces one
    order (tests compare them).
    """
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    lead = x.shape[:-1]
    N = math.prod(lead)
    X = x.reshape(N, n1, n2)
    cost_b_first = n1 * m2 * (n2 + m1)
    cost_a_first = m1 * n2 * (n1 + m2)
    if order is not None and order not in KRON_ORDERS:
        raise DataError(f"kron_matmul: order must be one of {KRON_ORDERS} or None (the cheaper), got {order!r}")
    if order == "b_first" or (order is None and cost_b_first <= cost_a_first):
        # T[N, n1, (r, m2)] = X @ B^T, then contract (r, n1) against A.
        T = X.reshape(N * n1, n2) @ B.permute(2, 0, 1).reshape(n2, r * m2)
        A_mat = A.permute(0, 2, 1).reshape(r * n1, m1)
        if m2 == 1:
            T = T.reshape(N, n1, r)
            T = T.reshape(N, n1) if r == 1 else T.transpose(1, 2).reshape(N, r * n1)
            Y = torch.addmm(bias, T, A_mat) if bias is not None else T @ A_mat  # (N, m1) = the output
            return Y.reshape(*lead, m1)
        T = T.reshape(N, n1, r, m2).permute(0, 3, 2, 1).reshape(N * m2, r * n1)
        Y = T @ A_mat  # (N m2, m1)
        Y = Y.reshape(N, m2, m1).transpose(1, 2)
    else:
        # T[N, n2, (r, m1)] = X^T @ A^T, then contract (r, n2) against B.
        T = X.transpose(1, 2).reshape(N * n2, n1) @ A.permute(2, 0, 1).reshape(n1, r * m1)
        T = T.reshape(N, n2, r, m1).permute(0, 3, 2, 1).reshape(N * m1, r * n2)
        Y = T @ B.permute(0, 2, 1).reshape(r * n2, m2)  # (N m1, m2)
        Y = Y.reshape(N, m1, m2)
    Y = Y.reshape(*lead, m1 * m2)
    return Y + bias if bias is not None else Y


def kron_matmul_flops(a_shape: Shape, b_shape: Shape, rank: int = 1) -> int:
    """Multiply-accumulates per input row of kron_matmul (the cheaper order), times 2 for FLOPs."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    macs = rank * min(n1 * m2 * (n2 + m1), m1 * n2 * (n1 + m2))
    return 2 * macs
