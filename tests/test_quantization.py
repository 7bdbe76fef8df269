"""Weight-only int8 / int4 of the factors (kc.quantize): the rounding bound, bit-exact save/load through both
loaders, forward error within what the quantization step allows, bytes counted by plan and report, and
clear errors for bad settings and for models another quantizer touched."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

import kroncompress as kc
from kroncompress.cli.main import cli
from kroncompress.layers import KroneckerLinear, LowRankLinear, TTLinear, TuckerLinear, CPLinear
from kroncompress.layers.quantized import QuantizedTensor, quantize_tensors
from kroncompress.linalg.quantize import dequantize_symmetric, pack_int4, quantize_symmetric, unpack_int4
from kroncompress.quantization import QuantizationError, check_foreign_quantization, weight_bytes

from conftest import build_inputs, build_tiny, logits, recipe_of

EPS = torch.finfo(torch.float32).eps


# (8, 3, 1) and (4, 5, 0): group sizes that do not divide the axis (8 and 6 long), so the last group is shorter
@pytest.mark.parametrize("bits, group_size, axis", [(8, None, -1), (8, 4, 1), (4, None, 0), (4, 2, 2), (8, None, 1),
                                                    (8, 3, 1), (4, 5, 0), (4, 3, -1)])
def test_every_entry_is_within_half_a_step_of_its_original(bits, group_size, axis):
    torch.manual_seed(0)
    w = torch.randn(6, 8, 4) * torch.logspace(-3, 1, 4)  # channels of very different magnitudes
    w[0] = 0  # an all-zero channel has scale 0 and reads back as 0
    qdata, scale = quantize_symmetric(w, bits, group_size, axis)
    back = dequantize_symmetric(qdata, scale, tuple(w.shape), bits, group_size, axis)
    length = w.shape[axis]
    g = min(group_size or length, length)
    assert scale.shape[axis] == math.ceil(length / g)
    # each entry's own scale: entry j of the axis belongs to group j // g
    step = scale.index_select(axis % w.dim(), torch.arange(length) // g)
    assert back.shape == w.shape and torch.equal(back[0], torch.zeros_like(back[0]))
    # |q s - w| <= s / 2, up to the rounding of w / s and q * s in float32
    assert bool(((back - w).abs() <= step / 2 + 4 * EPS * w.abs()).all())
    qmax = 2 ** (bits - 1) - 1
    ints = qdata if bits == 8 else unpack_int4(qdata, w.numel())
    assert int(ints.abs().max()) == qmax  # the largest entry of a group uses the whole range


def test_int4_packs_two_values_per_byte_and_unpacks_them():
    values = torch.arange(-7, 8, dtype=torch.int8)  # odd count: one padding nibble
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 8
    assert torch.equal(unpack_int4(packed, values.numel()), values)


def _layers():
    torch.manual_seed(0)
    return [
        LowRankLinear(24, 16, rank=8),
        KroneckerLinear((4, 6), (4, 4), rank=2),
        TuckerLinear((4, 4), (4, 6), ranks=(2, 4, 2, 4)),
        CPLinear((4, 4), (4, 6), rank=4),
        TTLinear((4, 4), (4, 6), ranks=(4,)),
    ]


def _tensors(layer, name) -> list[torch.Tensor]:
    value = getattr(layer, name)
    return list(value) if isinstance(value, (list, torch.nn.ParameterList)) else [value]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("index", range(5), ids=["lowrank", "kronecker", "tucker", "cp", "tt"])
def test_a_quantized_layer_computes_its_forward_on_the_rounded_factors(bits, index):
    layer = _layers()[index].requires_grad_(False)
    x = torch.randn(3, layer.in_features)
    axes = type(layer).FACTOR_AXES
    originals = {name: [t.detach().clone() for t in _tensors(layer, name)] for name in axes}
    w_before, y_before = layer.dense_weight().detach(), layer(x).detach()
    quantize_tensors(layer, axes, bits, None)
    assert not any(name in dict(layer.named_parameters()) for name in axes)
    # the same forward as a float layer holding the dequantized factors, bit for bit
    rounded = _layers()[index].requires_grad_(False)
    with torch.no_grad():
        for name in axes:
            for param, tensor in zip(_tensors(rounded, name), _tensors(layer, name)):
                param.copy_(tensor)
        rounded.bias.copy_(layer.bias)
    assert torch.equal(layer(x), rounded(x))
    # The weight error follows from the step alone: every factor entry moved by at most s / 2, so
    # ||dF_k||_F <= sqrt(sum (s/2)^2); W is multilinear in its factors and each of its terms is bounded by
    # the product of the factors' Frobenius norms (low-rank, Kronecker sums by Cauchy-Schwarz, Tucker, CP,
    # TT contractions), hence ||W(F + dF) - W(F)||_F <= prod(||F_k|| + ||dF_k||) - prod(||F_k||).
    deltas, norms = [], []
    for name in axes:
        stored = layer._modules[f"{name}_quant"]
        for q, original in zip(stored if isinstance(stored, torch.nn.ModuleList) else [stored], originals[name]):
            assert isinstance(q, QuantizedTensor) and q.qdata.dtype == (torch.int8 if bits == 8 else torch.uint8)
            step = q.scale.movedim(q.axis, -1).repeat_interleave(q.shape[q.axis] // q.scale.shape[q.axis], -1)
            deltas.append(float(step.pow(2).sum().sqrt()) / 2)
            norms.append(float(original.norm()))
    bound = math.prod(n + d for n, d in zip(norms, deltas)) - math.prod(norms)
    error_w = float((layer.dense_weight() - w_before).norm())
    assert 0 < error_w <= bound * (1 + 1e-4)
    # and the output error by ||x|| ||dW||_2 <= ||x|| ||dW||_F, plus float32 rounding of the two forwards
    x_norm = float(x.norm(dim=-1).max())
    slack = 8 * layer.in_features * EPS * x_norm * float(w_before.norm())
    assert float((layer(x) - y_before).norm(dim=-1).max()) <= x_norm * error_w + slack


def compressed(arch: str, rules):
    model = build_tiny(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kc.compress(model, recipe_of(*rules))
    return model


CASES = [("gpt2", [(["role:mlp"], "kronecker", {"ratio": 2})]), ("gpt2", [(["role:mlp"], "svd", {"rank": 8})]),
         ("gpt2", [(["transformer.wte"], "kronecker", {"b_shape": [1, 2]})]),
         ("llama", [(["role:mlp"], "tucker", {"ratio": 2, "n_iter_max": 2})]),
         ("llama", [(["role:mlp"], "tt", {"ratio": 2})]), ("llama", [(["role:mlp"], "cp", {"ratio": 2, "n_iter_max": 2})])]


SETTINGS = [(8, None), (4, None)]
GROUPED = [(arch, rules, 4, 4) for arch, rules in CASES[:3]]  # the tensor strategies' odd ranks take no group of 4


@pytest.mark.parametrize("arch, rules, bits, group_size",
                         [(a, r, b, g) for b, g in SETTINGS for a, r in CASES] + GROUPED,
                         ids=[f"{c}-int{b}" for b, _ in SETTINGS for c in ("kron", "svd", "tied-embedding", "tucker", "tt", "cp")]
                         + [f"{c}-int4-g4" for c in ("kron", "svd", "tied-embedding")])
def test_quantized_factors_save_and_load_bit_exact_through_both_loaders(tmp_path, arch, rules, bits, group_size):
    model, inputs = compressed(arch, rules), build_inputs(arch)
    summary = kc.quantize(model, bits=bits, group_size=group_size)
    assert summary.rows and summary.bytes_after < summary.bytes_before
    assert summary.bytes_after == weight_bytes(model)
    expected, state = logits(model, inputs), model.state_dict()
    folder = kc.save_compressed(model, tmp_path / "q")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys() if k.endswith("_quant.qdata") or ".qdata" in k}
    assert dtypes == {"I8" if bits == 8 else "U8"}
    for loaded in (kc.load_compressed(folder), transformers.AutoModelForCausalLM.from_pretrained(folder)):
        again = loaded.state_dict()
        assert again.keys() == state.keys()
        assert all(torch.equal(again[k], state[k]) and again[k].dtype == state[k].dtype for k in state)
        assert torch.equal(logits(loaded, inputs), expected)
    # a folder written by save_pretrained of the reloaded model reloads the same
    loaded.save_pretrained(tmp_path / "resaved")
    assert torch.equal(logits(kc.load_compressed(tmp_path / "resaved"), inputs), expected)


def test_the_plan_counts_the_bytes_that_compress_and_quantize_give():
    model = build_tiny("gpt2")
    recipe = kc.Recipe.from_dict({"version": 1, "name": "q", "compress": [
        {"targets": ["role:mlp"], "strategy": "svd", "options": {"rank": 8}},
        {"targets": ["transformer.wte"], "strategy": "kronecker", "options": {"b_shape": [1, 2]}}],
        "quantize": {"bits": 8, "dense": True}})
    plan = kc.plan(model, recipe)
    assert plan.bytes_before == weight_bytes(model) == 4 * plan.params_before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = kc.compress(model, recipe)
    assert (report.bytes_before, report.bytes_after) == (plan.bytes_before, 4 * plan.params_after)
    summary = kc.quantize(model, recipe.quantize.bits, recipe.quantize.group_size, dense=recipe.quantize.dense)
    assert summary.bytes_after == plan.bytes_after
    assert sum(row.bytes_before - row.bytes_after for row in plan.rows) < plan.bytes_before - plan.bytes_after  # + dense
    assert {"bytes_before", "bytes_after"} <= set(plan.to_dict()) and "bytes_after" in plan.to_dict()["modules"][0]


def test_an_original_model_quantized_densely_reloads_from_its_folder(tmp_path):
    model, inputs = build_tiny("llama"), build_inputs("llama")
    summary = kc.quantize(model, bits=8, dense=True)
    assert len(summary.rows) == 2 * 7 + 1  # 7 linear maps per block and the untied lm_head
    expected = logits(model, inputs)
    folder = kc.save_compressed(model, tmp_path / "dense8")
    assert torch.equal(logits(kc.load_compressed(folder), inputs), expected)
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(folder), inputs), expected)


def test_a_tied_head_is_not_quantized_apart_from_its_embedding():
    model = build_tiny("gemma3")  # tied embedding and head: one tensor, used twice
    summary = kc.quantize(model, bits=8, dense=True)
    assert not any(row.module == "lm_head" for row in summary.rows)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("kwargs, field", [({"bits": 3}, "bits"), ({"bits": 8, "group_size": 0}, "group_size"),
                                           ({"bits": 4, "group_size": 2.5}, "group_size")])
def test_bad_settings_name_the_field(kwargs, field):
    model = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=rf"quantize\.{field}: "):
        kc.quantize(model, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # nothing changed


def test_a_rank_the_group_size_does_not_divide_gets_a_shorter_last_group(tmp_path):
    """Ranks chosen by a budget are rarely multiples of the group: rank 10 with groups of 4 is 4 + 4 + 2."""
    model = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 10})])
    inputs = build_inputs("gpt2")
    reference = logits(model, inputs)
    summary = kc.quantize(model, bits=4, group_size=4)
    assert summary.bytes_after < summary.bytes_before
    ragged = [q for q in model.modules() if isinstance(q, QuantizedTensor) and q.shape[q.axis] == 10]
    assert ragged and all(q.scale.shape[q.axis] == 3 for q in ragged)
    out = logits(model, inputs)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    kc.save_compressed(model, tmp_path / "q")
    assert torch.equal(logits(kc.load_compressed(tmp_path / "q"), inputs), out)  # bit-exact round trip


@pytest.mark.parametrize("section, path", [({"bits": 3}, "quantize.bits"), ({"bits": 4, "group_size": 0}, "quantize.group_size"),
                                           ({"bitz": 4}, "quantize.bitz")])
def test_a_bad_quantize_section_names_its_recipe_path(section, path):
    with pytest.raises(kc.RecipeError, match=rf": {path}: "):
        kc.Recipe.from_dict({"version": 1, "name": "q", "compress": [{"targets": ["a"], "strategy": "svd", "options": {"rank": 2}}],
                                "quantize": section})


def test_post_hoc_quantizers_that_skip_the_factors_are_caught(tmp_path):
    model = compressed("llama", [(["role:mlp"], "svd", {"rank": 8})])
    dynamic = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert sum(isinstance(m, LowRankLinear) for m in dynamic.modules()) == 6  # left as they were, in float
    with pytest.raises(QuantizationError, match=r"torch\.ao / torchao, which skip the 6 factorized layers.*kc\.quantize"):
        kc.save_compressed(dynamic, tmp_path / "dyn")
    assert not (tmp_path / "dyn").exists()
    with pytest.warns(UserWarning, match="skip the 6 factorized layers"):
        assert kc.quantization.warn_if_factors_skipped(dynamic)
    check_foreign_quantization(model)  # the untouched model passes


def test_cli_quantize_writes_a_folder_that_loads(tmp_path):
    model, inputs = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})]), build_inputs("gpt2")
    source = kc.save_compressed(model, tmp_path / "svd")
    result = CliRunner().invoke(cli, ["quantize", str(source), "--bits", "8", "--output", str(tmp_path / "svd8")])
    assert result.exit_code == 0, result.output
    assert "weights" in result.output and "smaller" in result.output
    kc.quantize(model, bits=8)
    assert torch.equal(logits(kc.load_compressed(tmp_path / "svd8"), inputs), logits(model, inputs))
    bad = CliRunner().invoke(cli, ["quantize", str(source), "--bits", "3", "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--bits" in bad.output
    bad = CliRunner().invoke(cli, ["quantize", str(source), "--bits", "4", "--group-size", "0", "--output", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "--group-size" in bad.output and not (tmp_path / "y" / "config.json").exists()


def test_a_recipe_quantize_section_runs_last_and_reloads(tmp_path):
    import random

    from kroncompress.tokenizers import byte_tokenizer

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64,
                                     bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    (tmp_path / "text.txt").write_text("\n".join(" ".join(rng.choice("the of and to in is".split()) for _ in range(12))
                                                 for _ in range(60)))
    recipe = kc.Recipe.from_dict({"version": 1, "name": "q", "compress": [
        {"targets": ["role:mlp"], "strategy": "svd", "options": {"rank": 8}}], "quantize": {"bits": 8}})
    report = kc.run_pipeline(tmp_path / "model", recipe, tmp_path / "out", data=str(tmp_path / "text.txt"),
                             distill=False, measure_speed=False, eval_tokens=256)
    assert list(report["timings"]).index("quantize") > list(report["timings"]).index("compress")
    assert set(report["perplexity"]) == {"teacher", "compressed", "quantized"}
    assert report["quantization"]["bits"] == 8 and report["bytes_after"] == report["quantization"]["bytes_after"]
    loaded = kc.load_compressed(tmp_path / "out")
    assert kc.weight_bytes(loaded) == report["bytes_after"]
    assert sum(isinstance(m, QuantizedTensor) for m in loaded.modules()) == 2 * 2 * 2  # u, v of c_fc, c_proj per block


@pytest.mark.parametrize("dense", [False, True])
def test_a_quantized_model_exports_dense_with_its_rounded_weights(tmp_path, dense):
    model, inputs = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})]), build_inputs("gpt2")
    kc.quantize(model, bits=8, dense=dense)
    expected = logits(model, inputs)
    folder = kc.export_dense(kc.save_compressed(model, tmp_path / "q"), tmp_path / "dense")
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert not any("_quant" in key for key in plain.state_dict())
    torch.testing.assert_close(logits(plain, inputs), expected, rtol=1e-4, atol=1e-5)
