"""Progress that reaches a log: plain lines with elapsed time and ETA when stderr is not a terminal
(CliRunner's output is not one), at the rhythm of $KRONCOMPRESS_PROGRESS_INTERVAL."""

from __future__ import annotations

import io
import re

import pytest
import torch
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel

from kroncompress.progress import INTERVAL_ENV, ProgressLog, clock, progress_interval

LINE = re.compile(r"^(?P<label>[^:]+): (?P<done>[\d,]+)/(?P<total>[\d,]+)(?: \w+)? \(\d+%\), (?P<elapsed>[\d:]+) elapsed, "
                  r"(?:ETA (?P<eta>[\d:]+|unknown)|done)")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_come_at_the_interval_with_elapsed_time_and_eta():
    timer, out = FakeClock(), io.StringIO()
    log = ProgressLog("compressing", unit="modules", interval=30, stream=out, timer=timer)
    for step in range(1, 101):  # one module per second
        log.update(step, 100, f"module {step}")
        timer.now += 1
    lines = out.getvalue().splitlines()
    # the first update, then one line per 30 s, and the completion
    assert [int(LINE.match(line)["done"]) for line in lines] == [1, 31, 61, 91, 100]
    third = LINE.match(lines[2])
    assert third["elapsed"] == "1:00" and third["eta"] == "0:39"  # 60 modules in 60 s, 39 to go
    assert lines[-1].endswith("done  module 100") and "ETA" not in lines[-1]
    log.update(100, 100)
    assert len(out.getvalue().splitlines()) == 5  # a finished stage writes nothing more


def test_an_unknown_total_has_no_eta_and_interval_zero_writes_every_update():
    out = io.StringIO()
    log = ProgressLog("tokenising", interval=0, stream=out, timer=FakeClock())
    for done in (10, 20, 30):
        log.update(done)
    assert out.getvalue().splitlines() == [f"tokenising: {n}, 0:00 elapsed" for n in (10, 20, 30)]


def test_clock():
    assert (clock(0), clock(59.6), clock(61), clock(3725)) == ("0:00", "1:00", "1:01", "1:02:05")


@pytest.mark.parametrize("value, expected", [(None, 30.0), ("0", 0.0), ("2.5", 2.5)])
def test_interval_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(INTERVAL_ENV, raising=False)
    else:
        monkeypatch.setenv(INTERVAL_ENV, value)
    assert progress_interval() == expected


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_interval_is_one_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(ValueError, match=f"{INTERVAL_ENV}=.*number >= 0"):
        progress_interval()


def test_the_library_imports_without_rich_or_click():
    import subprocess
    import sys

    code = ("import sys; sys.modules['rich'] = None; sys.modules['click'] = None\n"
            "import kroncompress, kroncompress.progress as p\n"
            "p.progress_callback('x', interval=0)(1, 2)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "x: 1/2 (50%)" in done.stderr


@pytest.fixture(scope="module")
def byte_gpt2(tmp_path_factory):
    from kroncompress.tokenizers import byte_tokenizer

    tmp = tmp_path_factory.mktemp("progress")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64, bos_token_id=256,
                        eos_token_id=256)
    GPT2LMHeadModel(config).save_pretrained(tmp / "model")
    byte_tokenizer().save_pretrained(tmp / "model")
    text = tmp / "text.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 40)
    return tmp / "model", text


def _lines(output: str, label: str) -> list[re.Match]:
    return [m for m in map(LINE.match, output.splitlines()) if m and m["label"] == label]


def test_compress_writes_progress_lines_for_every_long_stage(byte_gpt2, tmp_path):
    from kroncompress.cli.main import cli

    model, text = byte_gpt2
    result = CliRunner(env={INTERVAL_ENV: "0"}).invoke(
        cli, ["compress", str(model), "--recipe", "kn-gpt2", "--output", str(tmp_path / "run"), "--data", str(text),
              "--max-steps", "3", "--calibration-data", str(text), "--calibration-tokens", "512"])
    assert result.exit_code == 0, result.output
    for label in ("perplexity (teacher)", "calibrating", "compressing", "perplexity (compressed)", "distill",
                  "perplexity (distilled)"):
        lines = _lines(result.stderr, label)
        assert lines, f"no progress line for {label!r} in:\n{result.stderr}"
        assert lines[-1]["done"] == lines[-1]["total"]  # each stage's last line says it is done
    distill = _lines(result.stderr, "distill")
    assert [m["done"] for m in distill] == ["0", "1", "2", "3"]  # interval 0: every optimizer step
    assert any(m["eta"] not in (None, "unknown") for m in distill)
    assert not _lines(result.stdout, "distill")  # progress is on stderr; stdout keeps the tables


def test_eval_progress_waits_for_the_interval(byte_gpt2, monkeypatch):
    from kroncompress.cli.main import cli

    model, text = byte_gpt2
    result = CliRunner(env={INTERVAL_ENV: "3600"}).invoke(
        cli, ["eval", str(model), "--data", str(text), "--block-size", "16", "--stride", "8"])
    assert result.exit_code == 0, result.output
    lines = _lines(result.stderr, "perplexity")
    assert len(lines) == 2 and lines[0]["done"] == "1" and lines[1]["done"] == lines[1]["total"]  # start and end only


def test_a_bad_interval_stops_the_command_with_one_error_line(byte_gpt2, tmp_path):
    from kroncompress.cli.main import cli

    model, text = byte_gpt2
    result = CliRunner(env={INTERVAL_ENV: "often"}).invoke(cli, ["eval", str(model), "--data", str(text)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {INTERVAL_ENV}='often': give the seconds between two progress lines, a number >= 0 "
        "(0: a line on every update; default 30)"]


def test_finetune_writes_progress_lines(tmp_path):
    from test_tasks import NEGATIVE, POSITIVE, pretrained

    from kroncompress.cli.main import cli

    data = tmp_path / "data"
    data.mkdir()
    rows = [f"{s},good" for s in POSITIVE] + [f"{s},bad" for s in NEGATIVE]
    for split in ("train", "dev"):
        (data / f"{split}.csv").write_text("review,verdict\n" + "\n".join(rows) + "\n")
    result = CliRunner(env={INTERVAL_ENV: "0"}).invoke(
        cli, ["finetune", str(pretrained(tmp_path, "bert")), "--data", str(data), "--text-column", "review",
              "--label-column", "verdict", "--max-steps", "2", "--batch-size", "8", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = _lines(result.stderr, "finetune")
    assert [m["done"] for m in lines] == ["0", "1", "2"], result.stderr
    assert "score" in lines[-1].string  # the last evaluation score rides along
