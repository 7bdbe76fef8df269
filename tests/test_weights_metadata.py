"""model.safetensors of a compressed folder names its writer and format version; folders without that
metadata (written before it existed) still load, a newer format is refused with a message."""

from __future__ import annotations

import warnings

import pytest
import transformers
from safetensors.torch import load_file, save_file

import kroncompress as kc
from kroncompress.io.metadata import FORMAT_VERSION, read_metadata

from conftest import build_inputs, build_tiny, logits, recipe_of


@pytest.fixture
def folder(tmp_path):
    model = build_tiny("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight-only initialisation
        kc.compress(model, recipe_of((["role:mlp"], "kronecker", {"ratio": 2})))
    return kc.save_compressed(model, tmp_path / "out"), model


def _rewrite(path, metadata):
    save_file(load_file(str(path)), str(path), metadata=metadata)


def test_saved_weights_name_the_format_and_version(folder):
    path, _ = folder
    assert read_metadata(path / "model.safetensors") == {
        "format": "pt", "kroncompress_version": kc.__version__, "kroncompress_format": str(FORMAT_VERSION)}


@pytest.mark.parametrize("load", ["load_compressed", "from_pretrained"])
def test_a_folder_without_our_metadata_still_loads(folder, load):
    path, model = folder
    _rewrite(path / "model.safetensors", {"format": "pt"})
    loaded = (kc.load_compressed(path) if load == "load_compressed"
              else transformers.AutoModelForCausalLM.from_pretrained(path))
    inputs = build_inputs("gpt2")
    assert (logits(loaded, inputs) - logits(model, inputs)).abs().max() == 0


@pytest.mark.parametrize("load", ["load_compressed", "from_pretrained"])
def test_a_newer_format_is_refused_with_the_upgrade(folder, load):
    path, _ = folder
    _rewrite(path / "model.safetensors", {"format": "pt", "kroncompress_version": "9.0.0",
                                          "kroncompress_format": str(FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match=r"written by kroncompress 9\.0\.0 .*pip install -U kroncompress"):
        if load == "load_compressed":
            kc.load_compressed(path)
        else:
            transformers.AutoModelForCausalLM.from_pretrained(path)


def test_a_malformed_format_number_is_named(folder):
    path, _ = folder
    _rewrite(path / "model.safetensors", {"format": "pt", "kroncompress_format": "one"})
    with pytest.raises(ValueError, match="kroncompress_format='one' is not a format number"):
        kc.load_compressed(path)
