"""Bad input through the CLI: one `error:` line naming the flag, file or folder, exit code 2, before any work;
nothing of the user's is ever deleted (issue 14). Table-driven, like the recipe tests.

Each case: an id, the argv (placeholders filled from the shared fixture folders and what the case's
setup made), the exit code, words the error line must contain (and words it must not), an optional
setup (run in the case's working folder) and an optional check of what must survive.

Run as a script to print the table of exit codes and first error lines of any `kroncompress` executable
(the before/after table of issue 14):

    python tests/test_bad_input_cli.py /work/main/.venv/bin/kroncompress
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from filelock import FileLock

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 40


# -- fixture folders (shared by every case; cases copy what they might damage) --------------------

def build_env(root: Path) -> dict[str, str]:
    """Tiny models and text under `root`: a byte-tokenizer GPT-2 with weights, a config-only folder, text."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kroncompress.tokenizers import byte_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tiny = root / "tiny"
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64, bos_token_id=256, eos_token_id=256)
    GPT2LMHeadModel(config).save_pretrained(tiny)
    byte_tokenizer().save_pretrained(tiny)
    config.save_pretrained(root / "config-only")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return {"tiny": str(tiny), "config_only": str(root / "config-only"), "text": str(root / "text.txt")}


# -- setups: run in the case's working folder; return extra placeholders ----------------------------

def users_checkpoints(work: Path, env: dict) -> dict:
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "notes.txt").write_text("mine")
    return {}


def nested_work(work: Path, env: dict) -> dict:
    inner = work / "inner"
    inner.mkdir()
    (work / "notes.txt").write_text("mine")
    return {"cwd": str(inner)}


def fake_home(work: Path, env: dict) -> dict:
    home = work / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    return {"home": str(home)}


def own_model_copy(work: Path, env: dict) -> dict:
    shutil.copytree(env["tiny"], work / "models" / "tiny")
    return {"models": str(work / "models"), "model": str(work / "models" / "tiny")}


def users_folder(work: Path, env: dict) -> dict:
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("mine")
    return {}


def finished_run(work: Path, env: dict) -> dict:
    (work / "done").mkdir()
    (work / "done" / "config.json").write_text(json.dumps({"model_type": "gpt2", "kroncompress": {"modules": {}}}))
    return {}


def unfinished_run(work: Path, env: dict) -> dict:
    (work / "run" / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    return {}


_HELD: list = []  # locks stay held while the case runs


def locked_output(work: Path, env: dict) -> dict:
    held = FileLock(str(work / ".out.lock"), timeout=0)
    held.acquire()
    _HELD.append(held)
    return {}


def unwritable_parent(work: Path, env: dict) -> dict:
    probe = Path("/sys/kroncompress-probe")
    try:
        probe.mkdir()
    except OSError:
        return {"unwritable": str(probe / "out")}
    probe.rmdir()
    pytest.skip("/sys is writable here: no unwritable folder to test with")


def binary_file(work: Path, env: dict) -> dict:
    (work / "blob.bin").write_bytes(bytes(range(256)) * 4)
    return {}


def latin1_file(work: Path, env: dict) -> dict:
    (work / "latin1.txt").write_bytes("Le café est très bon.\n".encode("latin-1") * 10)
    return {}


def empty_folder(work: Path, env: dict) -> dict:
    (work / "corpus").mkdir()
    (work / "corpus" / "image.png").write_bytes(b"\x89PNG")
    return {}


def alias_bomb(work: Path, env: dict) -> dict:
    # 443 bytes; under a strategy option, whose message quoted the value whole (a 580 MB line, MemoryError)
    lines = ["version: 1", "name: bomb", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    anchors = "[" + ", ".join(line.split(": ", 1)[1] for line in lines[2:]) + "]"
    (work / "bomb.yaml").write_text("version: 1\nname: bomb\ncompress:\n  - targets: [transformer.h.0.mlp.c_fc]\n"
                                    "    strategy: kronecker\n    options: {ratio: " + anchors + "}\n")
    return {}


def latin1_recipe(work: Path, env: dict) -> dict:
    (work / "mine.yaml").write_bytes("version: 1\nname: café\ncompress: []\n".encode("latin-1"))
    return {}


def no_cuda(work: Path, env: dict) -> dict:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    return {}


def survives(*names: str) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        for name in names:
            assert (work / name).exists(), f"{name} was deleted"
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


# --data and --block-size as a real run would give them, so that on a kroncompress without the checks a case
# shows the harm (a run that goes on) rather than an unrelated error (kn-gpt2's wikitext needs the hub)
COMPRESS = ["compress", "{tiny}", "--recipe", "kn-gpt2", "--data", "{text}"]
EVAL = ["eval", "{tiny}", "--data", "{text}", "--block-size", "32"]
CASES = [
    # -- the output folder (items 2, 4, 5, 12) --
    Case("output-empty-string", COMPRESS + ["--output", "", "--overwrite", "--max-steps", "1"], 2,
         ["--output", "empty"], setup=users_checkpoints, check=survives("checkpoints/notes.txt")),
    Case("output-dot", COMPRESS + ["--output", ".", "--overwrite", "--no-distill"], 2, ["current folder"],
         setup=users_checkpoints, check=survives("checkpoints/notes.txt")),
    Case("output-ancestor-of-cwd", COMPRESS + ["--output", "..", "--overwrite", "--no-distill"], 2,
         ["contains the current folder"], setup=nested_work, check=survives("notes.txt")),
    Case("output-home", COMPRESS + ["--output", "{home}", "--overwrite", "--no-distill"], 2, ["home folder"],
         setup=fake_home, check=survives("home/.bashrc")),
    Case("output-root", ["compress", "{config_only}", "--recipe", "kn-gpt2", "--output", "/", "--overwrite"], 2,
         ["root folder"]),
    Case("output-holds-the-model", ["compress", "{model}", "--recipe", "kn-gpt2", "--data", "{text}", "--output",
                                    "{models}", "--overwrite", "--no-distill"], 2, ["holds the input"], setup=own_model_copy,
         check=survives("models/tiny/model.safetensors")),
    Case("output-is-the-model", ["compress", "{model}", "--recipe", "kn-gpt2", "--data", "{text}", "--output",
                                 "{model}", "--overwrite", "--no-distill"], 2, ["holds the input"], setup=own_model_copy,
         check=survives("models/tiny/model.safetensors")),
    Case("overwrite-a-folder-not-ours", COMPRESS + ["--output", "mine", "--overwrite", "--no-distill"], 2,
         ["mine", "not write"], setup=users_folder, check=survives("mine/notes.txt")),
    Case("resume-into-a-folder-not-ours", COMPRESS + ["--output", "mine", "--resume", "--max-steps", "1"], 2,
         ["mine", "not write"], setup=users_folder, check=survives("mine/notes.txt")),
    Case("export-overwrite-a-folder-not-ours", ["export", "{tiny}", "--dense", "--output", "mine", "--overwrite"], 2,
         ["mine", "not write"], setup=users_folder, check=survives("mine/notes.txt")),
    Case("output-parent-unwritable", COMPRESS + ["--output", "{unwritable}", "--no-distill"], 2,
         ["--output", "cannot"], setup=unwritable_parent),
    Case("output-locked-by-another-run", COMPRESS + ["--output", "out", "--no-distill"], 2, ["in use", "out"],
         setup=locked_output),
    Case("finished-run-says---overwrite", COMPRESS + ["--output", "done", "--no-distill"], 2, ["--overwrite"],
         absent=["overwrite=True"], setup=finished_run),
    Case("unfinished-run-says---resume", COMPRESS + ["--output", "run", "--no-distill"], 2, ["--resume", "--overwrite"],
         absent=["resume=True", "overwrite=True"], setup=unfinished_run),
    # -- text (item 9, 12) --
    Case("data-binary", EVAL[:3] + ["blob.bin"], 2, ["--data", "blob.bin", "binary", "offset"], setup=binary_file),
    Case("data-latin1", EVAL[:3] + ["latin1.txt"], 2, ["--data", "latin1.txt", "UTF-8", "offset 6", "iconv"],
         setup=latin1_file),
    Case("compress-data-latin1", COMPRESS + ["--output", "out", "--data", "latin1.txt"], 2,
         ["--data", "latin1.txt", "UTF-8"], setup=latin1_file),
    Case("data-folder-without-text", EVAL[:3] + ["corpus"], 2, ["corpus", "holds no", ".txt"], setup=empty_folder),
    # -- devices (item 9) --
    Case("eval-device-tpu7", EVAL + ["--device", "tpu7"], 2, ["--device", "tpu7", "cpu", "cuda"]),
    Case("compress-device-tpu7", COMPRESS + ["--output", "out", "--device", "tpu7"], 2, ["--device", "tpu7", "cpu"]),
    Case("device-cuda-without-cuda", EVAL + ["--device", "cuda"], 2, ["--device", "cuda", "--device cpu"],
         setup=no_cuda),
    # -- recipes (items 10, 12) --
    Case("recipe-alias-bomb", ["plan", "{config_only}", "--recipe", "bomb.yaml"], 2, ["bomb.yaml", "aliases"],
         setup=alias_bomb),
    Case("recipe-not-utf8", ["plan", "{config_only}", "--recipe", "mine.yaml"], 2, ["mine.yaml", "UTF-8", "byte 20"],
         setup=latin1_recipe),
    # -- values (item 12) --
    Case("eval-block-size-0", EVAL[:4] + ["--block-size", "0"], 2, ["--block-size", "0"]),
    Case("eval-batch-size-0", EVAL + ["--batch-size", "0"], 2, ["--batch-size", "0"], absent=["range()"]),
    Case("eval-stride-0", EVAL + ["--stride", "0"], 2, ["--stride", "0"]),
    Case("eval-stride-above-block", EVAL + ["--stride", "64"], 2, ["--stride", "--block-size"]),
    Case("compress-calibration-tokens-0", COMPRESS + ["--output", "out", "--calibration-tokens", "0"], 2,
         ["--calibration-tokens", "0"]),
    Case("save-every-with-no-distill", COMPRESS + ["--output", "out", "--no-distill", "--save-every", "5"], 2,
         ["--save-every", "nothing to checkpoint"]),
]


def fill(argv: list[str], values: dict) -> list[str]:
    return [arg.format(**values) for arg in argv]


def prepare(case: Case, root: Path, env: dict) -> tuple[Path, Path, list[str]]:
    """(case folder, working folder, argv) with the case's setup done."""
    work = root / case.id
    work.mkdir(parents=True)
    values = {**env, "home": str(work / "home")}
    values.update((case.setup(work, env) if case.setup else None) or {})
    cwd = Path(values.get("cwd", work))
    return work, cwd, fill(case.argv, values)


def check_error(case: Case, code: int, stderr: str, stdout: str) -> None:
    assert code == case.code, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    for word in case.absent:
        assert word not in lines[0], (word, lines[0])
    assert len(lines[0]) < 600, lines[0]
    assert stdout == ""


# -- the suite ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture
def quiet_env(tmp_path, monkeypatch):
    """No network, a home folder and caches of the test's own."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("KRONCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KRONCOMPRESS_DEBUG", raising=False)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_exit_2_before_any_work(case, env, tmp_path, monkeypatch, quiet_env):
    from click.testing import CliRunner

    from kroncompress.cli.main import cli

    work, cwd, argv = prepare(case, tmp_path / "cases", env)
    monkeypatch.setenv("HOME", str(work / "home"))
    monkeypatch.chdir(cwd)
    try:
        start = time.perf_counter()
        result = CliRunner().invoke(cli, argv)
        seconds = time.perf_counter() - start
    finally:
        while _HELD:
            _HELD.pop().release()
    assert "Traceback" not in result.output
    check_error(case, result.exit_code, result.stderr, result.stdout)
    assert seconds < 30, f"{case.id} took {seconds:.1f} s: the check should come before any work"
    if case.check:
        case.check(work)
    assert not (cwd / "out").exists(), "the refused run created its output folder"


# -- what a good run leaves, and how it ends when interrupted ---------------------------------------

def invoke(*argv):
    from click.testing import CliRunner

    from kroncompress.cli.main import cli

    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in argv])


def test_a_folder_of_text_reads_as_its_files(env, tmp_path, quiet_env):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.txt").write_text(TEXT.upper())
    (corpus / ".hidden.txt").write_text("not read")
    folder = invoke("eval", env["tiny"], "--data", corpus, "--block-size", 32, "--json")
    glob = invoke("eval", env["tiny"], "--data", f"{corpus}/*.txt", "--block-size", 32, "--json")
    assert folder.exit_code == 0 and glob.exit_code == 0, folder.output + glob.output
    assert json.loads(folder.stdout) == json.loads(glob.stdout)


def test_a_finished_run_cleans_its_leftovers_matches_file_modes_and_unlocks(env, tmp_path, quiet_env):
    out = tmp_path / "out"
    ours, other, odd = tmp_path / ".out.tmp-0123abcd", tmp_path / ".other.tmp-0123abcd", tmp_path / ".out.tmp-keepme"
    for folder in (ours, other, odd):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    result = invoke("compress", env["tiny"], "--recipe", "kn-gpt2", "--output", out, "--no-distill", "--data", env["text"])
    assert result.exit_code == 0, result.output
    assert not ours.exists() and other.exists() and odd.exists()  # only this output's own leftovers go
    assert not (tmp_path / ".out.lock").exists()
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir() if path.is_file()}
    assert len(set(modes.values())) == 1, modes  # safetensors alone used to be 0600
    umask = os.umask(0)
    os.umask(umask)
    assert modes["model.safetensors"] == 0o666 & ~umask


def test_an_interrupted_rename_gets_the_previous_folder_back(tmp_path):
    from kroncompress.outputs import clean_leftovers

    backup = tmp_path / ".run.old-89abcdef"
    backup.mkdir()
    (backup / "config.json").write_text("{}")
    clean_leftovers(tmp_path / "run")
    assert (tmp_path / "run" / "config.json").is_file() and not backup.exists()
    stale = tmp_path / ".run.old-00000000"
    stale.mkdir()
    clean_leftovers(tmp_path / "run")  # the folder is there: the backup is stale
    assert not stale.exists() and (tmp_path / "run" / "config.json").is_file()


def test_a_second_claim_of_the_same_output_fails_at_once(tmp_path):
    from kroncompress.outputs import OutputError, claim_output

    with claim_output(tmp_path / "out", style="cli"):
        start = time.perf_counter()
        with pytest.raises(OutputError, match=f"in use by another kroncompress run \\(pid {os.getpid()}\\)"):
            with claim_output(tmp_path / "out", style="cli"):
                pass
        assert time.perf_counter() - start < 1
    with claim_output(tmp_path / "out", style="api"):  # released
        pass


def test_ctrl_c_is_one_line_and_exit_130(env, tmp_path, quiet_env, monkeypatch):
    import kroncompress.pipeline

    def interrupted(*args, **kwargs):
        (tmp_path / "out" / "checkpoints").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(kroncompress.pipeline, "run_pipeline", interrupted)
    result = invoke("compress", env["tiny"], "--recipe", "kn-gpt2", "--output", tmp_path / "out")
    assert result.exit_code == 130, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0], result.stderr
    assert not (tmp_path / ".out.lock").exists()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_sigint_during_distillation_exits_130_and_names_resume(env, tmp_path):
    # The child starts with SIGINT ignored, as every `kroncompress ... &` of a non-interactive shell (or a
    # `make test &`) does: the CLI must still stop on it. stderr goes to a file: an undrained pipe could fill.
    out, recipe = tmp_path / "out", tmp_path / "tiny-distill.yaml"
    recipe.write_text("version: 1\nname: tiny-distill\ncompress:\n  - targets: [transformer.h.1.mlp.c_fc]\n"
                      "    strategy: kronecker\n    options: {b_shape: [1, 2]}\n"
                      "distill: {teacher: original, train: {batch_size: 2, grad_accum: 1}}\n")
    command = [sys.executable, "-m", "kroncompress.cli.main", "compress", env["tiny"], "--recipe", str(recipe), "--output",
               str(out), "--data", env["text"], "--max-steps", "100000", "--save-every", "1"]
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "KRONCOMPRESS_CACHE": str(tmp_path / "cache")}
    environ.pop("KRONCOMPRESS_DEBUG", None)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr_file, env=environ,
                                   preexec_fn=_ignore_sigint)
        try:
            deadline = time.monotonic() + 480
            while not list(out.glob("checkpoints/checkpoint-*/trainer_state.json")):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint within 480 s"
                time.sleep(0.5)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    stderr = log.read_text()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted") and "--resume" in last, stderr
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.parametrize("inherited", [signal.SIG_IGN, signal.SIG_DFL])
def test_the_cli_turns_sigint_into_keyboard_interrupt_whatever_it_inherited(inherited):
    script = ("import os, signal, time\nfrom kroncompress.cli.main import listen_to_ctrl_c\nlisten_to_ctrl_c()\n"
              "try:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\nexcept KeyboardInterrupt:\n"
              "    print('interrupted')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))
    assert done.stdout.strip() == "interrupted", done.stderr


def test_save_every_reaches_the_recipe_the_trainer_reads(env, tmp_path, quiet_env, monkeypatch):
    import kroncompress.pipeline

    seen = {}
    monkeypatch.setattr(kroncompress.pipeline, "run_pipeline", lambda model, recipe, *a, **k: seen.setdefault("recipe", recipe) and {})
    invoke("compress", env["tiny"], "--recipe", "kn-gpt2", "--output", tmp_path / "out", "--save-every", 3)
    assert seen["recipe"].distill.train.save_every == 3


def test_a_recipe_may_still_use_a_few_aliases(tmp_path):
    from kroncompress.recipe import load_recipe

    path = tmp_path / "alias.yaml"
    path.write_text("version: 1\nname: alias\ncompress:\n"
                    "  - {targets: [transformer.h.1.mlp.c_fc], strategy: kronecker, options: &kn {ratio: 2}}\n"
                    "  - {targets: [transformer.h.1.mlp.c_proj], strategy: kronecker, options: *kn}\n")
    recipe = load_recipe(path)
    assert recipe.compress[0].options == recipe.compress[1].options == {"ratio": 2}


def test_api_messages_name_the_api_argument(tmp_path):
    import kroncompress as kc
    from conftest import build_tiny

    kc.save_compressed(build_tiny("gpt2"), tmp_path / "out")
    with pytest.raises(ValueError) as error:
        kc.save_compressed(build_tiny("gpt2"), tmp_path / "out")
    assert "overwrite=True" in str(error.value) and "--overwrite" not in str(error.value)


# -- main: print the table for an executable --------------------------------------------------------

def first_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line]
    if not lines:
        return ""
    if lines[0].startswith("Traceback"):
        return "Traceback ... " + lines[-1]
    return lines[0]


def table(executable: str, root: Path) -> list[tuple[str, str, str]]:
    """(case id, exit code, first stderr line) of every case run by `executable` in a subprocess."""
    env = build_env(root / "fixtures")
    rows = []
    for case in CASES:
        try:
            work, cwd, argv = prepare(case, root / "cases", env)
        except BaseException as skip:  # pytest.skip in a setup
            rows.append((case.id, "skipped", str(skip)))
            continue
        environ = {**os.environ, "HOME": str(work / "home"), "HF_HUB_OFFLINE": "1",
                   "KRONCOMPRESS_CACHE": str(root / "cache"), "COLUMNS": "200"}
        command = f"ulimit -v 4000000; exec {executable} " + " ".join(f"'{arg}'" for arg in argv)
        start = time.perf_counter()
        try:
            done = subprocess.run(["bash", "-c", command], cwd=cwd, env=environ, capture_output=True, text=True,
                                  timeout=300)
            code, first = str(done.returncode), first_line(done.stderr)
        except subprocess.TimeoutExpired:
            code, first = "timeout", "(killed after 300 s)"
        finally:
            while _HELD:
                _HELD.pop().release()
        lost = ""
        if case.check:
            try:
                case.check(work)
            except AssertionError as error:
                lost = f" [LOST: {error}]"
        rows.append((case.id, code, f"{first[:300]}{lost} ({time.perf_counter() - start:.1f} s)"))
    return rows


if __name__ == "__main__":
    import tempfile

    executable = sys.argv[1] if len(sys.argv) > 1 else "kroncompress"
    with tempfile.TemporaryDirectory(prefix="kc-bad-input-") as folder:
        for case_id, code, first in table(executable, Path(folder)):
            print(f"| {case_id} | {code} | {first.replace('|', '/')} |")
