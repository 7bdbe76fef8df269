"""`kroncompress quantize`: weight-only int8 / int4 of a compressed folder's factors (kc.quantize), saved as a new folder."""

from __future__ import annotations

import click

from kroncompress.cli import render
from kroncompress.cli.errors import user_errors


@click.command(epilog="\b\nExample:\n  kroncompress quantize runs/kn-gpt2 --bits 8 --output runs/kn-gpt2-int8\n"
                      "  kroncompress quantize runs/svd-gpt2 --bits 4 --group-size 32 --output runs/svd-gpt2-int4")
@click.argument("model")
@click.option("--bits", type=click.Choice(["4", "8"]), default="8", show_default=True, help="4 or 8: integer width of the stored factors.")
@click.option("--group-size", type=click.IntRange(min=1), default=None,
              help="Entries sharing one scale along each factor's input axis (default: one scale per channel).")
@click.option("--dense", is_flag=True, help="Also quantize the remaining nn.Linear / Conv1D weights (not only the factors).")
@click.option("--output", "-o", required=True, type=click.Path(), help="Folder to write the quantized model to.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it already exists.")
@user_errors
def quantize(model: str, bits: str, group_size: int | None, dense: bool, output: str, overwrite: bool) -> None:
    """Store the factor matrices of MODEL (a compressed folder) as int8 / int4 with per-channel or per-group scales.

    The result is a compressed folder like any other: kc.load_compressed and, after `import kroncompress`,
    from_pretrained load it. MODEL may also be a plain model with --dense (e.g. a baseline: the original
    quantized the same way).
    """
    from kroncompress.cli.checks import _claim_output, _local
    from kroncompress.cli.main import _load
    from kroncompress.io import save_compressed
    from kroncompress.outputs import mark_output
    from kroncompress.quantization import quantize as quantize_model

    bits = int(bits)
    with _claim_output(output, overwrite=overwrite, sources=_local(model)) as target:
        loaded, info = _load(model, meta_ok=False)
        summary = quantize_model(loaded, bits=bits, group_size=group_size, dense=dense)
        if not summary.rows:
            raise click.UsageError(f"{model}: nothing to quantize (no factorized layer{'' if dense else '; pass --dense for plain Linear/Conv1D weights'})")
        save_compressed(loaded, target, tokenizer=info.tokenizer, overwrite=overwrite)
        mark_output(target, "quantize")
    out = render.console()
    out.print(f"[bold]int{bits}[/bold] {len(summary.rows)} tensors"
              + (f", group size {group_size}" if group_size else ", one scale per channel")
              + (f"; kept in float: {len(summary.kept)}" if summary.kept else ""))
    out.print(f"[bold]weights[/bold] {render.megabytes(summary.bytes_before)} -> {render.megabytes(summary.bytes_after)}"
              f" ({render.ratio(summary.bytes_before, summary.bytes_after)} smaller)")
    out.print(f"[green]saved[/green] {target}")


def register(group: click.Group) -> click.Group:
    """Add `quantize` to `group` (the main `kroncompress` group)."""
    if quantize.name not in group.commands:
        group.add_command(quantize)
    return group
