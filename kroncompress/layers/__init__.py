"""Drop-in factorized modules."""

from kroncompress.layers.base import FactorizedLinear, dense_weight_of, make_dense
from kroncompress.layers.kronecker import KroneckerEmbedding, KroneckerLinear, KroneckerTiedHead
from kroncompress.layers.lowrank import LowRankLinear
from kroncompress.layers.cp import CPLinear
from kroncompress.layers.tt import TTLinear
from kroncompress.layers.tucker import TuckerLinear

__all__ = [
    "CPLinear", "FactorizedLinear", "TTLinear", "TuckerLinear",
    "KroneckerEmbedding", "KroneckerLinear", "KroneckerTiedHead", "LowRankLinear",
    "dense_weight_of", "make_dense",
]
