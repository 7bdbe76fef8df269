"""`kroncompress calibrate` and `compress --calibration-stats`: statistics saved once give the very weights a
run that calibrates itself gives; a damaged, foreign or mismatched file, both sources at once, and an
existing output are one `error:` line and exit code 2 (CliRunner, tiny models from conftest)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import kroncompress as kc
from conftest import build_tiny
from kroncompress.cli.main import cli

WORDS = "the king queen lord my thy good sir love night day hath doth come go speak".split()
RECIPE = {"version": 1, "name": "svd-mlp", "compress": [{"targets": ["role:mlp"], "strategy": "svd", "options": {"ratio": 2}}],
          "calibration": {"tokens": 256, "block_size": 32}}


def run(*args):
    # catch_exceptions=False: a traceback fails the test instead of passing as a non-zero exit
    return CliRunner(env={"COLUMNS": "220"}).invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """Byte-tokenizer models (GPT-2 of widths 64 and 48, a Llama), a text file and the recipe, in one folder."""
    from kroncompress.tokenizers import byte_tokenizer

    root = tmp_path_factory.mktemp("calibcli")
    byte_ids = dict(vocab_size=257, bos_token_id=256, eos_token_id=256)
    models = {"gpt2": build_tiny("gpt2", **byte_ids), "gpt2-48": build_tiny("gpt2", n_embd=48, **byte_ids),
              "llama": build_tiny("llama", **byte_ids)}
    paths = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        byte_tokenizer().save_pretrained(root / name)
        paths[name] = root / name
    rng = random.Random(0)
    paths["text"] = root / "corpus.txt"
    paths["text"].write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(100)))
    paths["recipe"] = root / "svd-mlp.yaml"
    paths["recipe"].write_text(yaml.safe_dump(RECIPE))
    return paths


def calibrate(env, model: str, output: Path, *flags) -> Path:
    result = run("calibrate", env[model], "--recipe", env["recipe"], "--output", output, *flags)
    assert result.exit_code == 0, result.output
    assert f"saved {output}" in result.output and " groups, " in result.output
    return output


@pytest.mark.parametrize("model, flags", [
    ("gpt2", ["--calibration-data", "TEXT", "--calibration-tokens", "192"]),
    ("gpt2", []),  # the recipe's calibration section (no data: the packaged corpus), as compress reads it
    ("llama", ["--calibration-data", "TEXT"]),  # gate/up share one input: groups survive the file
], ids=["gpt2 explicit data and tokens", "gpt2 recipe defaults", "llama explicit data"])
def test_saved_statistics_give_the_weights_of_a_run_that_calibrates(env, tmp_path, model, flags):
    flags = [str(env["text"]) if f == "TEXT" else f for f in flags]
    stats = calibrate(env, model, tmp_path / "stats.safetensors", *flags)
    common = ["compress", env[model], "--recipe", env["recipe"], "--no-distill"]
    reused = run(*common, "--output", tmp_path / "reused", "--calibration-stats", stats)
    fresh = run(*common, "--output", tmp_path / "fresh", *flags)
    assert reused.exit_code == 0 and fresh.exit_code == 0, reused.output + fresh.output
    # one deterministic CPU pass over the same blocks either way, so the weights agree bit for bit
    # the same weights bit for bit (the header's metadata order is safetensors' own, so tensors are compared)
    from safetensors import safe_open
    from safetensors.torch import load_file

    reused_weights, fresh_weights = (load_file(str(tmp_path / f"{run}/model.safetensors")) for run in ("reused", "fresh"))
    assert reused_weights.keys() == fresh_weights.keys()
    assert all(torch.equal(reused_weights[k], fresh_weights[k]) for k in reused_weights)
    with safe_open(str(tmp_path / "reused/model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "fresh/model.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata()
    reused_report = json.loads((tmp_path / "reused/report.json").read_text())["calibration"]
    fresh_report = json.loads((tmp_path / "fresh/report.json").read_text())["calibration"]
    assert reused_report.pop("file") == str(stats) and "file" not in fresh_report
    assert reused_report == fresh_report  # the same inputs, tokens, groups and damping
    assert "stats.safetensors" in reused.output.split("calibration (data-aware init)")[1]  # the summary names it


def _truncated(env, tmp_path) -> Path:
    good = calibrate(env, "gpt2", tmp_path / "good.safetensors", "--calibration-data", env["text"])
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:200])
    return bad


def _model_weights(env, tmp_path) -> Path:
    return env["gpt2"] / "model.safetensors"


def _missing(env, tmp_path) -> Path:
    return tmp_path / "nowhere.safetensors"


def _other_width(env, tmp_path) -> Path:
    return calibrate(env, "gpt2-48", tmp_path / "wide.safetensors", "--calibration-data", env["text"])


@pytest.mark.parametrize("make, expected", [
    (_truncated, ["cut.safetensors", "truncated"]),
    (_model_weights, ["model.safetensors", "not kroncompress calibration statistics"]),
    (_missing, ["nowhere.safetensors", "no such calibration file"]),
    (_other_width, ["module 'transformer.h.0.mlp.c_fc'", "size 48", "reads 64 features"]),
], ids=["truncated", "another safetensors file", "missing", "another model's width"])
def test_unusable_statistics_are_one_error_line(env, tmp_path, make, expected):
    stats = make(env, tmp_path)
    result = run("compress", env["gpt2"], "--recipe", env["recipe"], "--output", tmp_path / "out", "--no-distill",
                 "--calibration-stats", stats)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output
    assert all(word in lines[-1] for word in expected), lines[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", [["--calibration-data", "shakespeare"], ["--calibration-tokens", "64"]],
                         ids=["data", "tokens"])
def test_calibration_stats_excludes_a_calibration_pass(env, tmp_path, flag):
    stats = calibrate(env, "gpt2", tmp_path / "stats.safetensors", "--calibration-data", env["text"])
    result = run("compress", env["gpt2"], "--recipe", env["recipe"], "--output", tmp_path / "out",
                 "--calibration-stats", stats, *flag)
    assert result.exit_code == 2
    assert "--calibration-stats" in result.output and flag[0] in result.output and "exclude each other" in result.output
    with pytest.raises(ValueError, match=f"calibration_stats and {flag[0][2:].replace('-', '_')} exclude each other"):
        kc.run_pipeline(env["gpt2"], env["recipe"], tmp_path / "out", calibration_stats=stats,
                        **{flag[0][2:].replace("-", "_"): flag[1] if flag[0].endswith("data") else int(flag[1])})
    assert not (tmp_path / "out").exists()


@dataclass
class OutputCase:
    id: str
    output: str  # relative to the case's folder
    flags: list[str] = field(default_factory=list)
    existing: bytes | None = None  # what the output holds before: b"STATS" for a statistics file
    code: int = 2
    words: tuple[str, ...] = ()


OUTPUT_CASES = [
    OutputCase("existing without --overwrite", "s.safetensors", existing=b"STATS", words=("already exists", "--overwrite")),
    OutputCase("--overwrite of statistics", "s.safetensors", ["--overwrite"], existing=b"STATS", code=0),
    OutputCase("--overwrite of the user's file", "s.safetensors", ["--overwrite"], existing=b"my notes",
               words=("replaces only calibration statistics", "s.safetensors")),
    OutputCase("not .safetensors", "stats.pt", words=("ending in .safetensors",)),
    OutputCase("a folder", "dir.safetensors", existing=b"DIR", words=("is a folder",)),
    OutputCase("empty", " ", words=("--output is empty",)),
]


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[c.id for c in OUTPUT_CASES])
def test_calibrate_output(env, tmp_path, case):
    target = tmp_path / case.output if case.output.strip() else None
    if case.existing == b"STATS":
        calibrate(env, "gpt2", target, "--calibration-data", env["text"], "--calibration-tokens", "64")
    elif case.existing == b"DIR":
        target.mkdir()
    elif case.existing is not None:
        target.write_bytes(case.existing)
    before = target.read_bytes() if target is not None and target.is_file() else None
    result = run("calibrate", env["gpt2"], "--recipe", env["recipe"], "--calibration-data", env["text"],
                 "--output", target if target is not None else case.output, *case.flags)
    assert result.exit_code == case.code, result.output
    if case.code == 0:
        assert kc.CalibrationStats.load(target).tokens("transformer.h.0.mlp.c_fc") == 256  # the recipe's, not 64
        return
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    assert all(word in result.output for word in case.words), result.output
    if before is not None:
        assert target.read_bytes() == before  # refused files are left as they were


def test_calibrate_refuses_a_recipe_without_data_aware_modules(env, tmp_path):
    recipe = tmp_path / "drop.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "name": "tucker-only", "compress": [
        {"targets": ["role:mlp"], "strategy": "tucker", "options": {"ratio": 2}}]}))
    result = run("calibrate", env["gpt2"], "--recipe", recipe, "--output", tmp_path / "s.safetensors")
    assert result.exit_code == 2 and "nothing to calibrate" in result.output
    assert not (tmp_path / "s.safetensors").exists()


def test_run_pipeline_takes_a_statistics_object(env, tmp_path):
    from kroncompress.pipeline import run_calibration

    stats = run_calibration(env["gpt2"], env["recipe"], calibration_data=str(env["text"]), device="cpu")
    report = kc.run_pipeline(env["gpt2"], env["recipe"], tmp_path / "out", calibration_stats=stats, distill=False,
                             measure_speed=False, device="cpu", eval_tokens=64)
    assert report["calibration"]["inputs"] and "file" not in report["calibration"]
    assert all(row["output_error"] is not None for row in report["compression"]["modules"])


# -- statistics that do not fit the run: refused before any expensive stage (issue 27, items 8, 9, 11) --------

def _edited(env, tmp_path, edit) -> Path:
    """A good statistics file with its header (metadata) or tensors edited, as a careless user might."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = calibrate(env, "gpt2", tmp_path / "good.safetensors", "--calibration-data", env["text"])
    with safe_open(str(good), framework="pt") as handle:
        metadata, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    groups = json.loads(metadata["groups"])
    edit(metadata, groups, tensors)
    metadata["groups"] = json.dumps(groups)
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=metadata)
    return tmp_path / "edited.safetensors"


def _tokens(value):
    return lambda env, tmp: _edited(env, tmp, lambda m, g, t: g["inputs"][0].__setitem__("tokens", value))


def _unknown_module(env, tmp):
    return _edited(env, tmp, lambda m, g, t: g["inputs"][0]["modules"].append("transformer.h.9.mlp.c_fc"))


def _damping(value):
    return lambda env, tmp: _edited(env, tmp, lambda m, g, t: m.__setitem__("damping", value))


def _huge_moments(env, tmp):
    return _edited(env, tmp, lambda m, g, t: t.__setitem__("inputs.0.sum_xxt", t["inputs.0.sum_xxt"] * 1e200))


def _mlp_stats(env, tmp):
    return calibrate(env, "gpt2", tmp / "mlp.safetensors", "--calibration-data", env["text"])


ATTENTION = [{"targets": ["role:attention"], "strategy": "svd", "options": {"ratio": 2}}]
WHITENED = [{"targets": ["role:mlp"], "strategy": "svd", "options": {"ratio": 2, "init": "whitened"}}]


@pytest.mark.parametrize("make, rules, expected", [
    (_mlp_stats, ATTENTION, ["mlp.safetensors", "no tokens for 'transformer.h.0.attn.c_attn'", "another recipe"]),
    (None, WHITENED, ["transformer.h.0.mlp.c_fc", "init: whitened needs calibration statistics", "calibration:"]),
    (_tokens(0), None, ["edited.safetensors", "groups.inputs[0].tokens", "is 0 but"]),
    (_tokens(10**30), None, ["edited.safetensors", "groups.inputs[0].tokens", "2**53"]),
    (_unknown_module, None, ["edited.safetensors", "'transformer.h.9.mlp.c_fc'", "not in the GPT2LMHeadModel"]),
    (_damping("inf"), None, ["edited.safetensors", "damping", "finite"]),
    (_huge_moments, None, ["edited.safetensors", "transformer.h.0.mlp.c_fc", "too large to whiten"]),
], ids=["another recipe's statistics", "explicit whitened without statistics", "tokens 0", "tokens 1e30",
        "unknown module", "infinite damping", "huge moments"])
def test_statistics_that_do_not_fit_the_run_are_one_error_line(env, tmp_path, make, rules, expected):
    recipe = env["recipe"]
    if rules is not None:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"version": 1, "name": "other", "compress": rules}))
    stats = ["--calibration-stats", make(env, tmp_path)] if make is not None else []
    result = CliRunner(env={"COLUMNS": "220"}).invoke(cli, [str(a) for a in [
        "compress", env["gpt2"], "--recipe", recipe, "--output", tmp_path / "out", "--no-distill", *stats]])
    assert result.exit_code == 2, (result.output, result.exception)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in result.output
    assert all(word in line for word in expected), line
    assert "W has" not in line and "weights are corrupt" not in line  # the statistics are blamed, not W
    assert not (tmp_path / "out").exists()
