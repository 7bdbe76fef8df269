"""`kroncompress finetune` and `compress-task`: the task commands run end to end on a tiny BERT and
turn bad input into one `error:` line with exit code 2."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from test_tasks import NEGATIVE, POSITIVE, pretrained


@pytest.fixture(scope="module")
def cli():
    from kroncompress.cli.main import cli as group
    from kroncompress.cli.tasks import register

    return register(group)


def _csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["review", "verdict"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    rows = [{"review": s, "verdict": "good"} for s in POSITIVE] + [{"review": s, "verdict": "bad"} for s in NEGATIVE]
    folder = tmp / "data"
    folder.mkdir()
    _csv(folder / "train.csv", rows * 2)
    _csv(folder / "dev.csv", rows)
    return tmp, folder


def test_finetune_then_compress_task(cli, files):
    tmp, data = files
    model = pretrained(tmp, "bert")
    runner = CliRunner()
    teacher = tmp / "teacher"
    result = runner.invoke(cli, ["finetune", str(model), "--data", str(data), "--text-column", "review",
                                 "--label-column", "verdict", "--metric", "accuracy", "--metric", "matthews",
                                 "--max-steps", "6", "--lr", "3e-3", "--batch-size", "8", "--output", str(teacher)])
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output and json.loads((teacher / "task.json").read_text())["labels"] == ["bad", "good"]
    out = tmp / "compressed"
    # the task comes from the task.json that finetune saved next to the teacher
    result = runner.invoke(cli, ["compress-task", str(teacher), "--recipe", "kron-task", "--data", str(data),
                                 "--max-steps", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"teacher", "compressed", "distilled"}
    assert report["task"]["metrics"] == ["accuracy", "matthews"] and "distilled" in result.output
    again = runner.invoke(cli, ["compress-task", str(teacher), "--recipe", "kron-task", "--data", str(data), "--output", str(out)])
    assert again.exit_code == 2 and "already holds a finished run" in again.output


def test_bad_column_is_one_error_line_naming_it(cli, files):
    tmp, data = files
    result = CliRunner().invoke(cli, ["finetune", str(pretrained(tmp, "gpt2")), "--data", str(data), "--text-column", "text",
                                      "--label-column", "verdict", "--output", str(tmp / "never")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "column 'text'" in lines[0] and "available columns: review, verdict" in lines[0]
    assert not (tmp / "never").exists()


def test_a_task_must_be_named(cli, files):
    tmp, data = files
    result = CliRunner().invoke(cli, ["finetune", str(tmp), "--data", str(data), "--output", str(tmp / "never")])
    assert result.exit_code == 2 and "--task" in result.output


def test_standalone_entry_point_lists_both_commands():
    from kroncompress.cli.tasks import tasks_cli

    result = CliRunner().invoke(tasks_cli, ["--help"])
    assert result.exit_code == 0 and "finetune" in result.output and "compress-task" in result.output
