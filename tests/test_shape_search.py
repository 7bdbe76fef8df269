"""The Kronecker shape search with rank "auto" against its own one-term candidates."""

from __future__ import annotations

import pytest
import torch

from kroncompress.linalg.shapes import kronecker_shapes
from kroncompress.linalg.whitening import damp


@pytest.mark.parametrize("seed", range(3))
def test_auto_terms_never_lose_to_the_measured_one_term_layout(seed):
    """W is exactly one Kronecker product, (24 x 64) (x) (2 x 1); the many-term search, held to one candidate
    layout of its own ((48 x 16) (x) (1 x 4), two terms, which cannot represent W), must still return the exact
    one-term fit rather than its own."""
    g = torch.Generator().manual_seed(seed)
    m, n = 48, 64
    A = torch.randn(24, 64, generator=g, dtype=torch.float64)
    B = torch.randn(2, 1, generator=g, dtype=torch.float64)
    W = torch.kron(A, B)
    X = torch.randn(2000, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    C = damp(X.T @ X)
    single = kronecker_shapes(m, n, ratio=2.0, rank=1, weight=W, stats=C)
    auto = kronecker_shapes(m, n, ratio=2.0, rank="auto", weight=W, stats=C, max_candidates=1)
    assert single[0].score == pytest.approx(1.0) and single[0].a_shape == (24, 64)
    assert kronecker_shapes(m, n, ratio=2.0, rank="auto", max_candidates=1)[0].b_shape == (1, 4)
    assert auto[0].fit is not None and auto[0].score >= single[0].score - 1e-9
