"""Bad input to the training commands (`finetune`, `compress-task`, `compress`) and what they write (issue 27):
no silent wrong result, one `error:` line and exit 2, nothing of the user's deleted. Table-driven like
tests/test_bad_input_cli.py.

Each case: an id, the argv (placeholders filled from the fixture folders and the case's setup), the exit code,
words the first stderr line must contain (and must not), an optional setup and an optional check of what must
(or must not) be on disk afterwards. A case with exit code 0 is bad input that must simply work.

Print the before/after table (case, exit code, first line) of any `kroncompress` executable:

    python tests/test_bad_input_train.py /work/main/.venv/bin/kroncompress
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_input_cli import build_env as build_lm_env  # noqa: E402
from test_tasks import NEGATIVE, POSITIVE, pretrained  # noqa: E402

# -- fixture folders -------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[dict], fields=("review", "verdict"), encoding="utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


ROWS = [{"review": s, "verdict": "good"} for s in POSITIVE] + [{"review": s, "verdict": "bad"} for s in NEGATIVE]


def build_env(root: Path) -> dict[str, str]:
    """A tiny bare BERT, a data folder (train.csv + dev.csv), a teacher fine-tuned on it (labels bad, good),
    and the tiny GPT-2 of tests/test_bad_input_cli.py."""
    from kroncompress.tasks import finetune

    root.mkdir(parents=True, exist_ok=True)
    env = build_lm_env(root / "lm")
    bert = pretrained(root, "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = root / "data"
    data.mkdir()
    _write_csv(data / "train.csv", ROWS * 2)
    _write_csv(data / "dev.csv", ROWS)
    spec = {"text": "review", "label": "verdict", "metrics": ["accuracy"]}
    finetune(bert, spec, str(data), root / "teacher", max_steps=4, lr=3e-3, batch_size=8)
    return {**env, "bert": str(bert), "data": str(data), "teacher": str(root / "teacher")}


# -- setups: run in the case's working folder; return extra placeholders -----------------------------

def stsb_with_nan(work: Path, env: dict) -> dict:
    rows = [{"review": s, "verdict": f"{i % 5}.0"} for i, s in enumerate(POSITIVE + NEGATIVE)]
    rows[3]["verdict"] = "nan"
    (work / "d").mkdir()
    _write_csv(work / "d" / "train.csv", rows)
    _write_csv(work / "d" / "dev.csv", rows[4:])
    return {}


def _data_with(work: Path, change: Callable[[list[dict]], None], dev: bool = False) -> None:
    """A data folder `d` whose train rows (and dev rows with `dev`) went through `change`."""
    rows, dev_rows = [dict(r) for r in ROWS], [dict(r) for r in ROWS]
    change(rows)
    if dev:
        change(dev_rows)
    (work / "d").mkdir()
    _write_csv(work / "d" / "train.csv", rows)
    _write_csv(work / "d" / "dev.csv", dev_rows)


def empty_label(work: Path, env: dict) -> dict:
    _data_with(work, lambda rows: rows[2].update(verdict=""))
    return {}


def missing_label(work: Path, env: dict) -> dict:
    (work / "d").mkdir()
    lines = [json.dumps(r) for r in ROWS] + [json.dumps({"review": "no label here"})]
    (work / "d" / "train.jsonl").write_text("\n".join(lines) + "\n")
    (work / "d" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return {}


def huge_row(work: Path, env: dict) -> dict:
    _data_with(work, lambda rows: rows[0].update(review="very good " * 100_000))  # 1 MB in one field
    return {}


def bom_csv(work: Path, env: dict) -> dict:
    (work / "d").mkdir()
    _write_csv(work / "d" / "train.csv", ROWS * 2, encoding="utf-8-sig")  # as Excel writes it
    _write_csv(work / "d" / "dev.csv", ROWS, encoding="utf-8-sig")
    return {}


def id_labels(work: Path, env: dict) -> dict:
    _data_with(work, lambda rows: [row.update(verdict=str(int(row["verdict"] == "good"))) for row in rows], dev=True)
    return {}


def latin1_csv(work: Path, env: dict) -> dict:
    _data_with(work, lambda rows: rows[0].update(review="un très bon café"))
    (work / "d" / "train.csv").write_bytes((work / "d" / "train.csv").read_text().encode("latin-1"))
    return {}


def tiny_single_file(work: Path, env: dict) -> dict:
    rows = ROWS[:2] + ROWS[8:10]  # 4 rows: none hashes into the 10% held out for validation
    _write_csv(work / "few.csv", rows)
    return {}


def corrupt_task_json(work: Path, env: dict) -> dict:
    shutil.copytree(env["teacher"], work / "teacher")
    (work / "teacher" / "task.json").write_text('{"text": "review", "label": ')
    return {}


def nan_teacher(work: Path, env: dict) -> dict:
    from safetensors.torch import load_file, save_file

    shutil.copytree(env["teacher"], work / "teacher")
    weights = work / "teacher" / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("attention.self.query.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    return {}


def exploding_recipe(work: Path, env: dict) -> dict:
    (work / "boom.yaml").write_text(
        "version: 1\nname: boom\ncompress:\n  - targets: ['role:mlp']\n    strategy: svd\n    options: {ratio: 2}\n"
        "distill:\n  teacher: original\n  losses: {ce: 1.0}\n  train: {epochs: 1, lr: 1.0e+30, batch_size: 8}\n")
    return {}


def users_files_in_teacher_copy(work: Path, env: dict) -> dict:
    shutil.copytree(env["teacher"], work / "run")
    (work / "run" / "notes.txt").write_text("mine")
    (work / "run" / "my-data").mkdir()
    (work / "run" / "my-data" / "rows.csv").write_text("mine")
    return {}


def users_files_in_compressed_run(work: Path, env: dict) -> dict:
    (work / "run").mkdir()
    (work / "run" / "config.json").write_text(json.dumps({"model_type": "gpt2", "kroncompress": {"modules": {}}}))
    (work / "run" / "notes.txt").write_text("mine")
    (work / "run" / "adapter").mkdir()
    (work / "run" / "adapter" / "adapter_model.safetensors").write_text("mine")
    return {}


def symlinked_teacher_copy(work: Path, env: dict) -> dict:
    shutil.copytree(env["teacher"], work / "real")
    (work / "link").symlink_to(work / "real", target_is_directory=True)
    return {}


def survives(*names: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        for name in names:
            assert (work / name).exists(), f"{name} was deleted"
    return check


def absent(*names: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        for name in names:
            assert not (work / name).exists(), f"{name} was written"
    return check


def saved(*names: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        for name in names:
            assert (work / name).is_file(), f"{name} was not saved"
    return check


@dataclasses.dataclass
class Case:
    id: str
    argv: list[str]
    code: int
    words: list[str]
    absent: list[str] = dataclasses.field(default_factory=list)
    setup: Callable[[Path, dict], dict] | None = None
    check: Callable[[Path], None] | None = None


FT = ["finetune", "{bert}", "--text-column", "review", "--label-column", "verdict", "--batch-size", "8"]
FT_DATA = FT + ["--data", "{data}", "--max-steps", "2"]
CT = ["compress-task", "{teacher}", "--recipe", "kron-task", "--data", "{data}", "--max-steps", "1", "--text-column", "review",
      "--label-column", "verdict"]
COMPRESS = ["compress", "{tiny}", "--recipe", "kn-gpt2", "--data", "{text}"]
CASES = [
    # -- item 1: a NaN teacher saved with exit 0 --
    Case("finetune-lr-inf", FT_DATA + ["--lr", "inf", "--output", "out"], 2, ["--lr", "inf"], check=absent("out")),
    Case("finetune-lr-1e30-diverges", FT + ["--data", "{data}", "--max-steps", "6", "--lr", "1e30", "--output", "out"], 2, ["non-finite", "learning rate"],
         absent=["Traceback"], check=absent("out")),
    Case("finetune-regression-nan-label", FT + ["--data", "d", "--regression", "--metric", "pearson", "--max-steps", "2",
                                                 "--output", "out"], 2, ["nan", "row 3", "'train'"],
         setup=stsb_with_nan, check=absent("out")),
    # -- item 2: --overwrite deletes the user's files --
    Case("finetune-overwrite-keeps-users-files", FT_DATA + ["--output", "run", "--overwrite"], 2,
         ["run", "notes.txt", "my-data"], setup=users_files_in_teacher_copy,
         check=survives("run/notes.txt", "run/my-data/rows.csv")),
    Case("compress-overwrite-keeps-users-files", COMPRESS + ["--output", "run", "--overwrite", "--no-distill"], 2,
         ["run", "notes.txt", "adapter"], setup=users_files_in_compressed_run,
         check=survives("run/notes.txt", "run/adapter/adapter_model.safetensors")),
    # -- item 6: the teacher's labels --
    Case("compress-task-labels-flipped", CT + ["--labels", "good,bad", "--output", "out"], 2,
         ["id2label", "bad, good", "--labels"], check=absent("out")),
    Case("compress-task-labels-renamed", CT[:5] + ["d"] + CT[6:] + ["--labels", "neg,pos", "--output", "out"], 2,
         ["id2label", "neg, pos", "other classes"], setup=id_labels, check=absent("out")),
    # -- item 7: invented classes, an untrained head --
    Case("finetune-empty-label", FT + ["--data", "d", "--max-steps", "2", "--output", "out"], 2,
         ["empty", "verdict", "row 2"], setup=empty_label, check=absent("out")),
    Case("finetune-missing-label", FT + ["--data", "d", "--max-steps", "2", "--output", "out"], 2,
         ["verdict", "row 16", "'train'", "missing"], setup=missing_label, check=absent("out")),
    Case("finetune-labels-leading-comma", FT_DATA + ["--labels", ",bad,good", "--output", "out"], 2,
         ["--labels", "empty"], check=absent("out")),
    Case("finetune-epochs-0", FT + ["--data", "{data}", "--epochs", "0", "--output", "out"], 2, ["--epochs", "0"],
         check=absent("out")),
    Case("finetune-epochs-negative", FT + ["--data", "{data}", "--epochs", "-1", "--output", "out"], 2,
         ["--epochs", "-1"], check=absent("out")),
    # -- item 9: tracebacks --
    Case("finetune-csv-1mb-row", FT + ["--data", "d", "--max-steps", "1", "--max-length", "16", "--output", "out"], 0,
         [], setup=huge_row, check=saved("out/model.safetensors")),
    Case("compress-task-non-finite-loss", ["compress-task", "{teacher}", "--recipe", "boom.yaml", "--data", "{data}",
                                           "--max-steps", "3", "--output", "out"], 2,
         ["non-finite", "distill.train.lr"], absent=["Traceback"], setup=exploding_recipe, check=absent("out")),
    Case("finetune-output-symlink-overwrite", FT_DATA + ["--output", "link", "--overwrite"], 2,
         ["link", "symbolic link", "real"], setup=symlinked_teacher_copy,
         check=survives("real/model.safetensors", "link")),
    # -- item 11: misleading errors --
    Case("finetune-no-validation-row", FT + ["--data", "few.csv", "--max-steps", "1", "--output", "out"], 2,
         ["few.csv", "validation", "held out"], absent=["not found"], setup=tiny_single_file, check=absent("out")),
    Case("finetune-data-latin1", FT + ["--data", "d", "--max-steps", "1", "--output", "out"], 2,
         ["train.csv", "UTF-8"], setup=latin1_csv, check=absent("out")),
    Case("compress-task-corrupt-task-json", ["compress-task", "teacher", "--recipe", "kron-task", "--data", "{data}",
                                             "--output", "out"], 2, ["task.json", "JSON"], setup=corrupt_task_json,
         check=absent("out")),
    Case("finetune-csv-utf8-bom", FT + ["--data", "d", "--max-steps", "1", "--output", "out"], 0, [], setup=bom_csv,
         check=saved("out/model.safetensors")),
    Case("compress-task-nan-teacher", ["compress-task", "teacher", "--recipe", "kron-task", "--data", "{data}",
                                       "--max-steps", "1", "--output", "out"], 2,
         ["teacher", "NaN", "query.weight"], absent=["recipe", "option"], setup=nan_teacher, check=absent("out")),
    Case("finetune-epochs-nan", FT + ["--data", "{data}", "--epochs", "nan", "--output", "out"], 2, ["--epochs", "nan"],
         absent=["convert"], check=absent("out")),
    Case("finetune-seed-2**70", FT_DATA + ["--seed", str(2**70), "--output", "out"], 2, ["--seed"],
         absent=["overflow", "Overflow"], check=absent("out")),
]


def fill(argv: list[str], values: dict) -> list[str]:
    return [arg.format(**values) for arg in argv]


def prepare(case: Case, root: Path, env: dict) -> tuple[Path, list[str]]:
    work = root / case.id
    work.mkdir(parents=True)
    values = {**env}
    values.update((case.setup(work, env) if case.setup else None) or {})
    return work, fill(case.argv, values)


PLAIN_PROGRESS = re.compile(r"^[\w ./-]+: [\d,.]+(/[\d,.]+)?( \w+)?( \(\d+%\))?, [\d:]+ elapsed")


def _progress(line: str) -> bool:
    """A progress bar of transformers' loading, or a kroncompress.progress line (stderr), not an error line."""
    return "it/s]" in line or "%|" in line or PLAIN_PROGRESS.match(line) is not None


def _first_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not _progress(line) and "warn" not in line.lower()]
    if not lines:
        return ""
    if any(line.startswith("Traceback") for line in lines):
        return "Traceback ... " + lines[-1]
    return next((line for line in lines if line.startswith("error: ")), lines[0])  # after a library's warning


# -- the suite ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("train-fixtures"))


@pytest.fixture
def quiet_env(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("KRONCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KRONCOMPRESS_DEBUG", raising=False)


def invoke(argv: list[str]):
    from click.testing import CliRunner

    from kroncompress.cli.main import cli

    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, argv)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_training_bad_input(case, env, tmp_path, monkeypatch, quiet_env):
    work, argv = prepare(case, tmp_path / "cases", env)
    monkeypatch.chdir(work)
    result = invoke(argv)
    assert "Traceback" not in result.output
    assert result.exit_code == case.code, (result.exit_code, result.output, result.exception)
    if case.code:
        lines = [line for line in result.stderr.strip().splitlines() if not _progress(line)]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        for word in case.words:
            assert word in lines[0], (word, lines[0])
        for word in case.absent:
            assert word not in lines[0], (word, lines[0])
    if case.check:
        case.check(work)


# -- main: the before/after table for an executable ---------------------------------------------------

def table(executable: str, root: Path) -> list[tuple[str, str, str]]:
    env = build_env(root / "fixtures")
    rows = []
    for case in CASES:
        work, argv = prepare(case, root / "cases", env)
        environ = {**os.environ, "HF_HUB_OFFLINE": "1", "KRONCOMPRESS_CACHE": str(root / "cache"), "COLUMNS": "200"}
        start = time.perf_counter()
        try:
            done = subprocess.run([executable, *argv], cwd=work, env=environ, capture_output=True, text=True, timeout=300)
            code, first = str(done.returncode), _first_line(done.stderr)
        except subprocess.TimeoutExpired:
            code, first = "timeout", "(killed after 300 s)"
        harm = ""
        if case.check:
            try:
                case.check(work)
            except AssertionError as error:
                harm = f" [{error}]"
        rows.append((case.id, code, f"{first[:240]}{harm} ({time.perf_counter() - start:.0f} s)"))
    return rows


if __name__ == "__main__":
    import tempfile

    executable = sys.argv[1] if len(sys.argv) > 1 else "kroncompress"
    with tempfile.TemporaryDirectory(prefix="kc-bad-train-") as folder:
        for case_id, code, first in table(executable, Path(folder)):
            print(f"| {case_id} | {code} | {first.replace('|', '/')} |", flush=True)


# -- what a run writes: ownership, modes, interrupted saves (items 2, 10, 12) ---------------------------

def test_finetune_can_overwrite_its_own_output_and_writes_files_as_the_umask_says(env, tmp_path, quiet_env):
    out = tmp_path / "teacher"
    argv = fill(FT_DATA + ["--output", str(out)], env)
    assert invoke(argv).exit_code == 0
    manifest = json.loads((out / ".kroncompress").read_text())
    assert manifest["written_by"] == "kroncompress finetune" and "model.safetensors" in manifest["files"]
    again = invoke(argv + ["--overwrite"])
    assert again.exit_code == 0, again.output
    mode = (out / "config.json").stat().st_mode & 0o777
    assert (out / "model.safetensors").stat().st_mode & 0o777 == mode  # not safetensors' own 0600
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"]  # no .teacher.tmp-* / .old-* left behind


def test_the_api_never_replaces_files_kroncompress_did_not_write(tmp_path):
    import kroncompress as kc
    from kroncompress.outputs import OutputExistsError
    from conftest import build_tiny

    out = kc.save_compressed(build_tiny("gpt2"), tmp_path / "out")
    kc.save_compressed(build_tiny("gpt2"), out, overwrite=True)  # its own folder: replaced
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_text("mine")
    with pytest.raises(OutputExistsError, match="adapter/"):
        kc.save_compressed(build_tiny("gpt2"), out, overwrite=True)
    assert (out / "adapter" / "adapter_model.safetensors").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the refused save left no temporary folder


def test_a_folder_written_before_the_manifest_is_judged_by_the_names_kroncompress_writes(tmp_path):
    from kroncompress.outputs import check_output_state, foreign_entries

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model_type": "gpt2", "kroncompress": {"modules": {}}}))
    for name in ("model.safetensors", "report.json", "perplexity.png", "tokenizer.json"):
        (old / name).write_text("")
    (old / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    assert foreign_entries(old) == []
    check_output_state(old, overwrite=True)
    (old / "notes.txt").write_text("mine")
    (old / "checkpoints" / "mine.txt").write_text("mine")
    assert foreign_entries(old) == ["checkpoints/", "notes.txt"]


def test_a_leftover_backup_link_is_removed_and_what_it_points_to_kept(tmp_path):
    from kroncompress.outputs import clean_leftovers

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "model.safetensors").write_text("weights")
    (tmp_path / "out").mkdir()
    (tmp_path / ".out.old-0123abcd").symlink_to(tmp_path / "real")  # left by an older kroncompress
    clean_leftovers(tmp_path / "out")
    assert not (tmp_path / ".out.old-0123abcd").is_symlink()
    assert (tmp_path / "real" / "model.safetensors").read_text() == "weights"


def test_a_backup_holding_the_users_files_is_kept(tmp_path):
    from kroncompress.outputs import clean_leftovers

    (tmp_path / "out").mkdir()
    backup = tmp_path / ".out.old-0123abcd"
    backup.mkdir()
    (backup / "notes.txt").write_text("mine")
    clean_leftovers(tmp_path / "out")
    assert (backup / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["compress", "compress-task"])
def test_ctrl_c_while_saving_leaves_no_folder_a_rerun_takes_for_a_finished_run(command, env, tmp_path, quiet_env,
                                                                                monkeypatch):
    """SIGINT while the results and the plot are written: before, the folder already stood renamed into place
    (a rerun said it "already holds a finished run") with a report.json lacking the scores."""
    from kroncompress.pipeline import report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_perplexity", interrupted)
    monkeypatch.setattr(report, "plot_scores", interrupted)
    out = tmp_path / "runs" / "out"
    if command == "compress":
        argv = fill(COMPRESS + ["--no-distill", "--output", str(out)], env)
    else:
        argv = fill(CT + ["--output", str(out)], env)
    result = invoke(argv)
    assert result.exit_code == 130, result.output
    assert not out.exists() and list(out.parent.iterdir()) == [], list(out.parent.iterdir())


def test_the_guard_errors_are_one_line_value_errors():
    from kroncompress.distill import NonFiniteLossError
    from kroncompress.distill.guards import check_finite_loss, check_finite_weights, check_training_settings

    with pytest.raises(NonFiniteLossError, match=r"step 4 \(ce=nan\)") as info:
        check_finite_loss({"ce": torch.tensor(float("nan")), "kl": 0.5}, step=4, where="finetune", advice="lower it")
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    layer = torch.nn.Linear(2, 2)
    check_finite_weights(layer, "student", after_training=True)
    with torch.no_grad():
        layer.bias[1] = float("inf")
    with pytest.raises(ValueError, match="diverged: the fine-tuned model's parameter bias holds 1 NaN/inf"):
        check_finite_weights(layer, "fine-tuned model", after_training=True)
    for bad in ({"epochs": 0.0}, {"epochs": float("nan")}, {"lr": float("inf")}, {"lr": -1e-5}, {"seed": 2**32},
                {"seed": -1}, {"seed": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            check_training_settings(**bad)
    check_training_settings(epochs=0.5, lr=1e-3, seed=2**32 - 1)
