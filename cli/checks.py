"""Checks of command-line values that run before any model loads: the output folder (claimed and locked),
--device, and local text named by --data / --calibration-data."""

from __future__ import annotations

import os
from pathlib import Path

from kroncompress.cli.errors import UserError


def _is_main_process() -> bool:
    """Under torchrun every rank runs the command; only rank 0 writes (and locks) the output."""
    return int(os.environ.get("RANK", "0")) == 0


def _claim_output(output: Path, *, overwrite: bool, resume: bool = False, sources=()):
    """The output folder checked (path, contents, writable) and locked for the run, before any slow work."""
    from kroncompress.outputs import claim_output

    return claim_output(output, overwrite=overwrite, resume=resume, sources=[s for s in sources if s], style="cli",
                        lock=_is_main_process())


def _check_device(device: str | None) -> None:
    """--device names a device this PyTorch can use, checked before the model loads."""
    if device is None:
        return
    import torch

    known = "cpu, cuda, cuda:N" + (", mps" if torch.backends.mps.is_available() else "")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {device!r} is not a device; use one of {known}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device {device!r}: {why}; use --device cpu, or leave --device out")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"--device {device!r}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                            f"device{'s' if count != 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device!r}: MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise UserError(f"--device {device!r}: kroncompress runs on {known}")


def _check_data(value: str | None, flag: str) -> list[str]:
    """Local text named by --data / --calibration-data exists and is UTF-8, checked before the model loads.
    Returns the local files (inputs the output folder must not hold)."""
    if value is None:
        return []
    from kroncompress.distill.data import check_text_files, resolve_files, text_spec

    try:
        spec = text_spec(value)
        files = [str(f) for f in resolve_files(spec.files)] if spec.kind == "files" else []
        check_text_files(files)
    except ValueError as exc:
        raise UserError(f"{flag} {value!r}: {exc}") from None
    return files


TOKENIZER_HELP = ("Tokenizer to use instead of MODEL's own: a folder written by save_pretrained (a model folder "
                  "holding one will do) or a hub id; must fit MODEL's vocabulary")


def tokenizer_option(saved: bool):
    """The --tokenizer option of every command that tokenises text (`saved`: the command writes it out)."""
    import click

    return click.option("--tokenizer", default=None, metavar="PATH_OR_ID",
                        help=TOKENIZER_HELP + ("; saved with the output." if saved else "."))


def _check_tokenizer(value: str | None):
    """The tokenizer --tokenizer names, loaded before the model (None when not given); a folder without
    tokenizer files, a path that does not exist or an id that cannot be fetched is one error line."""
    if value is None:
        return None
    from kroncompress.models import resolve_tokenizer

    if not value.strip():
        raise UserError("--tokenizer is empty; pass a tokenizer folder or a hub id, or leave --tokenizer out")
    try:
        return resolve_tokenizer(value)
    except ValueError as exc:
        raise UserError(f"--tokenizer {value!r}: {exc}") from None


def _local(value: str | None) -> list[str]:
    """`value` when it names an existing path (an input the output folder must not hold)."""
    return [value] if value and Path(value).expanduser().exists() else []
