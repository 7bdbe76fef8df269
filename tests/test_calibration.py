"""Calibration: streaming input statistics, sharing, batch invariance, the recipe section, compress wiring."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import kroncompress as kc
from kroncompress.calibration import (
    StatisticsCollector, calibrate, calibration_targets, collect_statistics, memory_estimate,
)
from kroncompress.recipe import CalibrationConfig, Recipe, RecipeError
from kroncompress.tokenizers import byte_tokenizer


def tiny(model_type: str):
    torch.manual_seed(0)
    if model_type == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=257, n_positions=64, bos_token_id=256, eos_token_id=256)
        return GPT2LMHeadModel(config).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=257, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def recipe(targets, strategy="svd", options=None, **sections):
    return Recipe.from_dict({"version": 1, "name": "t", "compress": [
        {"targets": targets, "strategy": strategy, "options": options or {"ratio": 2}}], **sections})


BLOCKS = torch.randint(0, 257, (7, 16), generator=torch.Generator().manual_seed(0))
GPT2_MLP = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn"]


def test_statistics_are_the_sum_of_x_xT_of_each_modules_inputs():
    model = tiny("gpt2")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in GPT2_MLP}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
               for n in GPT2_MLP]
    with torch.no_grad():
        model(BLOCKS)
    for h in handles:
        h.remove()
    stats = collect_statistics(model, BLOCKS, GPT2_MLP, batch_size=7, damping=0.0)
    for name in GPT2_MLP:
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[name]]).double()
        torch.testing.assert_close(stats.raw(name), rows.T @ rows)
        assert stats.tokens(name) == BLOCKS.numel()
        torch.testing.assert_close(stats.matrix(name), rows.T @ rows / BLOCKS.numel())


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_statistics_do_not_depend_on_the_batching(batch_size):
    model = tiny("gpt2")
    whole = collect_statistics(model, BLOCKS, GPT2_MLP, batch_size=len(BLOCKS))
    batched = collect_statistics(model, BLOCKS, GPT2_MLP, batch_size=batch_size)
    for name in GPT2_MLP:
        assert batched.tokens(name) == whole.tokens(name)
        torch.testing.assert_close(batched.raw(name), whole.raw(name), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(batched.matrix(name), whole.matrix(name), rtol=1e-12, atol=1e-12)


def test_modules_reading_the_same_input_share_one_accumulator():
    model = tiny("llama")
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                                                    "model.layers.0.mlp.down_proj"]
    stats = collect_statistics(model, BLOCKS, names, batch_size=3)
    groups = sorted(sorted(g) for g in stats.groups)
    assert groups == sorted([
        sorted(f"model.layers.0.self_attn.{p}_proj" for p in "qkv"), ["model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], ["model.layers.0.mlp.down_proj"]])
    assert stats.tokens("model.layers.0.self_attn.k_proj") == BLOCKS.numel()  # counted once, not three times
    assert stats.memory_bytes == 8 * (3 * 32 * 32 + 64 * 64)
    assert memory_estimate(model, names) == 8 * (6 * 32 * 32 + 64 * 64)  # the upper bound before the pass


def test_hooks_are_removed_and_progress_is_reported():
    model = tiny("gpt2")
    calls = []
    collect_statistics(model, BLOCKS, GPT2_MLP, batch_size=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(48, 112), (96, 112), (112, 112)]
    assert all(not model.get_submodule(n)._forward_pre_hooks for n in GPT2_MLP)


@pytest.mark.parametrize("names, message", [
    (["transformer.h.0.mlp"], "GPT2MLP"), (["transformer.h.0"], "GPT2Block"),
])
def test_only_linear_conv1d_and_embedding_modules_are_calibrated(names, message):
    with pytest.raises(ValueError, match=message):
        StatisticsCollector(tiny("gpt2"), names)


@pytest.mark.parametrize("padding_idx", [None, 5])
def test_an_embeddings_statistic_is_the_histogram_of_its_token_ids(padding_idx):
    model = tiny("gpt2")
    model.transformer.wte.padding_idx = padding_idx
    stats = collect_statistics(model, BLOCKS, ["transformer.wte"], batch_size=3)
    expected = torch.bincount(BLOCKS.reshape(-1), minlength=257).double()
    if padding_idx is not None:
        expected[padding_idx] = 0
    torch.testing.assert_close(stats.counts("transformer.wte"), expected)
    assert stats.tokens("transformer.wte") == int(expected.sum())
    assert stats.matrix("transformer.wte") is None and stats.for_module("transformer.wte").head is None
    assert memory_estimate(model, ["transformer.wte"]) == stats.memory_bytes == 8 * 257


def test_a_tied_heads_second_moment_rides_with_the_embeddings_counts():
    model = tiny("gpt2")
    r = recipe(["transformer.wte"], "kronecker", {"b_shape": [1, 2]}, ignore=["lm_head"])
    names = calibration_targets(model, r)
    assert names == ["transformer.wte", "lm_head"]
    stats = collect_statistics(model, BLOCKS, names, damping=0.0)
    pair = stats.for_module("transformer.wte", ["lm_head"])
    torch.testing.assert_close(pair.head, stats.matrix("lm_head"))
    assert pair.head.shape == (32, 32) and pair.counts.sum() == BLOCKS.numel()


def test_a_module_that_never_runs_is_an_error():
    model = tiny("gpt2")
    model.transformer.h[1].mlp.extra = nn.Linear(32, 32)
    with pytest.raises(ValueError, match="never ran"):
        collect_statistics(model, BLOCKS, ["transformer.h.1.mlp.extra"])


def test_accumulators_can_live_on_another_device():
    stats = collect_statistics(tiny("gpt2"), BLOCKS, GPT2_MLP, device="cpu")
    assert all(stats.raw(n).device.type == "cpu" and stats.raw(n).dtype == torch.float64 for n in GPT2_MLP)


# -- the recipe section --------------------------------------------------------------------------

def test_recipe_calibration_section_parses_with_defaults_and_round_trips():
    r = recipe(["role:mlp"], calibration={"data": {"source": "shakespeare"}, "tokens": 1024})
    assert r.calibration == CalibrationConfig(data=r.calibration.data, tokens=1024, block_size=256, damping=0.01)
    assert r.calibration.data.source == "shakespeare"
    assert Recipe.from_dict(r.to_dict()) == r
    assert recipe(["role:mlp"]).calibration is None


@pytest.mark.parametrize("section, path, problem", [
    ({"tokens": 0}, "calibration.tokens", "must be >= 1"),
    ({"block_size": "big"}, "calibration.block_size", "expected an integer"),
    ({"damping": -0.1}, "calibration.damping", "must be >= 0"),
    ({"tokenz": 5}, "calibration.tokenz", "did you mean 'tokens'"),
    ({"data": {"source": "shakespeare", "files": ["a.txt"]}}, "calibration.data", "give only one text source"),
    ("shakespeare", "calibration", "expected a mapping"),
])
def test_recipe_calibration_errors_name_the_path(section, path, problem):
    with pytest.raises(RecipeError, match=rf"<dict>: {path}: .*{problem}"):
        recipe(["role:mlp"], calibration=section)


@pytest.mark.parametrize("strategy, options, expected", [
    ("svd", {"ratio": 2}, True), ("svd", {"ratio": 2, "init": "svd"}, False),
    ("kronecker", {"b_shape": [1, 2]}, True), ("kronecker", {"b_shape": [1, 2], "init": "nkp"}, False),
    ("tucker", {"ratio": 2}, False),
])
def test_calibration_targets_are_the_data_aware_rules(strategy, options, expected):
    model = tiny("gpt2")
    names = calibration_targets(model, recipe(["role:mlp"], strategy, options))
    assert bool(names) == expected
    if expected:
        assert names == [f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")]


# -- compress with and without calibration -------------------------------------------------------

def test_compress_with_calibration_uses_data_aware_init_and_lowers_the_output_error():
    model = tiny("gpt2")
    r = recipe(["role:mlp"], "svd", {"ratio": 2}, calibration={"data": {"source": "shakespeare"}, "tokens": 512, "block_size": 32})
    stats = calibrate(model, r, byte_tokenizer())
    assert stats.tokens("transformer.h.0.mlp.c_fc") == 512
    plain, aware = tiny("gpt2"), tiny("gpt2")
    with pytest.warns(UserWarning, match="no calibration data was given"):
        kc.compress(plain, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = kc.compress(aware, r, calibration=stats)
    assert all("init whitened" in row.note for row in report.rows)
    from kroncompress.linalg.whitening import output_error

    reference = tiny("gpt2")
    for row in report.rows:
        W = reference.get_submodule(row.name).weight.detach().T
        C = stats.matrix(row.name)
        assert row.output_error == pytest.approx(output_error(W, aware.get_submodule(row.name).dense_weight().detach(), C), rel=1e-5)
        assert row.output_error < output_error(W, plain.get_submodule(row.name).dense_weight().detach(), C)


def test_compress_with_calibration_fits_the_embedding_to_token_frequencies_and_the_tied_head():
    from kroncompress.linalg.weighted_kronecker import embedding_weights, weighted_objective

    model = tiny("gpt2")
    r = recipe(["transformer.wte"], "kronecker", {"b_shape": [1, 2]}, ignore=["lm_head"])
    stats = collect_statistics(model, BLOCKS, calibration_targets(model, r))
    plain, aware = tiny("gpt2"), tiny("gpt2")
    kc.compress(plain, recipe(["transformer.wte"], "kronecker", {"b_shape": [1, 2], "init": "nkp"}, ignore=["lm_head"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = kc.compress(aware, r, calibration=stats)
    assert "init als-freq+head" in report.rows[0].note
    assert aware.lm_head.tied_to is aware.transformer.wte  # the head still reads the same factors
    E = model.transformer.wte.weight.detach()
    w, Ch = embedding_weights(E, stats.counts("transformer.wte"), stats.matrix("lm_head"))
    fitted = [weighted_objective(E, m.transformer.wte.dense_weight().detach(), w, Ch) for m in (plain, aware)]
    assert fitted[1] < fitted[0]


def test_explicit_weight_only_init_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kc.compress(tiny("gpt2"), recipe(["role:mlp"], "kronecker", {"b_shape": [1, 2], "init": "nkp"}))


def test_compress_with_stats_ranks_kronecker_shapes_by_output_error():
    model = tiny("gpt2")
    r = recipe(["transformer.h.0.mlp.c_proj"], "kronecker", {"ratio": 2, "rank": 2, "sweeps": 2, "shortlist": 2})
    stats = collect_statistics(model, BLOCKS, ["transformer.h.0.mlp.c_proj"])
    row = kc.plan(model, r, stats).rows[0]
    assert "shape chosen by output error" in row.plan.note
    report = kc.compress(model, r, calibration=stats)
    assert "init als" in report.rows[0].note and report.rows[0].output_error is not None


def test_cli_compress_with_calibration_data(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    model = tiny("gpt2")
    model.save_pretrained(tmp_path / "teacher")
    byte_tokenizer().save_pretrained(tmp_path / "teacher")
    (tmp_path / "r.yaml").write_text("version: 1\nname: r\ncompress:\n  - {targets: ['role:mlp'], strategy: svd, options: {ratio: 2}}\n")
    result = CliRunner().invoke(cli, ["compress", str(tmp_path / "teacher"), "--recipe", str(tmp_path / "r.yaml"),
                                      "--output", str(tmp_path / "out"), "--calibration-data", "shakespeare",
                                      "--calibration-tokens", "256"])
    assert result.exit_code == 0, result.output
    assert "calibration" in result.output and "init whitened" in (tmp_path / "out" / "report.json").read_text()


def _recipe_with(calibration_data=None, distill_data=None):
    import kroncompress as kc

    data = {"version": 1, "name": "r", "compress": [{"targets": ["role:mlp"], "strategy": "svd", "options": {"ratio": 2}}],
            "calibration": {"tokens": 256} if calibration_data is None else {"data": calibration_data, "tokens": 256}}
    if distill_data is not None:
        data["distill"] = {"data": distill_data}
    return kc.Recipe.from_dict(data)


@pytest.mark.parametrize("recipe_kwargs, explicit, override, expected", [
    ({}, "notes.txt", "shakespeare", "notes.txt"),                            # the flag wins
    ({"calibration_data": {"source": "kjv"}}, None, "shakespeare", None),     # the section names its own text
    ({}, None, "shakespeare", "shakespeare"),                                 # else the run's --data
    ({"distill_data": {"files": ["a.txt"]}}, None, None, "distill"),          # else the distillation data
    ({}, None, None, None),                                                   # else calibrate's offline default
])
def test_pipeline_calibration_text_defaults_to_the_runs_own_text(recipe_kwargs, explicit, override, expected):
    from kroncompress.pipeline.text import calibration_text

    recipe = _recipe_with(**recipe_kwargs)
    got = calibration_text(recipe, explicit, override)
    if expected == "distill":
        assert got is recipe.distill.data
    else:
        assert got == expected


def test_damped_moments_are_reused_per_input_and_recomputed_when_it_grows():
    import torch

    from kroncompress.calibration import CalibrationStats, InputStatistic
    from kroncompress.linalg.whitening import damp

    g = torch.Generator().manual_seed(0)
    shared, other = (InputStatistic(torch.zeros(4, 4, dtype=torch.float64), 0, names) for names in (["q", "k"], ["o"]))
    for stat in (shared, other):
        stat.add(torch.randn(8, 4, generator=g), None)
    stats = CalibrationStats([shared, other], damping=0.01)
    assert stats.matrix("q") is stats.matrix("k")  # one damped copy for the modules reading one input
    torch.testing.assert_close(stats.matrix("o"), damp(other.sum_xxt / other.tokens, 0.01), rtol=0, atol=0)
    before = stats.matrix("q").clone()
    shared.add(torch.randn(8, 4, generator=g) * 3, None)
    torch.testing.assert_close(stats.matrix("q"), damp(shared.sum_xxt / shared.tokens, 0.01), rtol=0, atol=0)
    assert not torch.equal(stats.matrix("q"), before)
