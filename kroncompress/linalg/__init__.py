"""Pure tensor math: no nn.Module here."""

from kroncompress.linalg.kronecker import kron_matmul, kron_rearrange, kron_sum, nearest_kronecker
from kroncompress.linalg.shapes import KroneckerShape, energy_kept, kronecker_shapes
from kroncompress.linalg.svd import top_singular_triplets, truncated_svd

__all__ = [
    "KroneckerShape", "energy_kept", "kron_matmul", "kron_rearrange", "kron_sum", "kronecker_shapes",
    "nearest_kronecker", "top_singular_triplets", "truncated_svd",
]
