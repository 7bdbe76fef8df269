"""benchmarks/bench_allocation.py's cell keys and benchmarks/bench_recovery.py's factor rebalancing: a key
reads back to the same cell and a bad one is refused by name; rebalancing leaves every layer's function
unchanged and gives each term's two factors entries of the same RMS."""

from __future__ import annotations

import pytest
import torch

from conftest import import_benchmark
from kroncompress.layers.kronecker import KroneckerLinear
from kroncompress.layers.lowrank import LowRankLinear


@pytest.fixture(scope="module")
def allocation():
    return import_benchmark("bench_allocation")


@pytest.fixture(scope="module")
def recovery():
    return import_benchmark("bench_recovery")


@pytest.mark.parametrize("key", ["svd|uniform|parallel|refit|2/3|0", "kronecker|global|sequential|norefit|1/2|12",
                                 "mixed|global-s1|parallel|refit|80%|40"])
def test_cell_key_round_trip(allocation, key):
    assert allocation.Cell.parse(key).key == key


@pytest.mark.parametrize("key, word", [("svd|uniform|parallel|refit|3/4|0", "3/4"),
                                       ("tucker|global|parallel|refit|1/2|0", "tucker"),
                                       ("mixed|uniform|parallel|refit|1/2|0", "only with a global")])
def test_bad_cell_key_is_named(allocation, key, word):
    with pytest.raises(SystemExit, match="--cells") as caught:
        allocation.Cell.parse(key)
    assert word in str(caught.value)


def _rms(t: torch.Tensor, dims) -> torch.Tensor:
    return t.pow(2).mean(dims).sqrt()


def test_rms_balance_keeps_the_function_and_equalises_entries(recovery):
    torch.manual_seed(0)
    kron = KroneckerLinear((4, 2), (8, 16), 3, bias=True)
    low = LowRankLinear(24, 40, 5, bias=False)
    with torch.no_grad():  # deliberately unbalanced: one factor 100x the other
        kron.a.mul_(100.0)
        low.v.mul_(0.01)
    model = torch.nn.ModuleList([kron, low])
    before = [kron.dense_weight().detach().clone(), low.dense_weight().detach().clone()]
    assert recovery.rms_balance(model) == 2
    after = [kron.dense_weight().detach(), low.dense_weight().detach()]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    torch.testing.assert_close(_rms(kron.a, (1, 2)), _rms(kron.b, (1, 2)))
    torch.testing.assert_close(_rms(low.u, 0), _rms(low.v, 1))
