"""How the CLI fails: a bad input is one `error: ...` line on stderr and exit code 2, Ctrl-C one line and 130
(`user_errors` on each command, `_Cli` for click's own usage errors). KRONCOMPRESS_DEBUG=1 re-raises."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable

import click

from kroncompress.errors import KroncompressError

# KroncompressError (every subclass) first; ValueError for the bare ones left in the library and its dependencies
USER_ERRORS = (KroncompressError, ValueError, FileExistsError, FileNotFoundError, NotADirectoryError)
MESSAGE_LIMIT = 1000  # characters of an error line; longer library messages are cut
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)


def _one_line(message: str) -> str:
    text = " ".join(str(message)[: 4 * MESSAGE_LIMIT].split())  # one line, whatever the library's message looks like
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


class UserError(click.ClickException):
    """A bad-input error: one line on stderr, exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(_one_line(message))

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", file=file or sys.stderr)


class Interrupted(UserError):
    """Ctrl-C: one line on stderr, exit code 130."""

    exit_code = INTERRUPTED


def user_errors(func: Callable) -> Callable:
    """Turn the library's ValueErrors (and friends) into one-line `error: ...` exits with code 2, and
    Ctrl-C into one line and exit code 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            if os.environ.get("KRONCOMPRESS_DEBUG"):
                raise
            raise Interrupted(_interrupted_message(func.__name__, kwargs)) from None
        except USER_ERRORS as exc:
            if os.environ.get("KRONCOMPRESS_DEBUG"):
                raise
            raise UserError(str(exc) or type(exc).__name__) from exc

    return wrapper


def _interrupted_message(command: str, kwargs: dict) -> str:
    output = kwargs.get("output")
    if command == "compress" and output is not None and (Path(output) / "checkpoints").is_dir():
        return (f"interrupted (Ctrl-C); {str(output)!r} keeps the last checkpoint: run the same command with "
                "--resume to continue")
    return "interrupted (Ctrl-C); nothing was saved" if command in ("compress", "export") else "interrupted (Ctrl-C)"


class _Cli(click.Group):
    """click.Group whose usage errors (a bad flag value, a missing option) are one `error:` line with exit
    code 2, like every other user error, and whose Ctrl-C outside a command exits with 130."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = f"; see '{exc.ctx.command_path} --help'" if exc.ctx is not None else ""
            UserError(exc.format_message().rstrip(".") + where).show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:  # Ctrl-C while click itself was reading or parsing
            Interrupted("interrupted (Ctrl-C)").show()
            sys.exit(INTERRUPTED)
        sys.exit(result if isinstance(result, int) else 0)
