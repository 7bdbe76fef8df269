"""Hugging Face objects in, as llm-compressor's `oneshot(model, recipe, dataset)` takes them: a model object
for run_pipeline, and datasets.Dataset / IterableDataset, lists of strings and token tensors wherever a data
spec is taken (one resolver: kroncompress.distill.data.text_spec)."""

from __future__ import annotations

import random

import datasets
import pytest
import torch
import transformers

import kroncompress as kc
from kroncompress.distill import data
from kroncompress.distill.trainer import as_dataset
from kroncompress.recipe import Recipe
from kroncompress.tokenizers import byte_tokenizer

EOS = 256
WORDS = "the of and to in is was for on that with as by at from his her an be it are this which".split()
TEXTS = [" ".join(random.Random(i).choice(WORDS) for _ in range(40)) + "." for i in range(40)]


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))


def _ids(texts):
    return torch.tensor([i for t in texts for i in [*t.encode(), EOS]])


@pytest.mark.parametrize("make", [
    lambda: TEXTS,
    lambda: datasets.Dataset.from_dict({"text": TEXTS}),
    lambda: datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset(),
    lambda: {"dataset": datasets.Dataset.from_dict({"content": TEXTS, "n": list(range(40))}), "column": "content"},
])
def test_in_memory_text_is_tokenised_like_files(make):
    ids = data.token_stream(make(), byte_tokenizer())
    assert torch.equal(ids, _ids(TEXTS))


@pytest.mark.parametrize("tokens", [torch.arange(300), torch.arange(300).reshape(3, 100)])
def test_token_tensors_are_used_as_they_are(tokens):
    assert torch.equal(data.token_stream(tokens, tokenizer=None), torch.arange(300))
    train, validation = data.build_datasets(tokens, None, block_size=100)
    assert torch.equal(train, torch.arange(300).reshape(3, 100)) and len(validation) == 0


def test_a_dataset_without_the_text_column_names_the_columns():
    ds = datasets.Dataset.from_dict({"content": TEXTS, "label": [0] * 40})
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: content, label\).*'column'"):
        data.text_spec(ds)
    with pytest.raises(ValueError, match=r"no 'body' column"):
        data.text_spec({"dataset": ds, "column": "body"})
    with pytest.raises(ValueError, match=r"DatasetDict holds several splits \(train\); give one, e.g. ds\['train'\]"):
        data.text_spec(datasets.DatasetDict({"train": ds}))


def _tiny_lm(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64,
                                     bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _recipe(**sections):
    return Recipe.from_dict({"version": 1, "name": "t", "compress": [
        {"targets": ["role:mlp"], "strategy": "svd", "options": {"ratio": 2}}], **sections})


def test_calibrate_takes_a_dataset_and_a_list():
    model = _tiny_lm(None)
    plan = kc.plan(model, _recipe(calibration={"tokens": 256, "block_size": 32}))
    for text in (TEXTS, datasets.Dataset.from_dict({"text": TEXTS})):
        stats = kc.calibrate(model, plan, byte_tokenizer(), data=text, tokens=256)
        assert stats.modules and {stats.tokens(name) for name in stats.modules} == {256}


def test_run_pipeline_takes_a_model_object_and_a_dataset(tmp_path):
    model = _tiny_lm(tmp_path)
    recipe = _recipe(distill={"data": {"block_size": 32}, "train": {"max_steps": 1, "batch_size": 2}})
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    report = kc.run_pipeline(model, recipe, tmp_path / "out", data=ds, tokenizer=byte_tokenizer(), progress=False,
                             measure_speed=False, calibration_data=TEXTS)
    assert report["distill"]["steps"] == 1 and report["params_after"] < report["params_before"]
    assert report["perplexity"]["distilled"]["perplexity"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert any(type(m).__name__ != "Conv1D" for m in model.modules())  # compressed in place


def test_run_pipeline_on_a_model_object_without_a_tokenizer_says_so(tmp_path):
    with pytest.raises(ValueError, match="needs a tokenizer.*pass tokenizer="):
        kc.run_pipeline(_tiny_lm(tmp_path), _recipe(), tmp_path / "out", data=TEXTS, progress=False)


def test_distill_takes_text_with_a_tokenizer():
    blocks = as_dataset(datasets.Dataset.from_dict({"text": TEXTS}), tokenizer=byte_tokenizer(), block_size=32)
    assert len(blocks) == len(_ids(TEXTS)) // 32
    assert torch.equal(blocks[0]["input_ids"], _ids(TEXTS)[:32])
    assert len(as_dataset(torch.arange(100), block_size=32)) == 3
    with pytest.raises(ValueError, match="needs a tokenizer"):
        as_dataset(TEXTS, model=_tiny_lm(None), block_size=32)


def test_distill_trains_on_a_dataset_of_text(tmp_path):
    from kroncompress.distill import distill
    from kroncompress.recipe import DataConfig, DistillConfig, TrainConfig

    student, teacher = _tiny_lm(None), _tiny_lm(None)
    config = DistillConfig(data=DataConfig(block_size=32), train=TrainConfig(max_steps=2, batch_size=2))
    result = distill(student, teacher, config, datasets.Dataset.from_dict({"text": TEXTS}), output_dir=tmp_path / "d",
                     progress=False, tokenizer=byte_tokenizer(), training_args={"logging_steps": 1})
    assert result.steps == 2 and result.tokens == 2 * 2 * 32


@pytest.mark.parametrize("make, kept", [
    (lambda: TEXTS, _ids(TEXTS[:10])),
    (lambda: datasets.Dataset.from_dict({"text": TEXTS}), _ids(TEXTS[:10])),
    (lambda: {"dataset": datasets.Dataset.from_dict({"content": TEXTS}), "column": "content"}, _ids(TEXTS[:10])),
    (lambda: datasets.Dataset.from_dict({"input_ids": [list(range(10 * i, 10 * i + 10)) for i in range(8)]}),
     torch.arange(20)),
    (lambda: torch.arange(300).reshape(12, 25), torch.arange(75)),
    (lambda: torch.arange(300), torch.arange(75)),
], ids=["list", "dataset", "dataset-column", "tokenised-dataset", "rows", "ids"])
def test_fraction_keeps_the_first_part_of_in_memory_data(make, kept):
    source = make()
    spec = {**source, "fraction": 0.25} if isinstance(source, dict) else {"dataset": source, "fraction": 0.25}
    assert torch.equal(data.token_stream(spec, byte_tokenizer()), kept)


def test_fraction_of_an_iterable_dataset_is_refused_with_the_fix():
    stream = datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"fraction 0.5 needs the size of the in-memory IterableDataset.*fraction: 1.0"):
        data.token_stream({"dataset": stream, "fraction": 0.5}, byte_tokenizer())
