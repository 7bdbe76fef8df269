"""bench_hybrid: low rank + Kronecker at equal parameters (the benchmark's solver, on matrices with known structure)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from kroncompress.linalg.kronecker import kron_sum
from kroncompress.linalg.whitening import damp, output_error, second_moment, whitened_svd


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("bench_hybrid")


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(32, 2, dtype=torch.float64, generator=g) @ torch.randn(2, 32, dtype=torch.float64, generator=g)
    kron = kron_sum(torch.randn(1, 8, 8, dtype=torch.float64, generator=g), torch.randn(1, 4, 4, dtype=torch.float64, generator=g))
    X = torch.randn(400, 32, dtype=torch.float64, generator=g) @ torch.randn(32, 32, dtype=torch.float64, generator=g)
    return low_rank + kron, damp(second_moment(X), 0.01)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25, 0.0])
def test_every_split_stays_within_half_the_parameters(bench, fraction):
    W, C = problem()
    row = bench.hybrid(W, C, fraction, max_rank=4, rounds=2)
    assert 0 < row["params"] <= W.numel() // 2
    assert 0 <= row["oerr"] <= 1


def test_all_rank_is_whitened_svd(bench):
    W, C = problem()
    U, V = whitened_svd(W, C, 8)  # 8 x (32 + 32) = half of 32 x 32
    assert bench.hybrid(W, C, 1.0, max_rank=4, rounds=2)["oerr"] == output_error(W, U @ V, C)


def test_a_low_rank_plus_kronecker_matrix_is_found_where_rank_alone_fails(bench):
    # rank 2 + one full-rank (8x8)(x)(4x4) term: within budget for the hybrid, beyond rank 8 for SVD
    W, C = problem()
    svd = bench.hybrid(W, C, 1.0, max_rank=4, rounds=4)["oerr"]
    mixed = bench.hybrid(W, C, 0.25, max_rank=4, rounds=4)["oerr"]
    assert svd > 0.1
    assert mixed < 0.25 * svd  # 0.04 vs 0.23 here; the alternation converges slowly, so not to 0
