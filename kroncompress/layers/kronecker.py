"""Kronecker-factored layers: W = sum_i A_i (x) B_i, applied without building W."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from kroncompress.errors import DataError
from kroncompress.layers.base import FactorizedLinear
from kroncompress.linalg.kronecker import kron_matmul, kron_matmul_flops, kron_sum


def _stacked(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    given = f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
    if A.dim() == 2 and B.dim() == 2:
        A, B = A.unsqueeze(0), B.unsqueeze(0)
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0]:
        raise DataError(
            f"Kronecker factors must be (m1, n1) and (m2, n2), or stacked (r, m1, n1) and (r, m2, n2) with the "
            f"same r; {given}"
        )
    return A, B


class KroneckerLinear(FactorizedLinear):
    """Drop-in for nn.Linear / Conv1D with W (out x in) = sum_{i<r} A_i (x) B_i.

    a: (r, m1, n1), b: (r, m2, n2), out = m1 m2, in = n1 n2. Forward is two batched GEMMs over the
    stacked factors (see kron_matmul), in whichever order costs fewer FLOPs.

    `forward_mode` (see FactorizedLinear): "dense" suits many-term sums of balanced factors, which cost
    more FLOPs per token than the dense matrix (benchmarks/results/layers.md).
    """

    FACTOR_AXES = {"a": 2, "b": 2}  # quantization axis of each factor (kc.quantize): the input side
    order: str | None = None  # None: the cheaper of "b_first" / "a_first" by FLOPs (see kron_matmul)

    def __init__(self, a_shape, b_shape, rank: int = 1, bias: bool = True, layout: str = "linear", device=None, dtype=None):
        (m1, n1), (m2, n2) = a_shape, b_shape
        super().__init__(n1 * n2, m1 * m2, bias, layout, device, dtype)
        self.rank = rank
        self.a = nn.Parameter(torch.empty(rank, m1, n1, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.empty(rank, m2, n2, device=device, dtype=dtype))
        if self.a.device.type != "meta":
            nn.init.normal_(self.a, std=(1.0 / (n1 * rank)) ** 0.5)
            nn.init.normal_(self.b, std=(1.0 / n2) ** 0.5)

    @classmethod
    def from_factors(cls, A, B, bias=None, layout: str = "linear") -> "KroneckerLinear":
        A, B = _stacked(A, B)
        layer = cls(tuple(A.shape[1:]), tuple(B.shape[1:]), A.shape[0], bias is not None, layout, "meta", A.dtype).to_empty(device=A.device)
        with torch.no_grad():
            layer.a.copy_(A)
            layer.b.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def weight_matmul(self, x):
        return kron_matmul(x, self.a, self.b, order=self.order)

    def factored_forward(self, x):  # the bias rides on the last GEMM (see kron_matmul)
        return kron_matmul(x, self.a, self.b, self.bias, order=self.order)

    def dense_weight(self):
        return kron_sum(self.a, self.b)

    def spec(self):
        return {"a_shape": list(self.a.shape[1:]), "b_shape": list(self.b.shape[1:]), "rank": self.rank}

    def flops_per_token(self):
        return kron_matmul_flops(tuple(self.a.shape[1:]), tuple(self.b.shape[1:]), self.rank)


class KroneckerEmbedding(nn.Module):
    """Drop-in for nn.Embedding with table E (vocab x dim) = sum_i A_i (x) B_i; lookups stay lookups.

    Token t = i1 * V2 + i2 reads row sum_i A_i[i1] (x) B_i[i2], so a batch costs O(r * dim) per token and
    the table is never built. `project(h)` computes h E^T through the same factors: the tied LM head.
    `scale` multiplies the looked-up rows only (Gemma's embeddings return sqrt(d) * E[t]; its tied head
    uses E itself): the surgery copies it from the module it replaces, so it is not saved.
    """

    FACTOR_AXES = {"a": 2, "b": 2}  # one scale per table row of each factor (kc.quantize)
    scale: float = 1.0

    def __init__(self, a_shape, b_shape, rank: int = 1, padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        (v1, d1), (v2, d2) = a_shape, b_shape
        self.num_embeddings, self.embedding_dim = v1 * v2, d1 * d2
        self.rank, self.padding_idx = rank, padding_idx
        self.a = nn.Parameter(torch.empty(rank, v1, d1, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.empty(rank, v2, d2, device=device, dtype=dtype))
        if self.a.device.type != "meta":
            nn.init.normal_(self.a, std=(1.0 / rank) ** 0.5)
            nn.init.normal_(self.b)

    @classmethod
    def from_factors(cls, A, B, padding_idx=None) -> "KroneckerEmbedding":
        A, B = _stacked(A, B)
        layer = cls(tuple(A.shape[1:]), tuple(B.shape[1:]), A.shape[0], padding_idx, "meta", A.dtype).to_empty(device=A.device)
        with torch.no_grad():
            layer.a.copy_(A)
            layer.b.copy_(B)
        return layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        v2 = self.b.shape[1]
        ids = input_ids.reshape(-1)
        rows_a = F.embedding(ids // v2, self.a.permute(1, 0, 2).reshape(self.a.shape[1], -1))  # (N, r*d1)
        rows_b = F.embedding(ids % v2, self.b.permute(1, 0, 2).reshape(v2, -1))  # (N, r*d2)
        n, r = ids.numel(), self.rank
        rows = torch.einsum("nri,nrj->nij", rows_a.view(n, r, -1), rows_b.view(n, r, -1))
        rows = rows.reshape(*input_ids.shape, self.embedding_dim)
        return rows * torch.tensor(self.scale, dtype=rows.dtype) if self.scale != 1.0 else rows

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ E^T: logits through the factors (E is vocab x dim, i.e. an out x in weight)."""
        return kron_matmul(hidden, self.a, self.b)

    def dense_weight(self) -> torch.Tensor:
        return kron_sum(self.a, self.b)

    @torch.no_grad()
    def to_dense(self) -> nn.Embedding:
        weight = self.dense_weight()
        kind = nn.Embedding if self.scale == 1.0 else partial(ScaledEmbedding, scale=self.scale)
        dense = kind(*weight.shape, padding_idx=self.padding_idx, device=weight.device, dtype=weight.dtype)
        dense.weight.copy_(weight)
        return dense

    def spec(self):
        return {"a_shape": list(self.a.shape[1:]), "b_shape": list(self.b.shape[1:]), "rank": self.rank}

    @property
    def num_params(self) -> int:
        return self.a.numel() + self.b.numel()

    def flops_per_token(self) -> int:
        return 2 * self.rank * self.embedding_dim

    def projection_flops_per_token(self) -> int:
        return kron_matmul_flops(tuple(self.a.shape[1:]), tuple(self.b.shape[1:]), self.rank)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec()}"


class ScaledEmbedding(nn.Embedding):
    """nn.Embedding returning scale * E[t] (the dense form of a scaled KroneckerEmbedding; its state dict is
    an nn.Embedding's, so the model's own scaled embedding class reloads it)."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(input_ids)
        return rows * torch.tensor(self.scale, dtype=rows.dtype)


class KroneckerTiedHead(nn.Module):
    """An LM head tied to a KroneckerEmbedding: logits = h E^T (+ bias), sharing the embedding's factors."""

    def __init__(self, embedding: KroneckerEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        self.embedding = [embedding]  # a list, so the factors are not registered twice as parameters
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def tied_to(self) -> KroneckerEmbedding:
        return self.embedding[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return kron_matmul(hidden, self.tied_to.a, self.tied_to.b, self.bias)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        weight = self.tied_to.dense_weight()
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        dense.weight.copy_(weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense
