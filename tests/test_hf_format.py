"""Compressed folders are Hugging Face checkpoints: `AutoModelFor*.from_pretrained` loads them (kroncompress
imported) with the logits of `kc.load_compressed` and of the model that was saved, `save_pretrained` of a
compressed model writes a folder that reloads the same way, and plain transformers refuses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import kroncompress as kc
from kroncompress import hf
from kroncompress.layers.base import FactorizedLinear

from conftest import build_inputs, build_tiny, tiny_config, logits, recipe_of

ROOT = Path(__file__).resolve().parents[1]




# every strategy x architecture through from_pretrained and save_pretrained is tests/test_contract.py; here,
# layer dropping with factorized blocks (the saved plan's names are the renumbered blocks')
CASES = [("llama", "layerdrop", [(["model.layers"], "layerdrop", {"keep": [1]}), (["role:mlp"], "svd", {"rank": 8})])]


def compressed(arch: str, rules) -> torch.nn.Module:
    model = build_tiny(arch, num_hidden_layers=3) if arch == "llama" else build_tiny(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight-only initialisation
        kc.compress(model, recipe_of(*rules))
    return model


@pytest.mark.parametrize("arch, case, rules", CASES, ids=[f"{a}-{c}" for a, c, _ in CASES])
def test_from_pretrained_gives_the_logits_of_load_compressed(tmp_path, arch, case, rules):
    model, inputs = compressed(arch, rules), build_inputs(arch)
    expected = logits(model, inputs)
    folder = kc.save_compressed(model, tmp_path / "out")

    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is type(model) and not loaded.training
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    assert torch.equal(logits(loaded, inputs), expected)
    assert torch.equal(logits(kc.load_compressed(folder), inputs), expected)

    # save_pretrained of the reloaded model (and of the in-memory compressed one) reloads the same way
    for source, name in ((loaded, "resaved"), (model, "saved")):
        source.save_pretrained(tmp_path / name)
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert torch.equal(logits(again, inputs), expected), name
        assert torch.equal(logits(kc.load_compressed(tmp_path / name), inputs), expected), name


ARCH_CASES = [("bert", transformers.AutoModelForMaskedLM, ["bert.embeddings.word_embeddings", "role:mlp"]),  # tied decoder
              ("opt", transformers.AutoModelForCausalLM, ["role:embedding", "role:mlp"]),
              ("gpt_neox", transformers.AutoModelForCausalLM, ["role:mlp"]),
              ("vit", transformers.AutoModelForImageClassification, ["role:mlp"])]


@pytest.mark.parametrize("arch, auto, targets", ARCH_CASES, ids=[a for a, _, _ in ARCH_CASES])
def test_other_architectures_load_through_their_auto_class(tmp_path, arch, auto, targets, caplog):
    model, inputs = compressed(arch, [(targets, "kronecker", {"ratio": 2})]), build_inputs(arch)
    folder = kc.save_compressed(model, tmp_path / "out")
    loaded = auto.from_pretrained(folder)
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert "MISSING" not in caplog.text  # a tied tensor stored once is not reported as newly initialised

    # save_pretrained writes some architectures (ViT) under their legacy checkpoint names, renamed on load
    model.save_pretrained(tmp_path / "saved")
    for again in (auto.from_pretrained(tmp_path / "saved"), kc.load_compressed(tmp_path / "saved")):
        assert torch.equal(logits(again, inputs), logits(model, inputs))


def test_a_folder_without_factorized_modules_is_a_plain_checkpoint(tmp_path):
    model = compressed("llama", [(["model.layers"], "layerdrop", {"keep": [0, 2]})])
    folder = kc.save_compressed(model, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config


def test_other_auto_classes_load_their_compressed_models(tmp_path):
    inputs = build_inputs("llama")
    for auto, model in ((transformers.AutoModel, transformers.LlamaModel(tiny_config("llama"))),
                        (transformers.AutoModelForSequenceClassification,
                         transformers.LlamaForSequenceClassification(tiny_config("llama", num_labels=3)))):
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kc.compress(model, recipe_of((["re:.*mlp\\..*"], "svd", {"rank": 8})))
        folder = kc.save_compressed(model, tmp_path / auto.__name__)
        loaded = auto.from_pretrained(folder)
        assert type(loaded) is type(model)
        assert isinstance(loaded.get_submodule(next(iter(model.config.kroncompress["modules"]))), FactorizedLinear)
        with torch.no_grad():
            got, want = loaded(**inputs), model(**inputs)
        key = "last_hidden_state" if auto is transformers.AutoModel else "logits"
        assert torch.equal(got[key], want[key]), auto.__name__


def test_from_pretrained_refuses_a_file_missing_a_factor(tmp_path):
    folder = kc.save_compressed(compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})]), tmp_path / "out")
    weights = load_file(folder / "model.safetensors")
    del weights["transformer.h.0.mlp.c_fc.u"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys: transformer\.h\.0\.mlp\.c_fc\.u"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def _run(code: str, folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=folder.parent)


def test_plain_transformers_refuses_a_compressed_folder(tmp_path):
    model = compressed("gpt2", [(["transformer.wte"], "kronecker", {"b_shape": [1, 2]})])
    kc.save_compressed(model, tmp_path / "saved")
    model.save_pretrained(tmp_path / "save_pretrained")
    # kroncompress hidden: importing it fails, as where it is not installed
    plain = ("import sys\nsys.modules['kroncompress'] = None\nimport transformers\n"
             "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\nprint('loaded')")
    for name in ("saved", "save_pretrained"):
        done = _run(plain, tmp_path / name)
        assert done.returncode != 0 and "loaded" not in done.stdout, name
        assert hf.REFUSAL in done.stderr and "pip install kroncompress" in done.stderr, done.stderr[-2000:]


def test_a_bare_import_kroncompress_registers_the_format(tmp_path):
    folder = kc.save_compressed(compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})]), tmp_path / "out")
    code = ("import sys\nimport kroncompress\nassert 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "print(type(model.transformer.h[0].mlp.c_fc).__name__)")
    done = _run(code, folder)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "LowRankLinear"


def test_to_dense_drops_the_checkpoint_marks(tmp_path):
    model = kc.to_dense(compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})]))
    assert getattr(model.config, "quantization_config", None) is None and "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def test_dequantize_of_a_loaded_model_gives_the_dense_model(tmp_path):
    model, inputs = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})]), build_inputs("gpt2")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(kc.save_compressed(model, tmp_path / "out"))
    dense = loaded.dequantize()
    assert type(dense.transformer.h[0].mlp.c_fc) is transformers.pytorch_utils.Conv1D
    assert getattr(dense.config, "quantization_config", None) is None
    dense.save_pretrained(tmp_path / "dense")  # a plain checkpoint: loads without kroncompress
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    # dense weights are the factors multiplied out (float32 rounding, other summation order): the bound of
    # the to_dense check in docs/recipes.md and tests/test_io.py
    torch.testing.assert_close(logits(plain, inputs), logits(model, inputs), rtol=0, atol=1e-5)


def test_distillation_leaves_the_cache_and_attention_implementation_as_they_were(tmp_path):
    from kroncompress.distill.trainer import distill
    from kroncompress.recipe import DistillConfig, TrainConfig

    teacher = build_tiny("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    teacher.set_attn_implementation("sdpa")
    student = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})])
    student.set_attn_implementation("sdpa")
    assert student.config.use_cache is True
    config = DistillConfig(train=TrainConfig(batch_size=2, lr=1e-3, warmup_ratio=0.0, max_steps=1, seed=0))
    assert config.losses.attention_kl > 0  # needs attention maps: training switches both models to eager
    data = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    distill(student, teacher, config, data, output_dir=tmp_path / "run", progress=False)

    for model in (student, teacher):
        assert model.config.use_cache is True and model.config._attn_implementation == "sdpa"
    folder = kc.save_compressed(student, tmp_path / "out")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["use_cache"] is True and saved["kroncompress"]["attn_implementation"] == "sdpa"
    for loaded in (transformers.AutoModelForCausalLM.from_pretrained(folder), kc.load_compressed(folder)):
        assert loaded.config.use_cache is True and loaded.config._attn_implementation == "sdpa"


def test_push_to_hub_uploads_a_marked_folder(tmp_path, monkeypatch):
    """push_to_hub saves through the model's save_pretrained: the uploaded folder is a kroncompress checkpoint
    (the hub itself replaced by a local copy, offline)."""
    import shutil
    import types

    import transformers.utils.hub as hub

    uploaded = tmp_path / "uploaded"
    repo = types.SimpleNamespace(create_repo=lambda repo_id, **_: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(hub, "hf_api", lambda: repo)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *_, **__: types.SimpleNamespace(save=lambda path: None))
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files",
                        lambda self, folder, *_, **__: shutil.copytree(folder, uploaded))
    model, inputs = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})]), build_inputs("gpt2")
    model.push_to_hub("someone/tiny-compressed")
    config = json.loads((uploaded / "config.json").read_text())
    assert config["transformers_weights"] == hf.REFUSAL and config["quantization_config"]["quant_method"] == "kroncompress"
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(uploaded), inputs), logits(model, inputs))


def test_a_reloaded_model_generates_as_the_saved_one_with_the_cache(tmp_path):
    model = compressed("gpt2", [(["transformer.wte"], "kronecker", {"b_shape": [1, 2]}), (["role:mlp"], "svd", {"rank": 8})])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(kc.save_compressed(model, tmp_path / "out"))
    prompt = build_inputs("gpt2", batch=1, length=4)["input_ids"]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert loaded.config.use_cache is True and loaded.generation_config.use_cache is not False
    assert torch.equal(loaded.generate(prompt, **settings), model.generate(prompt, **settings))


def test_a_folder_saved_before_the_format_loads_and_converts(tmp_path):
    model, inputs = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})]), build_inputs("gpt2")
    old = kc.save_compressed(model, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"], config["transformers_weights"]  # as written before this format
    (old / "config.json").write_text(json.dumps(config))
    reloaded = kc.load_compressed(old)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))
    new = kc.save_compressed(reloaded, tmp_path / "new")
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(new), inputs), logits(model, inputs))


def test_a_kronecker_gpt2_sequence_classifier_saves_and_reloads(tmp_path):
    """Issue 11: the paper's decoder classifier (last-token pooling over a padded batch) survives
    save_compressed / save_pretrained and comes back through from_pretrained and load_compressed."""
    model = transformers.GPT2ForSequenceClassification(tiny_config("gpt2", num_labels=3, pad_token_id=0)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight-only initialisation
        kc.compress(model, recipe_of((["role:attention", "role:mlp"], "kronecker", {"ratio": 2})))
    ids = build_inputs("gpt2", batch=3, length=10)["input_ids"]
    ids[1, 6:] = 0  # a shorter row, right-padded: pooled at its own last token
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    expected = logits(model, inputs)
    assert expected.shape == (3, 3)
    kc.save_compressed(model, tmp_path / "compressed")
    model.save_pretrained(tmp_path / "saved")
    for folder in (tmp_path / "compressed", tmp_path / "saved"):
        for again in (transformers.AutoModelForSequenceClassification.from_pretrained(folder),
                      kc.load_compressed(folder)):
            assert type(again) is transformers.GPT2ForSequenceClassification
            assert isinstance(again.transformer.h[0].mlp.c_fc, kc.KroneckerLinear)
            assert torch.equal(logits(again, inputs), expected), folder.name


def test_finetune_is_a_top_level_name():
    from kroncompress.tasks import finetune

    assert kc.finetune is finetune


@pytest.mark.parametrize("edit", ["marker removed", "AutoConfig round trip"])
def test_from_pretrained_loads_a_folder_whose_marker_is_gone(tmp_path, edit):
    """A `kroncompress` plan in config.json makes a folder a kroncompress checkpoint, marker or not: a folder
    saved before the marker existed, or after `AutoConfig.from_pretrained(f).save_pretrained(f)` (which drops
    `transformers_weights`), loads its factors, never the bare architecture with random weights."""
    model, inputs = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8})]), build_inputs("gpt2")
    folder = kc.save_compressed(model, tmp_path / "out")
    if edit == "marker removed":
        config = json.loads((folder / "config.json").read_text())
        del config["quantization_config"], config["transformers_weights"]
        (folder / "config.json").write_text(json.dumps(config))
    else:
        transformers.AutoConfig.from_pretrained(folder).save_pretrained(folder)
        assert "transformers_weights" not in json.loads((folder / "config.json").read_text())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(loaded.transformer.h[0].mlp.c_fc, FactorizedLinear)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_a_compressed_causal_lm_loads_as_its_base_model_and_under_a_new_head(tmp_path):
    """AutoModel gives the compressed LM's body (the same hidden states); AutoModelForSequenceClassification the
    same body under a new head (transformers warns that `score` is newly initialised), the tied head dropped."""
    model = compressed("gpt2", [(["role:mlp"], "svd", {"rank": 8}), (["transformer.wte"], "kronecker", {"b_shape": [1, 2]})])
    inputs = build_inputs("gpt2")
    folder = kc.save_compressed(model, tmp_path / "out")
    with torch.no_grad():
        want = model.transformer(**inputs).last_hidden_state
    body = transformers.AutoModel.from_pretrained(folder)
    assert type(body) is transformers.GPT2Model and isinstance(body.h[0].mlp.c_fc, FactorizedLinear)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(body(**inputs).last_hidden_state, want)
        assert torch.equal(classifier.transformer(**inputs).last_hidden_state, want)
        assert torch.isfinite(classifier(**inputs).logits).all()
