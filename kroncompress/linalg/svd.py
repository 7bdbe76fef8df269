"""Top-r singular triplets without a full SVD, and truncated SVD.

The rearranged matrices of a Kronecker fit are usually very tall and thin (a 1 x 2 factor gives two
columns), where a full SVD wastes seconds. When the short side is small we eigensolve its Gram matrix
in float64 (exact to float tolerance for the leading triplets): one streamed pass over the matrix for
the Gram, a small eigensolve, and one pass for the long singular vectors. Otherwise we run a randomized
subspace iteration until the leading singular values stop moving.

Non-finite input (NaN or inf) is refused with a ValueError that names it; the check is free on the Gram
path (a NaN or inf in the matrix makes its Gram non-finite) and one pass on the randomized path.
"""

from __future__ import annotations

import contextlib

import torch

from kroncompress.errors import DataError

GRAM_LIMIT = 4096  # largest short side for which the Gram eigensolve is used
CHUNK_ELEMENTS = 1 << 24  # rows are streamed through float64 computations in chunks of about this size
_GRAM_CHUNK_ELEMENTS = 1 << 22  # the Gram's chunks: 32 MiB in float64, few parallel regions (see _gram)
# R with at most this many columns (the (1 x k) factors of KnGPT2: 2 columns) is streamed on one thread
# in cache-sized float64 chunks (_THIN_CHUNK_ELEMENTS, 1 MiB): see _thin
THIN_COLUMNS = 16
# float32 R whose Gram has at least this many columns is eigensolved in float32 (see _scaled_triplets_from_gram)
SINGLE_EIGH_COLUMNS = 256
_THIN_CHUNK_ELEMENTS = 1 << 17


@contextlib.contextmanager
def lapack_threads(tensor: torch.Tensor | None = None):
    """Run LAPACK factorisations (eigh, svd, qr) on one CPU thread, restoring the thread count after.

    LAPACK's eigensolvers and SVDs are chains of thousands of small OpenMP parallel regions; when other
    processes compete for the cores, every region waits for a descheduled thread. On 2 shared cores at
    load 8 a 768 x 768 float64 eigh took 0.39-0.47 s on one thread and 1.1-4.8 s on two (idle, two
    threads gain little at these sizes). This was what made `svd-gpt2` take minutes on a busy machine.
    The setting is process-wide while it lasts: other threads of the process run single-threaded too.
    No effect for CUDA tensors. Memory-bound streaming passes keep every thread: the thread count never
    depends on the machine's load, so a decomposition gives the same factors whatever else is running
    (two threads: the GPT-2-small (1 x 2) layout took 0.45 s at load 2, but 4.7 s at load 5).
    """
    threads = torch.get_num_threads()
    if threads == 1 or (tensor is not None and tensor.device.type != "cpu"):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _thin(R: torch.Tensor):
    """One CPU thread for the streamed passes over a tall R with few columns (a context manager).

    Each chunk of such an R is a few microseconds of work per thread, so a second thread gains little
    even on idle cores, and on shared cores every OpenMP region waits for a descheduled thread. The 48
    block matrices of GPT-2 small's (1 x 2) layout, on 2 cores at load 4: the Gram pass took 0.58-1.18 s
    on two threads and 0.09-0.12 s on one (cache-sized chunks), the long-factor pass 0.06-0.09 s on one.
    The thread count is fixed by the shape, never by the load, so the factors do not depend on the load.
    """
    return lapack_threads(R) if R.shape[1] <= THIN_COLUMNS else contextlib.nullcontext()


def _gram(R: torch.Tensor) -> torch.Tensor:
    """R^T R in float64, streamed over row chunks so a huge tall R is never copied whole to float64.

    One reused float64 buffer of about _GRAM_CHUNK_ELEMENTS. Cache-sized chunks (1 << 20) are a little
    faster on idle cores, but every chunk is two OpenMP parallel regions, and when other processes
    compete for the cores each region waits for a descheduled thread: on 2 shared cores at load 5 the
    GPT-2-small (1 x 2) layout took 7.0 s with 1 << 20 and 4.0 s with 1 << 22 (3.1 s with 1 << 24).
    """
    p, q = R.shape
    if R.dtype == torch.float64:
        return R.T @ R
    G = torch.zeros(q, q, dtype=torch.float64, device=R.device)
    # Wide R: chunks of several q rows keep each addmm compute-bound rather than re-writing G per chunk.
    step = max(1, _GRAM_CHUNK_ELEMENTS // max(q, 1), min(4 * q, CHUNK_ELEMENTS // max(q, 1)))
    if q <= THIN_COLUMNS:  # run on one thread (_thin): cache-sized chunks
        step = _THIN_CHUNK_ELEMENTS // q
    # The buffer holds chunk^T (q x rows, rows contiguous): MKL runs G += C C^T far faster than C^T C
    # when q is tiny and the rows many.
    buffer = torch.empty(q, min(step, p), dtype=torch.float64, device=R.device)
    for start in range(0, p, step):
        chunk = R[start : start + step]
        converted = buffer[:, : chunk.shape[0]]
        converted.copy_(chunk.T)
        G.addmm_(converted, converted.T)
    return G


def non_finite_problem(W: torch.Tensor) -> str:
    """What is wrong with a matrix whose entries (or their squares) are not finite, counted, and the fix:
    `raise DataError(non_finite_problem(W), where=name)`."""
    nan = int(torch.isnan(W).sum().item()) if W.is_floating_point() else 0
    inf = int(torch.isinf(W).sum().item()) if W.is_floating_point() else 0
    if nan or inf:
        what = f"{nan} NaN and {inf} infinite entries (of {W.numel()})"
        advice = "the weights are corrupt or diverged; re-load or repair them before factorising"
    else:
        what = f"entries too large to square in float64 (max |W| = {W.abs().max().item():.3g})"
        advice = "rescale W before factorising"
    return f"W has {what}; {advice}"


def _scaled_triplets_from_gram(R: torch.Tensor, rank: int, name: str):
    """(U S^(1/2), S, V S^(1/2)) of the leading triplets: sqrt(sigma) folded into the long side in the
    same pass that forms it (R V S^(-1/2)), so the tall factor is written once."""
    with _thin(R):
        return _scaled_triplets_from_gram_impl(R, rank, name)


def _scaled_triplets_from_gram_impl(R: torch.Tensor, rank: int, name: str):
    G = _gram(R)
    with lapack_threads(G):  # the eigensolve and the small q x q steps around it
        if not bool(torch.isfinite(G).all()):
            raise DataError(non_finite_problem(R), where=name)
        if R.dtype == torch.float32 and G.shape[0] >= SINGLE_EIGH_COLUMNS:
            # Half the time of a float64 eigh. The factors' product is R V V^T whatever V's scaling, so the
            # fit depends only on the spanned subspace, and an error theta in it raises the residual by
            # O(theta^2): float32 accuracy here leaves the fit optimal to float32 rounding.
            evals, evecs = torch.linalg.eigh(G.to(torch.float32))
            evals, evecs = evals.to(torch.float64), evecs.to(torch.float64)
        else:
            evals, evecs = torch.linalg.eigh(G)  # ascending
        S = evals.flip(0)[:rank].clamp_min(0).sqrt()
        V = evecs.flip(1)[:, :rank]
        root = S.sqrt()
        inv_root = torch.where(S > 0, 1.0 / torch.where(S > 0, root, torch.ones_like(root)), torch.zeros_like(root))
        right = (V * root).to(R.dtype)
        V_scaled = (V * inv_root).to(R.dtype)
    # The long side in R's own precision: V and S are already accurate, and a float64 copy of a huge R
    # costs more than the whole Gram. Scaling the small V, not the tall product.
    left = R @ V_scaled
    return left, S.to(R.dtype), right


def _triplets_from_gram(R: torch.Tensor, rank: int, name: str = "top_singular_triplets"):
    left, S, right = _scaled_triplets_from_gram(R, rank, name)
    root = S.sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    return left / safe, S, right / safe


def _triplets_randomized(R: torch.Tensor, rank: int, tol: float = 1e-6, max_iter: int = 30):
    """Randomized block power method with a convergence check on the leading singular values."""
    generator = torch.Generator(device=R.device).manual_seed(0)
    q = min(rank + 10, min(R.shape))
    Q = torch.randn(R.shape[1], q, device=R.device, dtype=R.dtype, generator=generator)

    def orthonormal(M):
        with lapack_threads(M):
            return torch.linalg.qr(M)[0]

    Q = orthonormal(R @ Q)
    previous = None
    for _ in range(max_iter):
        Z = orthonormal(R.T @ Q)
        Q = orthonormal(R @ Z)
        small = Q.T @ R
        with lapack_threads(small):
            Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
        top = S[:rank]
        if previous is not None and torch.allclose(top, previous, rtol=tol, atol=0):
            break
        previous = top
    return (Q @ Us)[:, :rank], S[:rank], Vh[:rank].T


def top_singular_triplets(R: torch.Tensor, rank: int, *, scaled: bool = False, name: str = "top_singular_triplets"):
    """(U, S, V) with U: p x r, S: r, V: q x r, the leading singular triplets of R (p x q).

    scaled=True returns (U S^(1/2), S, V S^(1/2)) instead, without an extra pass over the long side.
    A NaN or inf in R raises ValueError naming `name`.
    """
    p, q = R.shape
    if min(p, q) <= GRAM_LIMIT:
        pick = _scaled_triplets_from_gram if scaled else _triplets_from_gram
        if q <= p:
            return pick(R, rank, name)
        V, S, U = pick(R.T, rank, name)
        return U, S, V
    if not bool(torch.isfinite(R).all()):
        raise DataError(non_finite_problem(R), where=name)
    U, S, V = _triplets_randomized(R, rank)
    if scaled:
        root = S.clamp_min(0).sqrt()
        U, V = U * root, V * root
    return U, S, V


def top_singular_values(R: torch.Tensor, rank: int, name: str = "top_singular_values") -> tuple[torch.Tensor, float]:
    """(the leading `rank` singular values of R in float64, ||R||_F^2) without forming any singular vector.

    Short side <= GRAM_LIMIT: one streamed pass for the float64 Gram, whose eigenvalues (eigvalsh, no
    eigenvectors) are the squared singular values and whose trace is ||R||_F^2. Otherwise the randomized
    path. This is what the factor-shape search needs to rank candidates.
    """
    p, q = R.shape
    if min(p, q) <= GRAM_LIMIT:
        tall = R if q <= p else R.T
        with _thin(tall):
            G = _gram(tall)
            if not bool(torch.isfinite(G).all()):
                raise DataError(non_finite_problem(R), where=name)
            with lapack_threads(G):
                evals = torch.linalg.eigvalsh(G)
        return evals.flip(0)[:rank].clamp_min(0).sqrt(), float(G.diagonal().sum().item())
    if not bool(torch.isfinite(R).all()):
        raise DataError(non_finite_problem(R), where=name)
    _, S, _ = _triplets_randomized(R, rank)
    return S.to(torch.float64), float(R.double().pow(2).sum().item())


def truncated_svd(W: torch.Tensor, rank: int):
    """Best rank-`rank` factors (U, V) with W ~ U @ V, sqrt(sigma) on each side; U: m x k, V: k x n.

    float64 W: LAPACK's SVD. Other dtypes, short side <= GRAM_LIMIT: the Gram of the short side in float64
    and its eigensolve (one pass for the Gram, one for the long factor), exact to well below float32
    tolerance and several times faster than LAPACK's gesdd, which also degrades badly when other
    processes compete for the cores. Larger: a randomized subspace iteration.
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise DataError(f"truncated_svd: W must be 2-D, got shape {shape}")
    m, n = W.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise DataError(f"truncated_svd: rank={rank} is out of range for a {m} x {n} matrix; use 1..{min(m, n)}")
    if W.is_complex():
        raise DataError("truncated_svd: W is complex; only real weights are supported")
    out_dtype = W.dtype if W.is_floating_point() else torch.get_default_dtype()
    compute_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wc = W.to(compute_dtype)
    if compute_dtype == torch.float64 and min(m, n) <= GRAM_LIMIT:
        if not bool(torch.isfinite(Wc).all()):
            raise DataError(non_finite_problem(Wc), where="truncated_svd")
        with lapack_threads(Wc):
            U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
        root = S[:rank].sqrt()
        left, right = U[:, :rank] * root, Vh[:rank].T * root
    else:
        left, _, right = top_singular_triplets(Wc, rank, scaled=True, name="truncated_svd")
    return left.to(out_dtype), right.T.contiguous().to(out_dtype)
