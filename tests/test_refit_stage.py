"""The refit stage of compress (kroncompress/refit.py): the free factor re-solved on the statistics."""

from __future__ import annotations

import pytest
import torch

import kroncompress as kc
from conftest import assert_reloads
from kroncompress.linalg.svd import truncated_svd
from kroncompress.linalg.whitening import damp, output_error
from kroncompress.refit import refit_layer

MLP = ["re:transformer\\.h\\.\\d+\\.mlp\\.c_(fc|proj)"]


def _run(tiny_model, strategy, options, refit, tmp_path=None):
    model = tiny_model("gpt2")
    recipe = kc.Recipe.from_dict({"version": 1, "name": "r", "compress": [
        {"targets": MLP, "strategy": strategy, "options": options}]})
    names = [row.name for row in kc.plan(model, recipe).rows]
    blocks = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    stats = kc.collect_statistics(model, blocks, names)
    report = kc.compress(model, recipe, calibration=stats, refit=refit)
    return model, report


@pytest.mark.parametrize("strategy,options", [
    ("svd", {"ratio": 2, "init": "svd"}),
    ("kronecker", {"ratio": 2, "init": "nkp"}),
])
def test_the_stage_reports_the_error_before_and_after(tiny_model, strategy, options):
    _, plain = _run(tiny_model, strategy, options, refit=False)
    _, refitted = _run(tiny_model, strategy, options, refit=True)
    for a, b in zip(plain.rows, refitted.rows):
        assert a.output_error_before_refit is None and a.output_error is not None  # scored even when weight-only
        assert b.output_error_before_refit == pytest.approx(a.output_error, rel=1e-5)
        assert b.output_error <= b.output_error_before_refit
        assert "refit: output error" in b.note


def _correlated(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g) @ torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)
    return damp(X.double().T @ X.double())


@pytest.mark.parametrize("kind", ["lowrank", "kronecker"])
def test_refit_mends_weight_only_factors(kind):
    W = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    C = _correlated(32)
    if kind == "lowrank":
        U, V = truncated_svd(W, 6)
        layer = kc.LowRankLinear.from_factors(U, V)
    else:
        A, B = kc.nearest_kronecker(W, (6, 8), (4, 4), rank=2)
        layer = kc.KroneckerLinear.from_factors(A, B)
    expected_before = output_error(W, layer.dense_weight().detach(), C)
    before, after = refit_layer(layer, W, C)
    assert before == pytest.approx(expected_before, rel=1e-4)
    assert after < 0.99 * before  # weight-only factors are far from output-optimal under this anisotropic C
    assert after == pytest.approx(output_error(W, layer.dense_weight().detach(), C), rel=1e-4)


def test_refit_never_worsens_a_data_aware_init_and_round_trips(tiny_model, tmp_path):
    model, report = _run(tiny_model, "svd", {"ratio": 2, "init": "whitened"}, refit=True)
    for row in report.rows:  # the whitened SVD's U is already the least-squares U for its V
        assert row.output_error <= row.output_error_before_refit
        assert row.output_error == pytest.approx(row.output_error_before_refit, rel=1e-4)
    assert_reloads(model, tmp_path / "out")


def test_refit_can_be_switched_off_in_the_recipe():
    recipe = kc.Recipe.from_dict({"version": 1, "name": "r", "calibration": {"refit": False},
                                  "compress": [{"targets": MLP, "strategy": "svd", "options": {"ratio": 2}}]})
    assert recipe.calibration.refit is False and kc.Recipe.from_dict(recipe.to_dict()).calibration.refit is False
    with pytest.raises(ValueError, match="calibration.refit"):
        kc.Recipe.from_dict({"version": 1, "name": "r", "calibration": {"refit": "yes"},
                             "compress": [{"targets": MLP, "strategy": "svd", "options": {"ratio": 2}}]})
