"""Bad inputs at load time: damaged, tampered or foreign model folders end in one `error:` line and exit 2.

Table-driven, like the recipe tests: each case names a setup that damages a copy of a good folder, the
command line to run, the expected exit code and the words the message must contain. Every case here
failed on the code before it (a traceback with exit 1, a silent success, or an IndexError later on).
`python tests/test_bad_input_load.py KRONCOMPRESS_BINARY...` runs the table against installed commands
and prints exit code and first line per case (how the issue's before/after table was made).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import BertConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64)
BYTE_VOCAB = dict(vocab_size=257, bos_token_id=256, eos_token_id=256)
MLP_WEIGHT = "transformer.h.0.mlp.c_fc.weight"
SVD_MODULE = "transformer.h.0.mlp.c_fc"


# -- good folders the cases start from ------------------------------------------------------------

def build_bases(root: Path) -> dict[str, Path]:
    """A tiny GPT-2 with its byte tokenizer, the same compressed (svd on the MLPs), and a text file."""
    import kroncompress as kc
    from kroncompress.recipe import Recipe
    from kroncompress.tokenizers import byte_tokenizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY, **BYTE_VOCAB)).eval()
    tokenizer = byte_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    recipe = Recipe.from_dict({"version": 1, "name": "test", "compress": [
        {"targets": ["role:mlp"], "strategy": "svd", "options": {"rank": 4}}]})
    kc.compress(model, recipe)
    kc.save_compressed(model, root / "compressed", tokenizer=tokenizer)
    (root / "text.txt").write_text("To be, or not to be, that is the question. " * 8, encoding="utf-8")
    return {"model": root / "model", "compressed": root / "compressed", "text": root / "text.txt"}


def _copy(bases, kind: str, tmp: Path, name: str = "case") -> Path:
    target = tmp / name
    shutil.copytree(bases[kind], target)
    return target


def _edit_tensors(folder: Path, edit: Callable[[dict], None]) -> Path:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _edit_section(folder: Path, edit: Callable[[dict], None]) -> Path:
    config = json.loads((folder / "config.json").read_text())
    edit(config["kroncompress"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _truncate(folder: Path) -> Path:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _config_only(tmp: Path, config, architecture: str) -> Path:
    config.architectures = [architecture]  # what every real config.json carries
    config.save_pretrained(tmp / "config-only")
    return tmp / "config-only"


class _Payload:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_only(bases, tmp: Path) -> Path:
    folder = tmp / "pickled"
    folder.mkdir()
    shutil.copy(bases["model"] / "config.json", folder / "config.json")
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weights": _Payload(tmp / "PWNED")}, handle)
    return folder


def _without_tokenizer(folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    return folder


def _checkpoint(bases, tmp: Path) -> Path:
    """<output>/checkpoints/checkpoint-3 as the trainer writes it: weights and config, the run's tokenizer above."""
    checkpoints = tmp / "run" / "checkpoints"
    checkpoint = _without_tokenizer(_copy(bases, "compressed", checkpoints, "checkpoint-3"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bases["compressed"] / name, checkpoints / name)
    return checkpoint


def _foreign_vocabulary(tmp: Path) -> Path:
    """A model whose 128-token vocabulary is not GPT-2's, saved without a tokenizer."""
    GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=128, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp / "foreign")
    return tmp / "foreign"


def _set_nan(name: str) -> Callable[[dict], None]:
    def edit(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[3] = float("nan")
    return edit


def _first_factor(folder: Path) -> str:
    return sorted(k for k in load_file(str(folder / "model.safetensors")) if k.startswith(SVD_MODULE + "."))[0]


def _int32_factor(folder: Path) -> Path:
    name = _first_factor(folder)
    return _edit_tensors(folder, lambda d: d.__setitem__(name, d[name].to(torch.int32)))


def _nan_factor(folder: Path) -> Path:
    return _edit_tensors(folder, _set_nan(_first_factor(folder)))


def _garbage(folder: Path) -> Path:
    (folder / "model.safetensors").write_bytes(b"not a safetensors file" * 50)
    return folder


INDEPENDENT = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]


def _edit_config(folder: Path, **values) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _config_round_trip(folder: Path) -> Path:
    """`AutoConfig.from_pretrained(f).save_pretrained(f)`: transformers drops `transformers_weights`."""
    from transformers import AutoConfig

    AutoConfig.from_pretrained(folder).save_pretrained(folder)
    return folder


def _recipe(tmp: Path, strategy: str, options: dict) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(json.dumps({"version": 1, "name": "case", "compress": [
        {"targets": [SVD_MODULE], "strategy": strategy, "options": options}]}))
    return path


# -- the table ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[dict, Path], list]  # (bases, tmp) -> command line (after `kroncompress`)
    exit_code: int
    words: tuple[str, ...]  # every one must appear in the error line (exit 2) or the output (exit 0)


def _plan(folder, recipe: str = "kn-gpt2"):
    return ["plan", folder, "--recipe", recipe, "--json"]


def _export(folder, tmp):
    return ["export", folder, "--dense", "--output", tmp / "exported"]


def _eval(folder, bases):
    return ["eval", folder, "--data", bases["text"], "--block-size", "32", "--stride", "16"]


CASES = [
    # 1: config-only folders with the `architectures` every real config.json carries: planned on meta
    Case("plan-config-only-gpt2", lambda b, t: _plan(_config_only(t, GPT2Config(), "GPT2LMHeadModel")), 0,
         ('"meta": true', "params_after")),
    Case("plan-config-only-llama", lambda b, t: _plan(_config_only(t, LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000),
        "LlamaForCausalLM"), "kron-llama"), 0, ('"meta": true',)),
    Case("plan-config-only-bert-classifier", lambda b, t: _plan(_config_only(t, BertConfig(num_hidden_layers=2),
                                                                             "BertForSequenceClassification"), "kron-bert"), 0,
         ('"meta": true',)),
    # 3: the checkpoint does not hold what config.json builds
    Case("missing-tensor", lambda b, t: _plan(_edit_tensors(_copy(b, "model", t), lambda d: d.pop(MLP_WEIGHT))), 2,
         ("lacks", MLP_WEIGHT, "random")),
    Case("unexpected-tensor", lambda b, t: _plan(_edit_tensors(
        _copy(b, "model", t), lambda d: d.__setitem__("transformer.h.2.mlp.c_fc.weight", torch.zeros(64, 256)))), 2,
         ("transformer.h.2.mlp.c_fc.weight", "do not belong together")),
    # 6: tokenizers
    Case("eval-foreign-vocabulary-without-tokenizer", lambda b, t: _eval(_foreign_vocabulary(t), b), 2,
         ("tokenizer", "128", "save_pretrained")),
    Case("eval-checkpoint-uses-the-runs-tokenizer", lambda b, t: _eval(_checkpoint(b, t), b), 0,
         ("perplexity", "block 32")),
    # 9: damaged weight files, pickles, tampered compressed configs, NaN source weights
    Case("plan-truncated-weights", lambda b, t: _plan(_truncate(_copy(b, "model", t))), 2,
         ("model.safetensors", "truncated", "re-download")),
    Case("plan-garbage-weights", lambda b, t: _plan(_garbage(_copy(b, "model", t))), 2,
         ("model.safetensors", "not a safetensors file")),
    Case("eval-truncated-compressed", lambda b, t: _eval(_truncate(_copy(b, "compressed", t)), b), 2,
         ("model.safetensors", "truncated")),
    Case("export-truncated-compressed", lambda b, t: _export(_truncate(_copy(b, "compressed", t)), t), 2,
         ("model.safetensors", "truncated")),
    Case("pickle-only-refused", lambda b, t: _plan(_pickle_only(b, t)), 2,
         ("pytorch_model.bin", "never unpickles", "save_pretrained")),
    Case("config-no-plan-key", lambda b, t: _export(_edit_section(
        _copy(b, "compressed", t), lambda s: s["modules"][SVD_MODULE].pop("plan")), t), 2,
         (SVD_MODULE, "'plan'", "config.json")),
    Case("config-bogus-shared-parameters", lambda b, t: _export(_edit_section(
        _copy(b, "compressed", t), lambda s: s.__setitem__("shared_parameters", [["transformer.wte.weight", "nope.weight"]])), t), 2,
         ("shared_parameters", "nope")),
    Case("config-negative-rank", lambda b, t: _export(_edit_section(
        _copy(b, "compressed", t), lambda s: s["modules"][SVD_MODULE]["plan"]["spec"].__setitem__("rank", -4)), t), 2,
         (SVD_MODULE, "spec.rank", "positive")),
    Case("config-unknown-module", lambda b, t: _export(_edit_section(
        _copy(b, "compressed", t), lambda s: s["modules"].__setitem__("transformer.h.7.mlp.c_fc", s["modules"][SVD_MODULE])), t), 2,
         ("transformer.h.7.mlp.c_fc", "no module")),
    Case("config-unknown-strategy", lambda b, t: _export(_edit_section(
        _copy(b, "compressed", t), lambda s: s["modules"][SVD_MODULE].__setitem__("strategy", "kronekcer")), t), 2,
         (SVD_MODULE, "strategy", "kronekcer")),
    Case("nan-source-weights", lambda b, t: _plan(_edit_tensors(_copy(b, "model", t), _set_nan(MLP_WEIGHT))), 2,
         (MLP_WEIGHT, "NaN", "corrupt")),
    # 14: saved folders validated on load; inspect reports damage
    Case("export-int32-factors", lambda b, t: _export(_int32_factor(_copy(b, "compressed", t)), t), 2,
         ("int32", SVD_MODULE)),
    Case("export-nan-factors", lambda b, t: _export(_nan_factor(_copy(b, "compressed", t)), t), 2, ("NaN", SVD_MODULE)),
    Case("export-wrong-plan-shape", lambda b, t: _export(_edit_section(
        _copy(b, "compressed", t), lambda s: s["modules"][SVD_MODULE]["plan"].__setitem__("shape", [128, 64])), t), 2,
         (SVD_MODULE, "plan", "(256, 64)")),
    Case("inspect-truncated-weights", lambda b, t: ["inspect", _truncate(_copy(b, "compressed", t))], 2,
         ("damaged", "truncated")),
    Case("inspect-int32-factors", lambda b, t: ["inspect", _int32_factor(_copy(b, "compressed", t))], 2,
         ("damaged", "int32")),
    # issue 27: tampered folders (one loader check, kroncompress.io.verify), sizes checked before allocating
    Case("inspect-huge-n-embd", lambda b, t: ["inspect", _edit_config(_copy(b, "compressed", t), n_embd=10**7)], 2,
         ("damaged", "40000000")),
    Case("export-shared-parameters-tie-independent", lambda b, t: _export(_edit_section(
        _copy(b, "compressed", t), lambda s: s["shared_parameters"].append(INDEPENDENT)), t), 2,
         ("shared_parameters", INDEPENDENT[1], "different tensors")),
    Case("export-tied-is-a-string", lambda b, t: _export(_edit_section(
        _copy(b, "compressed", t), lambda s: s["modules"][SVD_MODULE].__setitem__("tied", "lm_head")), t), 2,
         (SVD_MODULE, ".tied", "must be a list")),
    Case("inspect-marker-lost-by-config-round-trip", lambda b, t: ["inspect", _config_round_trip(_copy(b, "compressed", t))],
         2, ("lacks the kroncompress checkpoint marker", "random weights", "mark_config")),
    Case("plan-b-shape-whole-weight", lambda b, t: _plan(b["model"], _recipe(t, "kronecker", {
        "a_shape": [1, 1], "b_shape": [256, 64]})), 2, ("b_shape", "16,641", "whole 256 x 64 weight", "does not compress")),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return build_bases(tmp_path_factory.mktemp("bases"))


@pytest.fixture(autouse=True)
def offline():
    """No test may touch the network: the hub check answers 'offline'."""
    from kroncompress import hub

    hub.set_online(False)
    yield
    hub.set_online(None)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage()[:200])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_load_input(case, bases, tmp_path):
    from kroncompress.cli.main import cli

    argv = [str(a) for a in case.setup(bases, tmp_path)]
    records = _Records()  # transformers' loggers do not propagate and write to the real stderr
    logging.getLogger("transformers").addHandler(records)
    try:
        result = CliRunner(env={"COLUMNS": "220"}).invoke(cli, argv)
    finally:
        logging.getLogger("transformers").removeHandler(records)
    assert result.exit_code == case.exit_code, (result.output, result.exception)
    assert "Traceback" not in result.output
    if case.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert records.messages == []  # nor a load report or warning before it
        text = lines[0]
    else:
        text = result.stdout
    for word in case.words:
        assert word in text, (word, text)
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled


# -- the Python API: from_pretrained, save_compressed and LoRA (issue 27, items 3, 4, 5, 9, 12) ---------------
# Each setup returns a call that must raise one ValueError line holding every word: the same check as
# kc.load_compressed (kroncompress.io.verify) now runs inside from_pretrained.

def _from_pretrained(folder: Path, **kwargs) -> Callable[[], object]:
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def _bin_only(folder: Path, drop: str) -> Path:
    state = load_file(str(folder / "model.safetensors"))
    state.pop(drop)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def _wrong_factor_shape(folder: Path) -> Path:
    name = SVD_MODULE + ".u"
    return _edit_tensors(folder, lambda d: d.__setitem__(name, torch.zeros(d[name].shape[0], d[name].shape[1] + 1)))


def _stale_plan(bases, tmp: Path):
    """A model whose layers hold rank 5 while its recorded plan says 4 (what a half-done merge left)."""
    import kroncompress as kc
    from kroncompress.layers.lowrank import LowRankLinear

    model = kc.load_compressed(bases["compressed"])
    layer = model.get_submodule(SVD_MODULE)
    assert isinstance(layer, LowRankLinear)
    layer.u = torch.nn.Parameter(torch.cat([layer.u.data, torch.zeros(layer.u.shape[0], 1)], 1))
    layer.v = torch.nn.Parameter(torch.cat([layer.v.data, torch.zeros(1, layer.v.shape[1])], 0))
    return lambda: kc.save_compressed(model, tmp / "saved")


def _mixed_peft(bases, nan: bool = False):
    """SVD attention + Kronecker MLP, LoRA on every factorised layer (B non-zero, as after training)."""
    import kroncompress as kc
    from kroncompress.recipe import Recipe
    from peft import get_peft_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY, **BYTE_VOCAB)).eval()
    rules = [{"targets": ["role:attention"], "strategy": "svd", "options": {"rank": 4, "init": "svd"}}]
    if not nan:
        rules.append({"targets": ["role:mlp"], "strategy": "kronecker", "options": {"ratio": 2, "init": "nkp"}})
    kc.compress(model, Recipe.from_dict({"version": 1, "name": "mixed", "compress": rules}))
    peft_model = get_peft_model(model, kc.lora.lora_config(r=8, target_modules=kc.lora.lora_targets(model)))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
        if nan and "lora_A" in name:
            param.data.view(-1)[0] = float("nan")
    return peft_model


def _merge_mixed(bases, tmp):
    import kroncompress as kc
    from kroncompress.layers.lowrank import LowRankLinear

    peft_model = _mixed_peft(bases)

    def call():
        try:
            kc.lora.merge(peft_model)
        finally:  # all or nothing: no layer merged, the plan still matches the layers
            model = peft_model.base_model.model
            assert all(m.rank == 4 for m in model.modules() if isinstance(m, LowRankLinear))
            assert {e["plan"]["spec"].get("rank") for n, e in model.config.kroncompress["modules"].items() if "attn" in n} == {4}
    return call


def _nan_adapter(bases, tmp):
    import kroncompress as kc

    peft_model = _mixed_peft(bases, nan=False)
    peft_model.save_pretrained(tmp / "adapter")
    path = tmp / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    _set_nan(sorted(tensors)[0])(tensors)
    save_file(tensors, str(path))
    return lambda: kc.lora.load_adapter(_mixed_peft(bases).unload(), str(tmp / "adapter"))


def _merge_nan(bases, tmp):
    import kroncompress as kc

    return lambda: kc.lora.merge(_mixed_peft(bases, nan=True))


@dataclass(frozen=True)
class ApiCase:
    id: str
    setup: Callable[[dict, Path], Callable[[], object]]
    words: tuple[str, ...]


API_CASES = [
    ApiCase("from-pretrained-nan-factor", lambda b, t: _from_pretrained(_nan_factor(_copy(b, "compressed", t))),
            ("model.safetensors", SVD_MODULE, "NaN")),
    ApiCase("from-pretrained-int32-factor", lambda b, t: _from_pretrained(_int32_factor(_copy(b, "compressed", t))),
            (SVD_MODULE, "int32", "float32")),
    ApiCase("from-pretrained-factor-shape-ignore-mismatched-sizes", lambda b, t: _from_pretrained(
        _wrong_factor_shape(_copy(b, "compressed", t)), ignore_mismatched_sizes=True), (SVD_MODULE, "has shape")),
    ApiCase("from-pretrained-bin-only-missing-factor", lambda b, t: _from_pretrained(
        _bin_only(_copy(b, "compressed", t), SVD_MODULE + ".u")), ("pytorch_model.bin", "missing keys", SVD_MODULE + ".u")),
    ApiCase("from-pretrained-shared-parameters-tie-independent", lambda b, t: _from_pretrained(_edit_section(
        _copy(b, "compressed", t), lambda s: s["shared_parameters"].append(INDEPENDENT))),
            ("shared_parameters", INDEPENDENT[1], "different tensors")),
    ApiCase("from-pretrained-section-a-list", lambda b, t: _from_pretrained(_edit_config(
        _copy(b, "compressed", t), kroncompress=["x"])), ("config.json", "kroncompress", "not an object")),
    ApiCase("from-pretrained-tied-a-string", lambda b, t: _from_pretrained(_edit_section(
        _copy(b, "compressed", t), lambda s: s["modules"][SVD_MODULE].__setitem__("tied", "lm_head"))), (".tied", "must be a list")),
    ApiCase("from-pretrained-truncated", lambda b, t: _from_pretrained(_truncate(_copy(b, "compressed", t))),
            ("model.safetensors", "truncated")),
    ApiCase("from-pretrained-another-quantization-config", lambda b, t: _from_pretrained(_edit_config(
        _copy(b, "compressed", t), quantization_config={"quant_method": "bitsandbytes"})), ("quantization_config", "kroncompress")),
    ApiCase("save-compressed-plan-disagrees-with-layers", _stale_plan, ("would not reload", SVD_MODULE, "has shape")),
    ApiCase("lora-merge-mixed-model", _merge_mixed, ("KroneckerLinear", "nothing was merged")),
    ApiCase("lora-load-nan-adapter", _nan_adapter, ("adapter", "NaN")),
    ApiCase("lora-merge-nan-adapter", _merge_nan, ("lora_A", "NaN", "nothing was merged")),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_bad_api_input(case, bases, tmp_path):
    pytest.importorskip("peft") if case.id.startswith("lora") else None
    call = case.setup(bases, tmp_path)
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for word in case.words:
        assert word in message, (word, message)
    assert not (tmp_path / "saved").exists()  # save_compressed put nothing in place


def test_offline_hub_id_fails_at_once_with_one_line():
    from kroncompress.cli.main import cli

    result = CliRunner().invoke(cli, ["plan", "kroncompress-tests/no-such-model", "--recipe", "kn-gpt2"])
    assert result.exit_code == 2, result.output
    line, = result.stderr.strip().splitlines()
    assert "could not be fetched" in line and "no connection" in line and "local folder" in line


def run_table(binaries: list[str]) -> None:
    """Print `case | binary: exit code, first line` for each case, running each binary from a temp folder."""
    with tempfile.TemporaryDirectory() as root:
        built = build_bases(Path(root))
        for case in CASES:
            tmp = Path(tempfile.mkdtemp(dir=root))
            argv = [str(a) for a in case.setup(built, tmp)]
            cells = []
            for binary in binaries:
                shutil.rmtree(tmp / "exported", ignore_errors=True)
                done = subprocess.run([binary, *argv], cwd=tmp, capture_output=True, text=True,
                                      env={**os.environ, "COLUMNS": "220"})
                lines = (done.stderr if done.returncode else done.stdout).strip().splitlines()
                first = next((line for line in reversed(lines) if line.strip()), "") if done.returncode == 1 else (
                    lines[0] if lines else "")
                cells.append(f"{done.returncode}: {first[:150]}")
            print(f"| {case.id} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    run_table(sys.argv[1:])
