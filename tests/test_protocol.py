"""One perplexity protocol: `kroncompress compress --data X` scores every stage exactly as `kroncompress eval
--data X` does (the same held-out text, windows and BOS handling), so the same model on the same data scores
the same in both."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel

WORDS = "the king queen lord fair sweet night day love death crown sword heart blood speak come go".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kroncompress.tokenizers import byte_tokenizer

    tmp = tmp_path_factory.mktemp("protocol")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64, bos_token_id=256,
                        eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(tmp / "model")
    byte_tokenizer().save_pretrained(tmp / "model")
    rng = random.Random(0)
    data = tmp / "data"  # a split folder: train / validation / test, as a corpus with held-out documents
    data.mkdir()
    for split, lines in (("train", 80), ("validation", 12), ("test", 15)):
        (data / f"{split}.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) + "."
                                                     for _ in range(lines)))
    return tmp / "model", data


def _cli(*args) -> object:
    from kroncompress.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _eval(model, data) -> dict:
    result = _cli("eval", model, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_compress_reports_what_eval_scores_on_the_saved_folder(setup, tmp_path):
    model, data = setup
    output = tmp_path / "run"
    result = _cli("compress", model, "--recipe", "kn-gpt2", "--output", output, "--data", data, "--max-steps", 2)
    assert result.exit_code == 0, result.output
    reported = json.loads((output / "report.json").read_text())["perplexity"]
    assert "(test)" in reported["distilled"]["data"]  # the held-out test split, not the distillation's validation
    for stage, folder in (("teacher", model), ("distilled", output)):
        scored = _eval(folder, data)
        assert {k: scored[k] for k in ("tokens", "block_size", "stride")} == \
            {k: reported[stage][k] for k in ("tokens", "block_size", "stride")}, stage
        # the same forward passes on the same windows: equal up to float32 summation order
        assert scored["perplexity"] == pytest.approx(reported[stage]["perplexity"], rel=1e-5), stage
    assert reported["distilled"]["perplexity"] != pytest.approx(reported["teacher"]["perplexity"], rel=1e-3)


def test_without_distillation_the_compressed_model_scores_the_same_too(setup, tmp_path):
    model, data = setup
    output = tmp_path / "run"
    assert _cli("compress", model, "--recipe", "kn-gpt2-mlp", "--output", output, "--data", data,
                "--no-distill").exit_code == 0
    reported = json.loads((output / "report.json").read_text())["perplexity"]["compressed"]
    assert _eval(output, data)["perplexity"] == pytest.approx(reported["perplexity"], rel=1e-5)
