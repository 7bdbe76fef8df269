"""The `kroncompress` CLI end to end on tiny local GPT-2 folders (CliRunner, no network)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from kroncompress.cli.main import cli

TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)

needs_surgery = pytest.mark.skipif(importlib.util.find_spec("kroncompress.surgery") is None,
                                   reason="kroncompress/surgery.py not there yet")
needs_io = pytest.mark.skipif(importlib.util.find_spec("kroncompress.io") is None,
                              reason="kroncompress/io.py not there yet")


def _has_recipe(name: str) -> bool:
    from kroncompress.recipe import list_recipes

    return name in dict(list_recipes())


def run(*args: str):
    # a fixed wide terminal: under pytest-xdist COLUMNS may be narrow, and rich would shorten module names
    return CliRunner(env={"COLUMNS": "220"}).invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT-2 saved with weights (random init, seeded)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(**TINY)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_config_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-config-only")
    GPT2Config(**TINY, architectures=["GPT2LMHeadModel"]).save_pretrained(folder)  # as a real config.json has
    return folder


@pytest.fixture(scope="module")
def compressed(tiny_gpt2, tmp_path_factory):
    """`kroncompress compress` of the tiny GPT-2 with kn-gpt2: (result, output folder)."""
    if importlib.util.find_spec("kroncompress.surgery") is None or importlib.util.find_spec("kroncompress.io") is None:
        pytest.skip("kroncompress/surgery.py or kroncompress/io.py not there yet")
    output = tmp_path_factory.mktemp("runs") / "kn-tiny"
    return run("compress", tiny_gpt2, "--recipe", "kn-gpt2", "--output", output, "--no-distill"), output


# -- help, version, listings -----------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["plan"], ["compress"], ["calibrate"], ["strategies"], ["recipes"], ["inspect"], ["export"], ["eval"]])
def test_every_help_shows_an_example(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "kroncompress " in result.output.split("Example:")[1]


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and "kroncompress" in result.output and "0." in result.output


@pytest.mark.parametrize("command, expected", [
    (["strategies"], ["kronecker", "svd", "ratio", "embedding"]),
    (["recipes"], ["kn-gpt2", "kn-gpt2-mlp"]),
])
def test_listings_table(command, expected):
    result = run(*command)
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.stdout


def test_strategies_json_lists_options_from_the_config_dataclass():
    rows = {row["name"]: row for row in json.loads(run("strategies", "--json").stdout)}
    kron = rows["kronecker"]
    assert {o["name"] for o in kron["options"]} >= {"ratio", "a_shape", "b_shape", "rank"}
    assert "embedding" in kron["kinds"] and kron["description"]


def test_recipes_json_matches_the_library():
    from kroncompress.recipe import list_recipes

    rows = json.loads(run("recipes", "--json").stdout)
    assert [(r["name"], r["description"]) for r in rows] == list_recipes()


# -- plan ---------------------------------------------------------------------------------------

@needs_surgery
def test_plan_json_on_gpt2_small_config_only(tmp_path):
    """The issue's acceptance check: GPT-2 small planned on shapes only."""
    if not _has_recipe("kn-gpt2"):
        pytest.skip("bundled recipe kn-gpt2 not there yet")
    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    result = run("plan", tmp_path, "--recipe", "kn-gpt2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert data["params_before"] == 124_439_808
    assert data["params_after"] == 83_907_506
    names = {row["module"] if "module" in row else row["name"] for row in data["modules"]}
    assert "transformer.wte" in names and "transformer.h.11.mlp.c_fc" in names
    assert "transformer.h.0.mlp.c_fc" not in names


@needs_surgery
@pytest.mark.parametrize("folder", ["tiny_gpt2", "tiny_config_only"])
def test_plan_table_on_tiny_gpt2(folder, request):
    result = run("plan", request.getfixturevalue(folder), "--recipe", "kn-gpt2")
    assert result.exit_code == 0, result.output
    for text in ("transformer.wte", "transformer.h.1.attn.c_attn", "kronecker", "params"):
        assert text in result.stdout
    assert "transformer.h.0.attn.c_attn" not in result.stdout
    assert ("meta" in result.stdout) == (folder == "tiny_config_only")


@needs_surgery
def test_plan_json_matches_the_python_api(tiny_gpt2):
    import kroncompress as kc
    from kroncompress.models import load_model
    from kroncompress.recipe import load_recipe

    data = json.loads(run("plan", tiny_gpt2, "--recipe", "kn-gpt2", "--json").stdout)
    model, _ = load_model(tiny_gpt2)
    expected = kc.plan(model, load_recipe("kn-gpt2")).to_dict()
    assert (data["params_before"], data["params_after"]) == (expected["params_before"], expected["params_after"])
    assert data["params_before"] == sum(p.numel() for p in model.parameters())
    assert data["params_after"] < data["params_before"]


# -- compress, inspect, export ------------------------------------------------------------------

def test_compress_reports_and_saves(compressed):
    result, output = compressed
    assert result.exit_code == 0, result.output
    assert "transformer.h.1.mlp.c_fc" in result.stdout
    assert "after distillation" in result.stdout and "not run" in result.stdout
    assert (output / "config.json").is_file() and (output / "model.safetensors").is_file()


def test_compress_overwrite_replaces_the_folder(compressed, tiny_gpt2):
    _, output = compressed
    result = run("compress", tiny_gpt2, "--recipe", "kn-gpt2-mlp", "--output", output, "--overwrite", "--no-distill")
    assert result.exit_code == 0, result.output
    assert "transformer.h.0.mlp.c_fc" in result.stdout  # kn-gpt2-mlp also compresses block 0
    restore = run("compress", tiny_gpt2, "--recipe", "kn-gpt2", "--output", output, "--overwrite", "--no-distill")
    assert restore.exit_code == 0, restore.output


def test_inspect_summarises_the_saved_folder(compressed):
    _, output = compressed
    table = run("inspect", output)
    assert table.exit_code == 0, table.output
    assert "kn-gpt2" in table.stdout and "transformer.h.1.mlp.c_fc" in table.stdout
    data = json.loads(run("inspect", output, "--json").stdout)
    assert data["recipe"] == "kn-gpt2"
    assert data["params_after"] < data["params_before"]
    assert len(data["modules"]) == 5  # wte + the 4 matrices of block 1


def test_export_dense_loads_with_plain_transformers(compressed, tmp_path):
    import kroncompress as kc

    _, output = compressed
    dense_dir = tmp_path / "dense"
    result = run("export", output, "--dense", "--output", dense_dir)
    assert result.exit_code == 0, result.output
    again = run("export", output, "--dense", "--output", dense_dir, "--overwrite")
    assert again.exit_code == 0, again.output
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert type(dense).__name__ == "GPT2LMHeadModel"
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        expected = kc.load_compressed(output).eval()(ids).logits
        got = dense.eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# -- bad input: one line on stderr, exit code 2 --------------------------------------------------

def _bad_recipe(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nname: bad\ncompress:\n  - targets: [x]\n    strategy: kronecker\n    optoins: {ratio: 2}\n")
    return path


def _existing_output(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    return out


BAD_INPUTS = [
    # (id, args builder, text the error line must contain)
    ("missing-model-path", lambda t, m, c: ["plan", t / "no" / "such" / "model", "--recipe", "kn-gpt2"], "does not exist"),
    ("unknown-recipe", lambda t, m, c: ["plan", m, "--recipe", "kn-gtp2"], "did you mean 'kn-gpt2'"),
    ("invalid-recipe", lambda t, m, c: ["plan", m, "--recipe", _bad_recipe(t)], "optoins"),
    ("output-exists", lambda t, m, c: ["compress", m, "--recipe", "kn-gpt2", "--output", _existing_output(t)], "did not write"),
    ("compress-config-only", lambda t, m, c: ["compress", c, "--recipe", "kn-gpt2", "--output", t / "o"], "only config.json"),
    ("hub-unreachable", lambda t, m, c: ["plan", "kroncompress-tests/no-such-model", "--recipe", "kn-gpt2"], "hub"),
    ("folder-without-config", lambda t, m, c: ["plan", t, "--recipe", "kn-gpt2"], "no config.json"),
    ("inspect-plain-model", lambda t, m, c: ["inspect", m], "not a compressed"),
    ("inspect-missing", lambda t, m, c: ["inspect", t / "nothing"], "does not exist"),
    ("export-without-format", lambda t, m, c: ["export", m, "--output", t / "o"], "--dense"),
    ("export-output-exists", lambda t, m, c: ["export", m, "--dense", "--output", _existing_output(t)], "did not write"),
]


@pytest.mark.parametrize("build_args, expected", [(b, e) for _, b, e in BAD_INPUTS], ids=[i for i, _, _ in BAD_INPUTS])
def test_bad_input_prints_one_error_line_and_exits_2(build_args, expected, tmp_path, tiny_gpt2, tiny_config_only, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    result = CliRunner().invoke(cli, [str(a) for a in build_args(tmp_path, tiny_gpt2, tiny_config_only)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert result.stdout == ""
    assert "Traceback" not in result.output


# -- kroncompress.models.load_model ---------------------------------------------------------------

def _tiny_configs():
    from transformers import BertConfig, LlamaConfig, ViTConfig

    return {
        "gpt2": GPT2Config(**TINY),
        "llama": LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0),
        "bert": BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        "vit": ViTConfig(image_size=16, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4),
    }


@pytest.mark.parametrize("family, with_weights, expected_class", [
    ("gpt2", True, "GPT2LMHeadModel"),
    ("gpt2", False, "GPT2LMHeadModel"),
    ("llama", False, "LlamaForCausalLM"),
    ("bert", False, "BertModel"),  # an encoder: the bare model, not BertLMHeadModel
    ("vit", True, "ViTModel"),
])
def test_load_model_picks_the_class_and_device(family, with_weights, expected_class, tmp_path):
    from transformers import AutoConfig, AutoModel

    from kroncompress.models import load_model

    config = _tiny_configs()[family]
    if with_weights:
        cls = GPT2LMHeadModel if family == "gpt2" else AutoModel
        (cls(config) if family == "gpt2" else cls.from_config(config)).save_pretrained(tmp_path)
        config = AutoConfig.from_pretrained(tmp_path)
        config.architectures = None  # exercise the model_type fallback, not the saved class name
        config.save_pretrained(tmp_path)
    else:
        config.save_pretrained(tmp_path)
    model, info = load_model(tmp_path)
    assert type(model).__name__ == expected_class
    assert info.meta == (not with_weights)
    assert next(model.parameters()).device.type == ("cpu" if with_weights else "meta")
    assert info.source == ("local" if with_weights else "config")


def test_load_model_dtype_and_meta_refusal(tiny_gpt2, tiny_config_only):
    from kroncompress.models import load_model

    model, _ = load_model(tiny_gpt2, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="only config.json"):
        load_model(tiny_config_only, meta_ok=False)
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_model(tiny_gpt2, dtype="float13")


# -- eval -------------------------------------------------------------------------------------------

def test_eval_prints_perplexity_with_its_protocol(tmp_path):
    from kroncompress.evaluate import perplexity
    from kroncompress.tokenizers import byte_tokenizer

    torch.manual_seed(0)
    folder = tmp_path / "byte-gpt2"
    model = GPT2LMHeadModel(GPT2Config(**{**TINY, "vocab_size": 257, "bos_token_id": 256, "eos_token_id": 256}))
    model.save_pretrained(folder)
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 8)

    result = run("eval", folder, "--data", text, "--block-size", 32, "--stride", 16, "--json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)
    assert (reported["block_size"], reported["stride"]) == (32, 16)
    ids = torch.tensor(tokenizer(text.read_text())["input_ids"] + [256])
    expected = perplexity(model.eval(), ids, block_size=32, stride=16)
    assert reported["tokens"] == expected.tokens
    assert reported["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)

    table = run("eval", folder, "--data", text, "--block-size", 32, "--stride", 16)
    assert "block 32" in table.output and "stride 16" in table.output
    assert "perplexity" in table.stderr and "/" in table.stderr  # the progress bar: windows done / all, on stderr
    assert reported == json.loads(result.stdout)  # --json stdout stays one object, the bar is on stderr

    defaults = run("eval", folder, "--data", text, "--json")  # 1024 clipped to the model's positions
    assert defaults.exit_code == 0, defaults.output
    assert json.loads(defaults.stdout)["block_size"] == model.config.n_positions


def test_compress_runs_the_whole_pipeline_with_distillation(tmp_path):
    from kroncompress.tokenizers import byte_tokenizer

    torch.manual_seed(0)
    folder = tmp_path / "byte-gpt2"
    GPT2LMHeadModel(GPT2Config(**{**TINY, "vocab_size": 257, "bos_token_id": 256, "eos_token_id": 256})).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 40)
    output = tmp_path / "run"

    result = run("compress", folder, "--recipe", "kn-gpt2", "--output", output, "--data", text, "--max-steps", 2)
    assert result.exit_code == 0, result.output
    for stage in ("original model", "right after decomposition", "after distillation", "forward speed"):
        assert stage in result.stdout
    report = json.loads((output / "report.json").read_text())
    assert set(report["perplexity"]) == {"teacher", "compressed", "distilled"}
    assert report["distill"]["steps"] == 2
    assert report["speed"]["ratio"] > 0


@pytest.mark.parametrize("flag, expected", [([], None), (["--eval-tokens", "4096"], 4096)])
def test_compress_eval_tokens_and_perplexity_progress_reach_the_pipeline(tmp_path, monkeypatch, flag, expected):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        kwargs["eval_progress"](3, 3, "teacher")  # the CLI's bar takes the pipeline's callback
        raise ValueError("stop here")

    monkeypatch.setattr("kroncompress.pipeline.run_pipeline", fake)
    result = CliRunner().invoke(cli, ["compress", "--recipe", "kn-gpt2", "--output", str(tmp_path / "o"), *flag])
    assert "stop here" in result.output and seen["eval_tokens"] == expected
    assert "perplexity (teacher)" in result.output


def test_compress_eval_tokens_below_two_is_refused(tmp_path):
    result = CliRunner().invoke(cli, ["compress", "--recipe", "kn-gpt2", "--output", str(tmp_path / "o"),
                                      "--eval-tokens", "1"])
    assert result.exit_code == 2 and "--eval-tokens" in result.output
