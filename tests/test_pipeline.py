"""The pipeline's stages: settings built once, the recipe planned once right after loading (so recipe errors
that need the model come before any expensive stage), and that plan calibrated and compressed."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

import kroncompress as kc
from kroncompress import pipeline, surgery
from kroncompress.recipe import Recipe, RecipeError
from kroncompress.tokenizers import byte_tokenizer

WORDS = "the of and to in is was for on that with as by at from his her an be it are this which".split()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny byte-level GPT-2 with its tokenizer, and a small text file."""
    root = tmp_path_factory.mktemp("pipeline")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64,
                                     bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    text = root / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(80)))
    return root / "model", text


def _recipe(options, targets=("role:mlp",), strategy="kronecker", **sections):
    return Recipe.from_dict({"version": 1, "name": "t", "compress": [
        {"targets": list(targets), "strategy": strategy, "options": options}], **sections})


def _no_expensive_stage(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an expensive stage ran before the recipe was checked against the model")

    monkeypatch.setattr(pipeline._Scorer, "__call__", refuse)
    monkeypatch.setattr(pipeline, "_speed", refuse)
    monkeypatch.setattr(pipeline, "_teacher", refuse)
    monkeypatch.setattr("kroncompress.calibration.calibrate", refuse)


@pytest.mark.parametrize("recipe, expected", [
    (_recipe({"b_shape": [1, 2]}, targets=["transformer.h.*.mlp.c_fcc"]), r"compress\[0\]\.targets\[0\].*matches no module"),
    (_recipe({"b_shape": [3, 2]}), r"compress\[0\]\.options\.b_shape: module transformer\.h\.0\.mlp\.c_fc"),
    (_recipe({"ratio": 1e9}, strategy="svd"), r"compress\[0\]\.options\.ratio: module transformer\.h\.0\.mlp\.c_fc"),
])
def test_recipe_errors_that_need_the_model_come_before_any_expensive_stage(tiny_folder, tmp_path, monkeypatch,
                                                                          recipe, expected):
    folder, text = tiny_folder
    _no_expensive_stage(monkeypatch)
    with pytest.raises(RecipeError, match=expected):
        kc.run_pipeline(folder, recipe, tmp_path / "out", data=str(text), max_steps=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_one_plan_calibrated_and_compressed(tiny_folder, tmp_path, monkeypatch):
    folder, text = tiny_folder
    calls = []
    real_plan = surgery.plan
    monkeypatch.setattr(surgery, "plan", lambda *a, **k: calls.append(1) or real_plan(*a, **k))
    recipe = _recipe({"ratio": 2}, calibration={"tokens": 512, "block_size": 32})
    report = kc.run_pipeline(folder, recipe, tmp_path / "out", data=str(text), distill=False, measure_speed=False)
    assert len(calls) == 1  # planned once, right after loading; calibrate and compress used that plan
    assert [t for t in report["timings"]][:2] == ["load", "plan"]
    assert report["calibration"]["inputs"] and all(r["output_error"] is not None for r in report["compression"]["modules"])
    # the plan made before calibration was re-ranked by output error for the data-aware rows, as kc.plan would
    assert all("output error" in r["note"] for r in report["compression"]["modules"])


@pytest.mark.parametrize("evaluate", [None, {"perplexity": {"files": ["CORPUS"], "block_size": 32, "stride": 16}}],
                         ids=["held-out part of data", "recipe's evaluate.perplexity"])
def test_eval_tokens_caps_every_perplexity_stage_and_reports_progress(tiny_folder, tmp_path, evaluate):
    folder, text = tiny_folder
    sections = {"evaluate": {"perplexity": {**evaluate["perplexity"], "files": [str(text)]}}} if evaluate else {}
    recipe = _recipe({"ratio": 2}, **sections)
    seen: dict[str, list] = {}
    report = kc.run_pipeline(folder, recipe, tmp_path / "out", data=None if evaluate else str(text), distill=False,
                             measure_speed=False, eval_tokens=100,
                             eval_progress=lambda done, total, stage: seen.setdefault(stage, []).append((done, total)))
    ppl = report["perplexity"]
    assert set(seen) == {"teacher", "compressed"} and set(ppl) >= {"teacher", "compressed"}
    for stage, calls in seen.items():
        assert ppl[stage]["tokens"] == 99  # 100 ids: every one but the first scored once (stride < block)
        assert calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == sorted(c[0] for c in calls)
    with pytest.raises(ValueError, match="eval_tokens must be >= 2"):
        kc.run_pipeline(folder, recipe, tmp_path / "out2", data=str(text), eval_tokens=1)


def test_settings_take_the_keyword_arguments_and_a_recipe_object(tmp_path):
    recipe = _recipe({"b_shape": [1, 2]})
    settings = pipeline.PipelineSettings("m", recipe, tmp_path / "out", data="shakespeare", max_steps=3)
    assert settings.recipe is recipe and settings.device.type in ("cpu", "cuda")
    assert pipeline.PipelineSettings("m", "kn-gpt2", tmp_path).recipe.name == "kn-gpt2"
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        pipeline.PipelineSettings("m", recipe, tmp_path, max_steps=0)


def test_the_data_override_replaces_the_text_keys_only():
    base = kc.load_recipe("kn-gpt2").distill.data
    merged = pipeline._merged_data(base, {"files": "notes.txt"})
    assert merged.files == ["notes.txt"] and merged.dataset is None and merged.fraction == 1.0
    assert merged.block_size == base.block_size
    assert pipeline._merged_data(None, {"source": "shakespeare"}).source == "shakespeare"
