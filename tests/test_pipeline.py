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

    from kroncompress.pipeline import runs

    expensive = {"evaluate_teacher", "speed_teacher", "keep_teacher", "calibrate", "compress", "distill"}
    monkeypatch.setattr(runs, "COMPRESS", tuple(refuse if s.__name__ in expensive else s for s in runs.COMPRESS))
    monkeypatch.setattr("kroncompress.pipeline.evaluate.Scorer.__call__", refuse)
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
    from kroncompress.pipeline.text import merged_data

    base = kc.load_recipe("kn-gpt2").distill.data
    merged = merged_data(base, {"files": "notes.txt"})
    assert merged.files == ["notes.txt"] and merged.dataset is None and merged.fraction == 1.0
    assert merged.block_size == base.block_size
    assert merged_data(None, {"source": "shakespeare"}).source == "shakespeare"


SAMPLE_BLOCKS, DATA_BLOCK = 3, 16  # the validation sample shrunk so that it, not the text, bounds the scored ids
SAMPLE_CAP = SAMPLE_BLOCKS * DATA_BLOCK - 1  # one stream of 48 ids: every id but the first scored once


def _split_folder(text, root):
    lines = text.read_text().splitlines()
    (root / "split").mkdir()
    (root / "split" / "train.txt").write_text("\n".join(lines[:60]))
    (root / "split" / "validation.txt").write_text("\n".join(lines[60:]))
    return str(root / "split")


# (id, distill, data (from the corpus file and a work folder), eval_tokens, recipe's evaluate.perplexity.max_tokens,
#  the cap on the ids each stage scores)
CAP_CASES = [
    ("file, distill on", True, lambda text, root: str(text), None, None, SAMPLE_CAP),
    ("file, distill off", False, lambda text, root: str(text), None, None, SAMPLE_CAP),
    # a split folder's own validation split is scored whole, as `kroncompress eval --data` scores it (no sample)
    ("split folder, distill on", True, _split_folder, None, None, 10**6),
    ("split folder, distill off", False, _split_folder, None, None, 10**6),
    ("in-memory strings, distill on", True, lambda text, root: text.read_text().splitlines(), None, None, SAMPLE_CAP),
    ("in-memory strings, distill off", False, lambda text, root: text.read_text().splitlines(), None, None, SAMPLE_CAP),
    ("eval_tokens, distill on", True, lambda text, root: str(text), 20, None, 19),
    ("eval_tokens, distill off", False, lambda text, root: str(text), 20, None, 19),
    ("recipe max_tokens, distill on", True, None, None, 30, 29),
    ("recipe max_tokens, distill off", False, None, None, 30, 29),
    ("eval_tokens over recipe max_tokens", False, None, 20, 30, 19),
]


@pytest.mark.parametrize("distill, make_data, eval_tokens, max_tokens, cap", [c[1:] for c in CAP_CASES],
                         ids=[c[0] for c in CAP_CASES])
def test_no_perplexity_stage_scores_more_ids_than_the_cap(tiny_folder, tmp_path, monkeypatch, distill, make_data,
                                                          eval_tokens, max_tokens, cap):
    from kroncompress.pipeline import text

    monkeypatch.setattr(text, "MAX_VALIDATION_BLOCKS", SAMPLE_BLOCKS)
    folder, text = tiny_folder
    sections = {"distill": {"teacher": "original", "data": {"files": [str(text)], "block_size": DATA_BLOCK},
                            "train": {"batch_size": 2, "grad_accum": 1}}}
    if max_tokens is not None:
        sections["evaluate"] = {"perplexity": {"files": [str(text)], "split": "train", "block_size": 16, "stride": 8,
                                               "max_tokens": max_tokens}}
    data = make_data(text, tmp_path) if make_data is not None else None
    report = kc.run_pipeline(folder, _recipe({"ratio": 2}, **sections), tmp_path / "out", data=data, distill=distill,
                             max_steps=1, measure_speed=False, progress=False, eval_tokens=eval_tokens)
    stages = {"teacher", "compressed", "distilled"} if distill else {"teacher", "compressed"}
    assert set(report["perplexity"]) == stages
    for stage in stages:
        assert 0 < report["perplexity"][stage]["tokens"] <= cap, (stage, report["perplexity"][stage])
    assert report["perplexity"]["teacher"]["tokens"] == report["perplexity"]["compressed"]["tokens"]


@pytest.mark.parametrize("data", ["file", "in-memory strings"])
def test_a_run_without_distillation_scores_the_same_held_out_ids_as_one_with_it(tiny_folder, tmp_path, data):
    folder, text = tiny_folder
    given = str(text) if data == "file" else text.read_text().splitlines()
    recipe = _recipe({"ratio": 2}, distill={"teacher": "original", "data": {"block_size": DATA_BLOCK},
                                            "train": {"batch_size": 2, "grad_accum": 1}})
    teacher = [kc.run_pipeline(folder, recipe, tmp_path / f"out-{distill}", data=given, distill=distill, max_steps=1,
                               measure_speed=False, progress=False)["perplexity"]["teacher"] for distill in (True, False)]
    assert teacher[0]["tokens"] == teacher[1]["tokens"] and teacher[0]["block_size"] == teacher[1]["block_size"]
    assert teacher[0]["perplexity"] == teacher[1]["perplexity"]  # the same model on the same ids


def test_the_runs_are_stage_lists_over_shared_stages():
    from kroncompress.pipeline import CALIBRATE, COMPRESS, COMPRESS_TASK

    names = {run: [stage.__name__ for stage in stages]
             for run, stages in (("compress", COMPRESS), ("task", COMPRESS_TASK), ("calibrate", CALIBRATE))}
    shared = ["plan", "evaluate_teacher", "keep_teacher", "calibrate", "compress", "evaluate_compressed", "distill",
              "evaluate_distilled", "report", "save"]
    for run in ("compress", "task"):
        assert [n for n in names[run] if n in shared] == shared, run  # the same stages, in the same order
    assert set(names["task"]) - set(names["compress"]) == {"load_task"}  # only loading is the task's own
    assert names["calibrate"] == ["load", "plan", "require_calibration", "calibrate"]
    assert {s for s in CALIBRATE if s.__name__ != "require_calibration"} <= set(COMPRESS)  # the very same functions
