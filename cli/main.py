"""The `kroncompress` command line: parses with click, calls the library, renders with rich.

Nothing here computes what the Python API can't; every command is a few library calls. Every anticipated
failure (a bad flag value, a missing path, an invalid recipe, an unusable output folder, unreadable text)
prints one `error: ...` line to stderr and exits with code 2; Ctrl-C prints one line and exits with 130.
Anything else is a bug and shows its traceback. Checks that need no model run before it loads. Set
KRONCOMPRESS_DEBUG=1 to see the traceback of a user error too.
"""

from __future__ import annotations

import dataclasses
import inspect as pyinspect
import json
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import click

from kroncompress.cli import render
from kroncompress.cli.calibrate import check_stats_option
from kroncompress.cli.checks import _check_data, _check_device, _check_tokenizer, _claim_output, _local, tokenizer_option
from kroncompress.cli.errors import (  # noqa: F401  (INTERRUPTED ... Interrupted: re-exported from their old home)
    INTERRUPTED, MESSAGE_LIMIT, USER_ERRORS, Interrupted, UserError, _Cli, user_errors,
)


def _example(*lines: str) -> str:
    # "\b" keeps click from re-wrapping the example lines
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


def _package_version() -> str:
    try:
        return version("kroncompress")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _quiet_transformers() -> None:
    """transformers' and datasets' tqdm bars (shards, "Generating train split") would interleave with rich's output."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _load(model: str, *, meta_ok: bool, dtype: str | None = None, device: str | None = None, tokenizer=None):
    from kroncompress.models import load_model

    _quiet_transformers()
    return load_model(model, meta_ok=meta_ok, dtype=dtype, device=device, tokenizer=tokenizer)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=_example("kroncompress plan ./gpt2 --recipe kn-gpt2",
                             "kroncompress compress ./gpt2 --recipe kn-gpt2 --output runs/kn-gpt2"))
@click.version_option(_package_version(), "--version", prog_name="kroncompress")
def cli() -> None:
    """Compress Hugging Face transformers by Kronecker (and other) matrix decompositions.

    MODEL arguments accept a local folder written by save_pretrained(), a folder holding only
    config.json (planned on shapes only), or a Hugging Face hub id (needs network access).
    """


@cli.command(epilog=_example("kroncompress plan ./gpt2 --recipe kn-gpt2",
                             "kroncompress plan ./gpt2-config-only --recipe kn-gpt2 --json > plan.json"))
@click.argument("model")
@click.option("--recipe", "-r", required=True, help="Bundled recipe name (see `kroncompress recipes`) or a YAML path.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (params_before, params_after, modules) instead of tables.")
@click.option("--calibration-stats", default=None, type=click.Path(), metavar="FILE",
              help="Statistics from `kroncompress calibrate`: shapes and a recipe's budget are chosen on them.")
@user_errors
def plan(model: str, recipe: str, as_json: bool, calibration_stats: str | None = None) -> None:
    """Dry run: which module gets which strategy, factor shapes and parameter counts.

    Needs shapes only: a folder holding just config.json is planned on the meta device. A recipe with a
    `budget` shows each module's share and why (on weight errors, or on --calibration-stats).
    """
    from kroncompress.calibration import CalibrationStats
    from kroncompress.recipe import load_recipe
    from kroncompress.surgery import plan as plan_model

    parsed = load_recipe(recipe)  # validate before the (slow) model load
    stats = CalibrationStats.load(calibration_stats) if calibration_stats is not None else None
    loaded, info = _load(model, meta_ok=stats is None)
    data = plan_model(loaded, parsed, stats).to_dict()
    if as_json:
        _print_json({"model": model, "recipe": parsed.name, "source": info.source, "meta": info.meta, **data})
        return
    out = render.console()
    out.print(f"[bold]model[/bold] {info.description}")
    out.print(f"[bold]recipe[/bold] {parsed.name}: {parsed.description}")
    out.print(render.module_table("plan", data.get("modules", [])))
    if data.get("allocation") is not None:
        out.print(render.allocation_table(data["allocation"]))
    out.print(render.totals_line(data))
    if render.compressed_lines(data).plain:
        out.print(render.compressed_lines(data))


def _report_to(value: str | None) -> dict | None:
    """`--report-to a,b` as TrainingArguments keywords (None: the recipe's, else "none")."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("give integration names, e.g. tensorboard or wandb (or none)", param_hint="--report-to")
    from kroncompress.recipe import report_to_problem

    problem = report_to_problem(names)
    if problem:
        raise click.BadParameter(problem, param_hint="--report-to")
    return {"report_to": names[0] if len(names) == 1 and names[0] in ("none", "all") else names}


@cli.command(epilog=_example(
    "kroncompress compress --recipe kn-gpt2 --output runs/demo --data shakespeare --max-steps 200",
    "kroncompress compress ./gpt2 --recipe kn-gpt2 --output runs/kn-gpt2",
    "kroncompress compress gpt2 --recipe kn-gpt2 --output runs/kn-gpt2   # hub id: needs network",
    "kroncompress compress ./gpt2 --recipe kn-gpt2 --output runs/kn-gpt2 --resume"))
@click.argument("model", default="shakespeare-gpt2")
@click.option("--recipe", "-r", required=True, help="Bundled recipe name (see `kroncompress recipes`) or a YAML path.")
@click.option("--output", "-o", required=True, type=click.Path(),  # str: an empty value is refused, not read as "."
              help="Folder to write the compressed model to.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it already exists.")
@click.option("--data", default=None,
              help="Override the recipe's text: a packaged corpus (shakespeare), a file/glob, or a hub dataset NAME[:CONFIG].")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Cap the distillation steps.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUTPUT/checkpoints.")
@click.option("--no-distill", is_flag=True, help="Skip the recipe's distillation stage: decompose, evaluate, save.")
@click.option("--dtype", default=None, help="Load the model in this dtype (float32, bfloat16, float16, auto).")
@click.option("--device", default=None, help="Run on this device (cpu, cuda, cuda:1, ...).")
@click.option("--calibration-data", default=None, help="Text for data-aware init (e.g. shakespeare, 'notes/*.txt'); overrides the recipe's calibration.data.")
@click.option("--calibration-tokens", type=click.IntRange(min=1), default=None,
              help="Calibration tokens (default: the recipe's, else 16384).")
@click.option("--calibration-stats", default=None, type=click.Path(), metavar="FILE",
              help="Use the statistics `kroncompress calibrate` saved instead of a calibration pass "
                   "(excludes --calibration-data and --calibration-tokens).")
@click.option("--save-every", type=click.IntRange(min=1), default=None,
              help="Checkpoint the distillation every N optimizer steps (the recipe's distill.train.save_every, default 500).")
@click.option("--report-to", default=None,
              help="Send distillation logs to these integrations (comma-separated: tensorboard, wandb, ...; "
                   "all; none, the default): TrainingArguments' report_to.")
@click.option("--eval-tokens", type=click.IntRange(min=2), default=None,
              help="Score at most this many tokens in each perplexity stage (over the recipe's evaluate.perplexity.max_tokens).")
@tokenizer_option(saved=True)
@user_errors
def compress(model: str, recipe: str, output: str, overwrite: bool, data: str | None, max_steps: int | None,
             resume: bool, no_distill: bool, dtype: str | None, device: str | None,
             calibration_data: str | None = None, calibration_tokens: int | None = None,
             save_every: int | None = None, report_to: str | None = None, eval_tokens: int | None = None,
             tokenizer: str | None = None, calibration_stats: str | None = None) -> None:
    """Run every stage RECIPE has on MODEL (decompose, distill, evaluate) and save the result to OUTPUT.

    MODEL defaults to the small GPT-2 packaged with kroncompress (shakespeare-gpt2), so the whole
    pipeline runs offline. To compress GPT-2 itself, pass a local folder saved with
    save_pretrained, or the hub id `gpt2` on a machine with network access.

    Calibration, distillation and perplexity tokenise text with MODEL's tokenizer, or --tokenizer's (for a
    folder without one, e.g. converted from GGUF); it is saved into OUTPUT.

    OUTPUT is an HF-style folder (config.json, model.safetensors, recipe.yaml, report.json, README.md,
    tokenizer files, perplexity.png) that `kroncompress inspect` summarises and kc.load_compressed()
    reloads. It must be a new folder, an unfinished run (--resume) or a folder kroncompress wrote (--overwrite); it is locked
    while the run lasts.
    """
    from kroncompress.pipeline import run_pipeline
    from kroncompress.recipe import load_recipe

    parsed = _with_save_every(load_recipe(recipe), save_every, no_distill)
    _check_device(device)
    training_args = _report_to(report_to)
    inputs = [model, recipe] + _check_data(data, "--data") + _check_data(calibration_data, "--calibration-data")
    inputs += check_stats_option(calibration_stats, calibration_data, calibration_tokens)
    loaded_tokenizer = _check_tokenizer(tokenizer)
    inputs += _local(tokenizer)
    with _claim_output(output, overwrite=overwrite, resume=resume, sources=inputs) as output:
        _quiet_transformers()
        out, err = render.console(), render.console(stderr=True)
        bars = render.LazyProgress(err)
        try:
            report = run_pipeline(model, parsed, output, data=data, max_steps=max_steps, resume=resume,
                                  overwrite=overwrite, device=device, dtype=dtype, calibration_data=calibration_data,
                                  distill=not no_distill, calibration_tokens=calibration_tokens,
                                  calibration_stats=calibration_stats,
                                  training_args=training_args, eval_tokens=eval_tokens, tokenizer=loaded_tokenizer,
                                  compress_progress=bars.callback("compressing", "modules"),
                                  calibration_progress=bars.callback("calibrating", "tokens"),
                                  eval_progress=lambda done, total, stage: bars.callback(f"perplexity ({stage})", "windows")(done, total))
        finally:
            bars.stop()
    compression = report["compression"]
    out.print(render.module_table("compressed modules", compression.get("modules", []), with_error=True))
    if render.compressed_lines(compression).plain:
        out.print(render.compressed_lines(compression))
    out.print(render.summary_table(report))
    out.print(f"[green]saved[/green] {output}" + (f"  (plot: {report['plot']})" if report.get("plot") else ""))


def _with_save_every(parsed, save_every: int | None, no_distill: bool):
    """The recipe with --save-every written into distill.train.save_every (which the trainer reads)."""
    if save_every is None:
        return parsed
    if no_distill or parsed.distill is None:
        why = "--no-distill skips distillation" if no_distill else f"recipe {parsed.name!r} has no distill stage"
        raise UserError(f"--save-every {save_every}: {why}, so there is nothing to checkpoint; drop --save-every")
    train = dataclasses.replace(parsed.distill.train, save_every=save_every)
    return dataclasses.replace(parsed, distill=dataclasses.replace(parsed.distill, train=train))


def _save(save: Callable, model, output: Path, **kwargs) -> None:
    """Call save_compressed with the keyword arguments it accepts (overwrite/tokenizer are optional there)."""
    accepted = pyinspect.signature(save).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    save(model, output, **{k: v for k, v in kwargs.items() if takes_any or k in accepted})


@cli.command(epilog=_example("kroncompress strategies", "kroncompress strategies --json"))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@user_errors
def strategies(as_json: bool) -> None:
    """List the registered decomposition strategies and their options."""
    import kroncompress as kc

    rows = [_describe_strategy(name, kc.get_strategy(name)) for name in kc.list_strategies()]
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(title="strategies", title_justify="left")
    for column in ("name", "kinds", "options", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        options = ", ".join(f"{o['name']}={o['default']!r}" for o in row["options"])
        table.add_row(row["name"], ", ".join(row["kinds"]), options, row["description"])
    render.console().print(table)


def _first_doc_line(*objects: Any) -> str:
    for obj in objects:
        doc = pyinspect.getdoc(obj) if obj is not None else None
        if doc and not doc.startswith(f"{getattr(obj, '__name__', '')}("):  # skip dataclass auto-docs
            return doc.strip().splitlines()[0]
    return ""


def _describe_strategy(name: str, cls: type) -> dict[str, Any]:
    config = getattr(cls, "Config", None)
    options = []
    if config is not None and dataclasses.is_dataclass(config):
        for f in dataclasses.fields(config):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            options.append({"name": f.name, "default": default})
    module = sys.modules.get(cls.__module__)
    return {
        "name": name, "kinds": list(getattr(cls, "kinds", ())), "options": options,
        "description": _first_doc_line(cls if cls.__doc__ else None, module, config),
    }


@cli.command(epilog=_example("kroncompress recipes", "kroncompress plan ./gpt2 --recipe kn-gpt2-mlp"))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@user_errors
def recipes(as_json: bool) -> None:
    """List the bundled recipes (usable by bare name with --recipe)."""
    from kroncompress.recipe import list_recipes

    rows = [{"name": name, "description": description} for name, description in list_recipes()]
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(title="bundled recipes", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("description", overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["description"])
    render.console().print(table)


@cli.command(epilog=_example("kroncompress inspect runs/kn-gpt2"))
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@user_errors
def inspect(directory: Path, as_json: bool) -> None:
    """Summarise a folder written by `kroncompress compress`: params, recipe, per-module plan, metrics."""
    from kroncompress.cli.folder import read_compressed_folder
    from kroncompress.io import verify_folder

    summary = read_compressed_folder(directory)
    summary["problems"] = verify_folder(directory)
    if as_json:
        _print_json(summary)
        if summary["problems"]:
            raise UserError(f"{directory} is damaged: {summary['problems'][0]}")
        return
    out = render.console()
    items = [("folder", str(directory)), ("model type", summary.get("model_type", "?")),
             ("recipe", summary.get("recipe") or "?")]
    if summary.get("params_before") is not None:
        items.append(("params", f"{render.count(summary['params_before'])} -> {render.count(summary.get('params_after'))}"))
    out.print(render.key_value_table("compressed model", items))
    has_errors = any("rel_error" in row for row in summary.get("modules", []))
    out.print(render.module_table("modules", summary.get("modules", []), with_error=has_errors))
    metrics = summary.get("metrics") or {}
    if metrics:
        out.print(render.key_value_table("metrics", sorted(metrics.items())))
    if summary["problems"]:
        raise UserError(f"{directory} is damaged: {summary['problems'][0]}")


@cli.command(epilog=_example("kroncompress export runs/kn-gpt2 --dense --output runs/kn-gpt2-dense",
                             "kroncompress export runs/kn-gpt2 --onnx --output runs/kn-gpt2-onnx"))
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--dense", is_flag=True, help="Multiply the factors back into plain weights (a plain HF model).")
@click.option("--onnx", is_flag=True,
              help="An ONNX graph that keeps the factors (causal LMs: input_ids, attention_mask -> logits), "
                   "checked against onnxruntime. Needs kroncompress[onnx].")
@click.option("--opset", type=click.IntRange(min=1), default=None, help="ONNX opset for --onnx (default: torch's).")
@click.option("--output", "-o", required=True, type=click.Path(),  # str: an empty value is refused, not read as "."
              help="Folder for the exported model.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it already exists.")
@user_errors
def export(directory: Path, dense: bool, onnx: bool, opset: int | None, output: str, overwrite: bool) -> None:
    """Export a compressed folder for serving.

    With --dense, AutoModelForCausalLM.from_pretrained(OUTPUT) loads the result without kroncompress; it has
    the original parameter count (the compression is baked into the weights' values, not their structure).
    With --onnx, OUTPUT/model.onnx computes the logits with the factorised layers (the savings kept), and
    onnxruntime runs it; see docs/deployment.md.
    """
    if dense == onnx:
        raise UserError("export needs one format: --dense (a plain HF model with the factors multiplied back) "
                        "or --onnx (an ONNX graph that keeps the factors)")
    if opset is not None and not onnx:
        raise UserError("--opset applies to --onnx only")
    if not (directory / "config.json").is_file():
        raise UserError(f"{str(directory)!r} is not a compressed model folder (no config.json); pass a folder written by `kroncompress compress`")
    with _claim_output(output, overwrite=overwrite, sources=[directory]) as output:
        _quiet_transformers()
        if dense:
            from kroncompress.io import export_dense

            _save(export_dense, directory, output, overwrite=overwrite)  # with the manifest a later --overwrite needs
        else:
            from kroncompress.io.onnx import export_onnx

            result = export_onnx(directory, output, overwrite=overwrite, opset=opset)
    if dense:
        render.console().print(f"[green]exported[/green] {output} (plain Hugging Face model, loads with from_pretrained)")
    else:
        render.console().print(f"[green]exported[/green] {output}/model.onnx (opset {result.opset}; onnxruntime's logits "
                               f"match PyTorch's to {result.max_abs_diff:.2g}, tolerance {result.tolerance:.2g})")


@cli.command("eval", epilog=_example("kroncompress eval runs/kn-gpt2 --data shakespeare --block-size 256 --stride 128",
                                     "kroncompress eval ./gpt2 --data 'notes/*.txt' --json"))
@click.argument("model")
@click.option("--data", "-d", required=True,
              help="A packaged corpus (shakespeare), a file path or glob, or a hub dataset NAME[:CONFIG].")
@click.option("--split", default=None, help="Split to score (default: the source's own, else 'test').")
@click.option("--block-size", type=click.IntRange(min=2), default=None, help="Window length in tokens (default 1024, or the model's positions if fewer).")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Tokens the window advances by (default block size / 2).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Score at most this many tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Windows per forward pass.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (perplexity with its protocol).")
@tokenizer_option(saved=False)
@user_errors
def evaluate(model: str, data: str, split, block_size, stride, max_tokens, batch_size, device, as_json: bool,
             tokenizer: str | None = None) -> None:
    """Sliding-window perplexity of MODEL (a compressed folder, a local model or a hub id) on DATA.

    The number is always printed with its protocol: block size, stride and tokens scored. DATA is
    tokenised with MODEL's tokenizer, or --tokenizer's.
    """
    from kroncompress.evaluate import evaluate_perplexity
    from kroncompress.models import require_tokenizer

    _check_device(device)
    _check_data(data, "--data")
    if stride is not None and block_size is not None and stride > block_size:
        raise UserError(f"--stride {stride} is larger than --block-size {block_size}; tokens would be skipped")
    given = _check_tokenizer(tokenizer)
    loaded, info = _load(model, meta_ok=False, device=device, tokenizer=given)
    tokenizer = require_tokenizer(info, loaded)  # --tokenizer's, the folder's, the run's, or GPT-2's for its vocabulary
    bars = render.LazyProgress(render.console(stderr=True))
    try:
        result = evaluate_perplexity(loaded, tokenizer, data, split=split, block_size=block_size, stride=stride,
                                     max_tokens=max_tokens, batch_size=batch_size, device=device,
                                     progress=bars.callback("perplexity", "windows"))
    finally:
        bars.stop()
    if as_json:
        _print_json(result.to_dict())
    else:
        render.console().print(f"{model}: {result}")


# the downstream-task commands (finetune, compress-task) and `calibrate` live in their own modules
from kroncompress.cli.calibrate import register as _register_calibrate  # noqa: E402
from kroncompress.cli.quantize import register as _register_quantize  # noqa: E402
from kroncompress.cli.tasks import register as _register_task_commands  # noqa: E402

_register_task_commands(cli)
_register_calibrate(cli)
_register_quantize(cli)


def listen_to_ctrl_c() -> None:
    """Make SIGINT raise KeyboardInterrupt (so the run stops, keeps its checkpoint and exits with 130) even when
    the process inherited SIGINT ignored. A non-interactive shell starts every `command &` that way, and Python
    then never installs its handler: `kill -INT` and Ctrl-C did nothing and a distillation ran on."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (`kroncompress ...`)."""
    listen_to_ctrl_c()
    cli.main(args=argv, prog_name="kroncompress")


if __name__ == "__main__":
    main()
