"""The drop-in layers themselves: KroneckerLinear, LowRankLinear, KroneckerEmbedding, KroneckerTiedHead."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import kroncompress as kc


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def kronecker_layer(layout, bias, dtype):
    A, B = randn(3, 4, 6, dtype=dtype), randn(3, 2, 2, dtype=dtype, seed=1)
    return kc.KroneckerLinear.from_factors(A, B, randn(8, dtype=dtype, seed=2) if bias else None, layout)


def lowrank_layer(layout, bias, dtype):
    U, V = randn(8, 3, dtype=dtype), randn(3, 12, dtype=dtype, seed=1)
    return kc.LowRankLinear.from_factors(U, V, randn(8, dtype=dtype, seed=2) if bias else None, layout)


LAYER_FACTORIES = {"kronecker": kronecker_layer, "lowrank": lowrank_layer}
DENSE_CLASS = {"linear": nn.Linear, "conv1d": Conv1D}


def forward_tol(dtype: torch.dtype, n: int) -> float:
    """Relative to the largest output: two orders of a length-n dot product differ by at most n eps of the
    sum of |x_i w_i|, a few times the largest |y| for Gaussian inputs (4x margin)."""
    return 4 * n * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("name", sorted(LAYER_FACTORIES))
def test_layer_matches_its_dense_module(name, layout, bias, dtype):
    layer = LAYER_FACTORIES[name](layout, bias, dtype)
    x = randn(2, 5, layer.in_features, dtype=dtype, seed=3)
    dense = layer.to_dense()
    assert type(dense) is DENSE_CLASS[layout]
    if layout == "conv1d":
        assert tuple(dense.weight.shape) == (layer.in_features, layer.out_features)
    y = layer(x)
    assert y.shape == (2, 5, layer.out_features) and y.dtype == dtype
    bound = forward_tol(dtype, layer.in_features) * y.abs().max()
    assert (y - dense(x)).abs().max() <= bound
    assert (y - (x @ layer.dense_weight().T + (layer.bias if bias else 0))).abs().max() <= bound


@pytest.mark.parametrize("name", sorted(LAYER_FACTORIES))
def test_forward_never_builds_the_dense_weight(name, monkeypatch):
    layer = LAYER_FACTORIES[name]("linear", True, torch.float32)
    monkeypatch.setattr(layer, "dense_weight", lambda: pytest.fail("forward built the dense weight"))
    monkeypatch.setattr(kc.layers.kronecker, "kron_sum", lambda *a: pytest.fail("forward called kron_sum"))
    layer(randn(3, layer.in_features, dtype=torch.float32))


@pytest.mark.parametrize("name,expected_params,expected_flops", [
    # kronecker: 3 terms of A (4 x 6) and B (2 x 2) + bias 8; flops = 2 r min(n1 m2 (n2 + m1), m1 n2 (n1 + m2))
    ("kronecker", 3 * (24 + 4) + 8, 2 * 3 * min(6 * 2 * (2 + 4), 4 * 2 * (6 + 2))),
    # lowrank: U (8 x 3) + V (3 x 12) + bias 8; flops = 2 k (in + out)
    ("lowrank", 24 + 36 + 8, 2 * 3 * (12 + 8)),
])
def test_parameter_and_flop_counts(name, expected_params, expected_flops):
    layer = LAYER_FACTORIES[name]("linear", True, torch.float64)
    assert layer.num_params == expected_params
    assert layer.flops_per_token() == expected_flops
    assert layer.dense_flops_per_token() == 2 * 8 * 12


@pytest.mark.parametrize("name", sorted(LAYER_FACTORIES))
def test_backward_reaches_every_parameter(name):
    layer = LAYER_FACTORIES[name]("conv1d", True, torch.float32)
    layer(randn(4, layer.in_features, dtype=torch.float32)).pow(2).sum().backward()
    for param_name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_meta_device_layers_are_empty_shells():
    layer = kc.KroneckerLinear((4, 6), (2, 2), rank=3, device="meta")
    assert layer.a.is_meta and layer.num_params == 3 * 28 + 8


# --- embedding and tied head ----------------------------------------------------------------------
EMBEDDING_FACTORS = [((8, 3), (4, 2), 1), ((16, 4), (2, 1), 2), ((4, 2), (8, 3), 3)]


def embedding(a_shape, b_shape, rank, dtype=torch.float64):
    A, B = randn(rank, *a_shape, dtype=dtype), randn(rank, *b_shape, dtype=dtype, seed=1)
    return kc.KroneckerEmbedding.from_factors(A, B)


@pytest.mark.parametrize("a_shape,b_shape,rank", EMBEDDING_FACTORS)
def test_embedding_lookup_equals_dense_rows(a_shape, b_shape, rank):
    layer = embedding(a_shape, b_shape, rank)
    vocab = a_shape[0] * b_shape[0]
    ids = torch.tensor([[0, vocab - 1, 5], [3, 3, vocab // 2]])
    table = layer.dense_weight()
    assert table.shape == (vocab, a_shape[1] * b_shape[1])
    assert torch.allclose(layer(ids), table[ids], atol=1e-12)
    dense = layer.to_dense()
    assert type(dense) is nn.Embedding and torch.allclose(dense(ids), layer(ids), atol=1e-12)
    assert layer.num_params == rank * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])


@pytest.mark.parametrize("a_shape,b_shape,rank", EMBEDDING_FACTORS)
def test_embedding_projection_is_h_times_table_transposed(a_shape, b_shape, rank):
    layer = embedding(a_shape, b_shape, rank)
    hidden = randn(2, 3, layer.embedding_dim, seed=4)
    assert torch.allclose(layer.project(hidden), hidden @ layer.dense_weight().T, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_tied_head_shares_the_embedding_factors(with_bias):
    emb = embedding((8, 3), (4, 2), 2, dtype=torch.float32)
    bias = randn(32, dtype=torch.float32, seed=5) if with_bias else None
    head = kc.KroneckerTiedHead(emb, bias)
    own = {id(p) for p in head.parameters()}
    assert id(emb.a) not in own and id(emb.b) not in own  # not registered twice
    hidden = randn(5, 6, dtype=torch.float32, seed=6)
    dense_head = head.to_dense()
    assert torch.allclose(head(hidden), dense_head(hidden), atol=1e-5)

    ids = torch.arange(32)
    before = emb(ids).detach().clone()
    optimizer = torch.optim.SGD(list(emb.parameters()) + list(head.parameters()), lr=0.1)
    head(hidden).pow(2).mean().backward()
    assert emb.a.grad is not None and emb.b.grad is not None
    optimizer.step()
    assert not torch.allclose(emb(ids), before)
    assert torch.allclose(head(hidden), hidden @ emb.dense_weight().T + (head.bias if with_bias else 0), atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------
BAD = [
    (lambda: kc.KroneckerLinear.from_factors(randn(2, 3, 4), randn(3, 2, 2)), ["(2, 3, 4)", "(3, 2, 2)", "same r"]),
    (lambda: kc.KroneckerLinear.from_factors(randn(3, 4), randn(2, 2, 2, 2)), ["(3, 4)", "(2, 2, 2, 2)"]),
    (lambda: kc.LowRankLinear.from_factors(randn(8, 3), randn(4, 12)), ["(8, 3)", "(4, 12)", "U (out, k)"]),
    (lambda: kc.KroneckerLinear((2, 2), (2, 2), layout="conv2d"), ["conv2d", "linear"]),
]


@pytest.mark.parametrize("call,fragments", BAD)
def test_bad_factors_name_the_problem(call, fragments):
    with pytest.raises(ValueError) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


@pytest.mark.parametrize("mode", ["factored", "dense"])
def test_kronecker_linear_forward_modes_agree(mode):
    torch.manual_seed(0)
    layer = kc.KroneckerLinear.from_factors(torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64),
                                         bias=torch.randn(20, dtype=torch.float64))
    x = torch.randn(7, 12, dtype=torch.float64)
    expected = x @ layer.dense_weight().T + layer.bias
    layer.forward_mode = mode
    assert torch.allclose(layer(x), expected)


def test_kronecker_linear_rejects_an_unknown_forward_mode():
    layer = kc.KroneckerLinear((2, 2), (2, 2))
    layer.forward_mode = "fast"
    with pytest.raises(ValueError, match="forward_mode"):
        layer(torch.randn(1, 4))


# --- torch.compile: every factorized layer traces as one graph (no graph breaks) ---------------------
def _compile_cases():
    torch.manual_seed(0)
    return {
        "kronecker (1 x 2)": kc.KroneckerLinear((12, 4), (1, 2), rank=1),
        "kronecker r=3": kc.KroneckerLinear((4, 2), (3, 4), rank=3),
        "lowrank": kc.LowRankLinear(8, 12, rank=3),
        "tucker": kc.TuckerLinear((3, 4), (2, 4), (2, 2, 2, 2)),
        "cp": kc.CPLinear((3, 4), (2, 4), rank=3),
        "tt": kc.TTLinear((3, 4), (2, 4), (2,)),
    }


@pytest.mark.parametrize("name", list(_compile_cases()))
def test_layers_compile_without_graph_breaks(name):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without a C++ build
    (the inductor backend works too, benchmarks/bench_speed.py --compile, but takes minutes on 2 CPU cores)."""
    torch._dynamo.reset()
    layer = _compile_cases()[name]
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    expected = layer(x)
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


# --- torch.compile of a whole compressed model ------------------------------------------------------
@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported on this platform")
def test_compiled_compressed_model_gives_the_same_logits_and_generation(tiny_model, tiny_inputs):
    """A compressed GPT-2 under torch.compile (aot_eager: dynamo's whole tracing, no C++ build; bench_speed.py
    --compile times inductor) computes the eager logits, and generates the same tokens."""
    from conftest import recipe_of

    torch._dynamo.reset()
    model = tiny_model("gpt2")
    kc.compress(model, recipe_of((["re:.*\\.(attn|mlp)\\..*"], "kronecker", {"b_shape": [1, 2]})))
    assert any(isinstance(m, kc.FactorizedLinear) for m in model.modules())
    inputs = tiny_inputs("gpt2")
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="aot_eager")  # generate() calls it too
    with torch.no_grad():
        expected, got = model(**inputs).logits, compiled(**inputs).logits
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=4 * model.config.n_embd * torch.finfo(torch.float32).eps * scale)
    prompt = inputs["input_ids"][:1, :4]
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(compiled.generate(prompt, **settings), model.generate(prompt, **settings))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames  # generation ran the compiled forward
