"""Drop-in factorized modules."""

from kroncompress.layers.base import FactorizedLinear, dense_weight_of, make_dense
from kroncompress.layers.kronecker import KroneckerEmbedding, KroneckerLinear, KroneckerTiedHead
from kroncompress.layers.lowrank import LowRankLinear

__all__ = [
    "FactorizedLinear", "KroneckerEmbedding", "KroneckerLinear", "KroneckerTiedHead", "LowRankLinear",
    "dense_weight_of", "make_dense",
]
