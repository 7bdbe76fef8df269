"""The docs' shell blocks never rot either (docs/contributing.md, "Shell blocks").

- A ```bash block preceded by the line `<!-- run -->` runs, line by line under `bash -e -o pipefail`, in a
  fresh folder holding `tiny-gpt2/` (a random 2-block GPT-2 with weights) and `gpt2-config/` (GPT-2 small's
  config only), with this checkout's `kroncompress` first on PATH.
- Every other shell block (bash, sh, shell, console) is checked without running: each `kroncompress ...`
  command is parsed by the CLI itself (the subcommand, its options and their values must be accepted), each
  `python SCRIPT.py --flag` names a script of this repository that defines that flag, and each `make TARGET`
  names a Makefile target.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from test_docs import PAGES, ROOT, code_blocks, page_id

RUN_MARKER = "<!-- run -->"
SHELLS = ("bash", "sh", "shell", "console")
PYTHONS = ("python", "python3", ".venv/bin/python")


def shell_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(first code line number, code, marked to run) of every shell block of one page."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for line, info, code, _ in code_blocks(text):
        language = info.split()[0].lstrip(".{").lower() if info else ""
        if language in SHELLS:
            previous = next((x.strip() for x in reversed(lines[:line - 2]) if x.strip()), "")
            found.append((line, code, previous == RUN_MARKER))
    return found


def commands(code: str) -> list[tuple[int, list[str]]]:
    """(line offset, argv) of each command in a block: continuations joined, comments dropped, a pipeline
    or a command list cut at its first `|`, `&&`, `;` or redirection."""
    joined, out, start = "", [], 0
    for i, line in enumerate(code.splitlines()):
        if not joined:
            start = i
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        joined += line
        text = joined.replace("$(which kroncompress)", "kroncompress").strip()
        if text.startswith("$ "):
            text = text[2:]
        joined = ""
        if not text or text.startswith("#"):
            continue
        argv = shlex.split(text, comments=True)
        for j, token in enumerate(argv):
            if token in ("|", "&&", ";", ">", ">>", "2>") or token.startswith(("|", ">", "2>")):
                argv = argv[:j]
                break
        if argv:
            out.append((start, argv))
    return out


def check_kroncompress(argv: list[str]) -> None:
    """Parse `kroncompress ARGS` with the CLI (no command runs): raises click's UsageError on a bad one."""
    from kroncompress.cli.main import cli

    parent = click.Context(cli, info_name="kroncompress")
    if not argv or argv[0].startswith("-"):
        raise click.UsageError(f"no subcommand in {shlex.join(['kroncompress', *argv])}")
    command = cli.get_command(parent, argv[0])
    if command is None:
        raise click.UsageError(f"no such command {argv[0]!r}")
    with command.make_context(argv[0], list(argv[1:]), parent=parent):
        pass



@functools.lru_cache(maxsize=None)
def _help_text(script: Path) -> str:
    return subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120).stdout

def check_command(argv: list[str]) -> str | None:
    """None when `argv` is fine (or not one we check), else what is wrong."""
    if "kroncompress" in argv:
        rest = argv[argv.index("kroncompress") + 1:]
        try:
            check_kroncompress(rest)
        except click.ClickException as error:
            return f"kroncompress {shlex.join(rest)}: {error.format_message()}"
        return None
    if argv[0] in PYTHONS and len(argv) > 1 and argv[1].endswith(".py"):
        script = ROOT / argv[1]
        if not script.is_file():
            return f"{argv[1]} does not exist"
        source = script.read_text(encoding="utf-8")
        flags = [t.split("=")[0] for t in argv[2:] if t.startswith("--")]
        unknown = [f for f in flags if f'"{f}"' not in source and f"'{f}'" not in source]
        if unknown:  # a script may share another's parser (fetch_gemma.py uses fetch_real_data.main): ask it
            unknown = [f for f in unknown if f not in _help_text(script)]
        return f"{argv[1]} defines no {', '.join(unknown)}" if unknown else None
    if argv[0] == "make":
        targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), flags=re.M))
        missing = [t for t in argv[1:] if not t.startswith("-") and "=" not in t and t not in targets]
        return f"Makefile has no target {', '.join(missing)}" if missing else None
    return None


SHELL_PAGES = [p for p in PAGES if shell_blocks(p)]


@pytest.mark.parametrize("page", SHELL_PAGES, ids=page_id)
def test_shell_commands_parse(page: Path):
    problems = [f"{page_id(page)}:{line + offset}: {problem}"
                for line, code, _ in shell_blocks(page)
                for offset, argv in commands(code)
                if (problem := check_command(argv))]
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def shell_folder(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("shell")
    tiny = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(tiny).save_pretrained(folder / "tiny-gpt2")
    GPT2Config().save_pretrained(folder / "gpt2-config")
    return folder


RUN_BLOCKS = [(page, line, code) for page in SHELL_PAGES for line, code, run in shell_blocks(page) if run]


@pytest.mark.parametrize("page, line, code", RUN_BLOCKS, ids=[f"{page_id(p)}:{n}" for p, n, _ in RUN_BLOCKS])
def test_marked_shell_blocks_run(page, line, code, shell_folder):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "KRONCOMPRESS_DEBUG": "1"}
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=shell_folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{page_id(page)}:{line} exited {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def test_at_least_one_block_runs():
    assert RUN_BLOCKS, f"no shell block is marked {RUN_MARKER!r}"


@pytest.mark.parametrize("markdown, expected", [
    ("```bash\nkroncompress recipes\n```\n", [(2, "kroncompress recipes\n", False)]),
    ("<!-- run -->\n```bash\nkroncompress recipes\n```\n", [(3, "kroncompress recipes\n", True)]),
    ("<!-- run -->\n```python\nx = 1\n```\n```sh\nls\n```\n", [(6, "ls\n", False)]),
], ids=["plain", "run marker", "marker on another block"])
def test_shell_block_extraction(markdown, expected, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(markdown, encoding="utf-8")
    assert shell_blocks(page) == expected


@pytest.mark.parametrize("argv, problem", [
    (["kroncompress", "plan", "./gpt2", "--recipe", "kn-gpt2"], None),
    (["kroncompress", "plna", "./gpt2"], "no such command"),
    (["kroncompress", "plan", "./gpt2", "--recipes", "kn-gpt2"], "No such option"),
    (["kroncompress", "eval", "runs/x", "--block-size", "0"], "--block-size"),
    (["kroncompress", "compress", "./gpt2", "--recipe", "kn-gpt2"], "--output"),
    (["python", "benchmarks/bench_speed.py", "--rounds", "3"], None),
    (["python", "benchmarks/bench_speed.py", "--roundz", "3"], "defines no --roundz"),
    (["python", "benchmarks/no_such.py"], "does not exist"),
    (["make", "test"], None),
    (["make", "tset"], "no target tset"),
], ids=["ok", "bad command", "bad option", "bad value", "missing required", "script ok", "script flag", "no script",
        "make ok", "make typo"])
def test_commands_that_do_not_parse_are_reported(argv, problem):
    found = check_command(argv)
    assert (found is None) if problem is None else (problem in found), found


def test_commands_split_lines():
    code = "kroncompress plan a \\\n    --recipe b   # why\n# a comment\n$ kroncompress recipes | head\n"
    assert commands(code) == [(0, ["kroncompress", "plan", "a", "--recipe", "b"]), (3, ["kroncompress", "recipes"])]
