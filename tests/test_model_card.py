"""The model card of a compressed folder (README.md): Hugging Face metadata for a kroncompress model:
library_name, tags with the strategies, base_model, license (the source's), datasets, metrics, recipe."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
import yaml

import kroncompress as kc
from kroncompress import pipeline
from kroncompress.pipeline import save as pipeline_save
from kroncompress.pipeline.text import RunText, distill_config
from kroncompress.recipe import Recipe
from kroncompress.tokenizers import byte_tokenizer

WORDS = "the of and to in is was for on that with as by at from his her an be it are this which".split()


def front_matter(folder) -> dict:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def _recipe(**sections):
    return Recipe.from_dict({"version": 1, "name": "card-test", "compress": [
        {"targets": ["transformer.h.*.mlp.c_fc"], "strategy": "svd", "options": {"ratio": 2}},
        {"targets": ["transformer.h.*.mlp.c_proj"], "strategy": "kronecker", "options": {"ratio": 2}}], **sections})


@pytest.fixture
def source(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64,
                                     bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# my model\n")
    rng = random.Random(0)
    (tmp_path / "notes.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(80)))
    return tmp_path


def test_pipeline_card_front_matter(source, tmp_path):
    recipe = _recipe(distill={"data": {"block_size": 32}, "train": {"max_steps": 1, "batch_size": 2}})
    report = kc.run_pipeline(source / "model", recipe, tmp_path / "out", data=str(source / "notes.txt"),
                             progress=False, measure_speed=False)
    meta, body = front_matter(tmp_path / "out")
    assert meta["library_name"] == "kroncompress"
    assert meta["tags"] == ["kroncompress", "compressed", "kronecker", "svd", "gpt2"]
    assert meta["pipeline_tag"] == "text-generation"
    # a local folder is no hub id: no base_model, but its card still gives the licence
    assert "base_model" not in meta and meta["license"] == "apache-2.0"
    assert "datasets" not in meta  # local files are no hub dataset
    assert meta["metrics"] == ["perplexity"]
    assert meta["kroncompress"]["recipe"] == "card-test"
    assert meta["kroncompress"]["perplexity_before"] == pytest.approx(report["perplexity"]["teacher"]["perplexity"], rel=1e-3)
    assert meta["kroncompress"]["perplexity_after"] == pytest.approx(report["perplexity"]["distilled"]["perplexity"], rel=1e-3)
    assert "import kroncompress" in body and "from_pretrained" in body


def test_save_compressed_card_from_arguments_and_without_a_licence(source, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(source / "model")
    (source / "model" / "README.md").unlink()
    kc.compress(model, _recipe())
    kc.save_compressed(model, tmp_path / "a", card={"datasets": ["wikitext", "wikitext"]})
    meta, _ = front_matter(tmp_path / "a")
    assert "base_model" not in meta and "license" not in meta and "metrics" not in meta
    assert meta["datasets"] == ["wikitext"]
    kc.save_compressed(model, tmp_path / "b", card={"base_model": "openai-community/gpt2", "license": "mit"})
    meta, _ = front_matter(tmp_path / "b")
    assert meta["base_model"] == "openai-community/gpt2" and meta["license"] == "mit"


def test_the_card_names_hub_datasets_of_distillation_and_calibration():
    hub_dataset = pipeline_save.hub_dataset
    assert hub_dataset("wikitext:wikitext-2-raw-v1") == "wikitext"
    assert hub_dataset({"dataset": "openwebtext"}) == "openwebtext"
    assert hub_dataset("shakespeare") is None and hub_dataset(["some", "text"]) is None


def test_card_of_a_run_lists_its_hub_datasets(tmp_path):
    recipe = _recipe(distill={"data": {"source": "shakespeare"}}, calibration={"data": {"dataset": "c4"}})
    settings = pipeline.PipelineSettings("org/model", recipe, tmp_path / "out", data="wikitext:wikitext-2-raw-v1")
    run = pipeline.Run(settings)
    run.text = RunText(distill_config(recipe, settings.data, None), settings.data, None, None, None)
    assert pipeline_save.model_card(run) == {"base_model": "org/model", "datasets": ["wikitext", "c4"]}



def test_base_model_is_written_only_for_a_hub_id(tmp_path, monkeypatch):
    from kroncompress.io.card import hub_model_id

    monkeypatch.chdir(tmp_path)
    assert hub_model_id("openai-community/gpt2") == "openai-community/gpt2" and hub_model_id("gpt2") == "gpt2"
    (tmp_path / "gpt2").mkdir()  # a local folder of that name shadows the id, as in from_pretrained
    assert hub_model_id("gpt2") is None and hub_model_id(tmp_path / "gpt2") is None
    assert hub_model_id("shakespeare-gpt2") is None and hub_model_id("demo") is None  # packaged, not on the hub
    for not_an_id in ("runs/kn-gpt2/checkpoint", "a--b", "../up", "/abs/path", "name.git", ""):
        assert hub_model_id(not_an_id) is None, not_an_id
    snapshot = tmp_path / "hub" / "models--google--gemma-3-270m" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert hub_model_id(snapshot) == "google/gemma-3-270m"


@pytest.mark.parametrize("arch, tag", [("gpt2", "text-generation"), ("llama", "text-generation"),
                                       ("bert", "fill-mask"), ("vit", "image-classification")])
def test_pipeline_tag_follows_the_model_class(tiny_model, arch, tag):
    from kroncompress.io.card import pipeline_tag

    assert pipeline_tag(tiny_model(arch)) == tag


def test_pipeline_tag_of_bare_and_classifier_models(tiny_config_of):
    from kroncompress.io.card import pipeline_tag

    assert pipeline_tag(transformers.BertModel(tiny_config_of("bert"))) == "feature-extraction"
    assert pipeline_tag(transformers.ViTModel(tiny_config_of("vit"))) == "image-feature-extraction"
    assert pipeline_tag(transformers.BertForSequenceClassification(tiny_config_of("bert"))) == "text-classification"
    assert pipeline_tag(torch.nn.Linear(2, 2)) is None
