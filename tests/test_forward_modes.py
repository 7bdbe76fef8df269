"""forward_mode ("factored" / "dense") and contraction orders of every factorised layer: all give x W^T + b,
and the mode is an option saved with the plan."""

from __future__ import annotations

import itertools

import pytest
import torch

import kroncompress as kc


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _layers(dtype):
    """name -> (layer, {order name: a function setting that contraction order on the layer})."""
    torch.manual_seed(0)
    kron = kc.KroneckerLinear((4, 6), (3, 2), rank=3, dtype=dtype)
    tucker = kc.TuckerLinear((4, 6), (5, 6), (2, 3, 3, 4), dtype=dtype)
    tt = kc.TTLinear((2, 3, 4), (2, 3, 5), (3, 4), dtype=dtype)
    tucker_orders = {f"in {i} out {o}": (lambda layer, i=i, o=o: setattr(layer, "_orders", (i, o)))
                     for i, o in itertools.product(itertools.permutations(range(2)), repeat=2)}
    return {
        "lowrank": (kc.LowRankLinear(30, 24, rank=5, dtype=dtype), {"only": lambda layer: None}),
        "kronecker": (kron, {o: (lambda layer, o=o: setattr(layer, "order", o)) for o in (None, "b_first", "a_first")}),
        "tucker": (tucker, tucker_orders),
        "cp": (kc.CPLinear((4, 6), (5, 6), rank=3, dtype=dtype), {"only": lambda layer: None}),
        "tt": (tt, {f"right_to_left={r}": (lambda layer, r=r: setattr(layer, "_right_to_left", r)) for r in (True, False)}),
    }


CASES = [(name, order) for name, (_, orders) in _layers(torch.float64).items() for order in orders]


def forward_tol(dtype: torch.dtype, n: int) -> float:
    """Relative to the largest |y|: two orders of a length-n dot product differ by at most n eps of the sum of
    |x_i w_i|, a few times the largest |y| for Gaussian data (4x margin); a factored product chains a few such
    sums (at most 3 stages here), hence 3x more."""
    return 3 * 4 * n * torch.finfo(dtype).eps


@pytest.mark.parametrize("mode", ["factored", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,order", CASES)
def test_every_order_and_mode_computes_x_w_transposed(name, order, dtype, mode):
    layer, orders = _layers(dtype)[name]
    orders[order](layer)
    layer.forward_mode = mode
    with torch.no_grad():
        layer.bias.normal_()
    x = randn(2, 5, layer.in_features, dtype=dtype, seed=3)
    with torch.no_grad():
        got = layer(x)
        expected = x @ layer.dense_weight().T + layer.bias
    assert got.shape == (2, 5, layer.out_features) and got.dtype == dtype
    assert (got - expected).abs().max() <= forward_tol(dtype, layer.in_features) * expected.abs().max()


@pytest.mark.parametrize("name", sorted(_layers(torch.float64)))
def test_dense_mode_caches_w_until_a_factor_changes(name):
    layer = _layers(torch.float64)[name][0]
    layer.forward_mode = "dense"
    x = randn(3, layer.in_features, seed=4)
    calls = []
    build = layer.dense_weight
    layer.dense_weight = lambda: calls.append(1) or build()
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first) and len(calls) == 1  # built once
        next(p for n, p in layer.named_parameters() if n != "bias").mul_(2)
        second = layer(x)
    assert len(calls) == 2 and not torch.allclose(second, first)  # the in-place update rebuilt W


@pytest.mark.parametrize("name", sorted(_layers(torch.float64)))
def test_dense_mode_trains_the_factors(name):
    layer = _layers(torch.float64)[name][0]
    layer.forward_mode = "dense"
    layer(randn(3, layer.in_features, seed=5)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_unknown_forward_mode_is_refused_by_layer_and_option():
    layer = kc.LowRankLinear(4, 4, rank=2)
    layer.forward_mode = "fast"
    with pytest.raises(ValueError, match="forward_mode"):
        layer(torch.randn(1, 4))
    with pytest.raises(ValueError, match="forward_mode"):
        kc.get_strategy("svd")(rank=2, forward_mode="fast")


STRATEGY_OPTIONS = {
    "svd": {"rank": 2},
    "kronecker": {"b_shape": [1, 2]},
    "tucker": {"ratio": 2},
    "cp": {"rank": 2},
    "tt": {"ratio": 2},
}


@pytest.mark.parametrize("strategy", sorted(STRATEGY_OPTIONS))
def test_forward_mode_is_saved_and_reloaded(strategy, tiny_model, tiny_inputs, tmp_path):
    from conftest import logits, recipe_of

    model = tiny_model("gpt2")
    options = {**STRATEGY_OPTIONS[strategy], "forward_mode": "dense"}
    kc.compress(model, recipe_of((["re:.*\\.mlp\\.c_fc"], strategy, options)))
    layers = [m for m in model.modules() if isinstance(m, kc.FactorizedLinear)]
    assert layers and all(m.forward_mode == "dense" for m in layers)
    loaded = kc.load_compressed(kc.save_compressed(model, tmp_path / "out"))
    reloaded = [m for m in loaded.modules() if isinstance(m, kc.FactorizedLinear)]
    assert len(reloaded) == len(layers) and all(m.forward_mode == "dense" for m in reloaded)
    inputs = tiny_inputs("gpt2")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs))


def _wide_tucker(dtype):
    return kc.TuckerLinear((16, 16), (8, 32), (8, 8, 8, 16), dtype=dtype), {"wide": lambda layer: None}


@pytest.mark.parametrize("name,order", CASES + [("tucker-wide", "wide")])
def test_frozen_and_trainable_copies_give_the_same_bits(name, order):
    """A frozen copy (under a LoRA adapter) and a trainable one (just loaded) of one layer agree exactly: the
    kernels must not depend on requires_grad (torch.matmul's 2-D @ 3-D does, hence bmm in the Tucker path;
    the wide Tucker is a shape where matmul's two kernels differ in the last bit)."""
    torch.manual_seed(0)
    layer, orders = _wide_tucker(torch.float32) if name == "tucker-wide" else _layers(torch.float32)[name]
    orders[order](layer)
    x = randn(4, 16, layer.in_features, dtype=torch.float32, seed=5)
    with torch.no_grad():
        trainable = layer(x)
        layer.requires_grad_(False)
        frozen = layer(x)
    assert torch.equal(frozen, trainable)
