"""`kroncompress finetune` and `kroncompress compress-task`: the downstream-task commands.

They are registered on the main command group by `register(cli)`; `python -m kroncompress.cli.tasks ...`
runs them on their own. Each command is a few `kroncompress.tasks` calls; bad input (a missing column, an
unknown label, an existing output folder) is one `error: ...` line and exit code 2, as everywhere.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import click

from kroncompress.cli.checks import _check_tokenizer, _local, tokenizer_option


def _user_errors(func: Callable) -> Callable:
    """The main CLI's error handling (one line, exit 2), imported when the command runs."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from kroncompress.cli.main import user_errors

        return user_errors(func)(*args, **kwargs)

    return wrapper


def _task_options(func: Callable) -> Callable:
    """The options naming the task and its data (shared by both commands)."""
    options = [
        click.option("--task", "-t", "task", default=None,
                     help="A GLUE task name (sst2, cola, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or a YAML/JSON file of task fields."),
        click.option("--data", "-d", default=None,
                     help="Labelled data: a hub dataset (glue/sst2, NAME:CONFIG), a save_to_disk folder, a csv/tsv/jsonl file or a folder of them."),
        click.option("--text-column", default=None, help="Column holding the text (default: sentence, or the GLUE task's)."),
        click.option("--text-pair-column", default=None, help="Column holding the second text of a sentence pair."),
        click.option("--label-column", default=None, help="Column holding the label (default: label)."),
        click.option("--labels", default=None, help="Class names in id order, comma-separated (default: read from the training split)."),
        click.option("--metric", "metrics", multiple=True, help="accuracy, f1, matthews, pearson or spearman (repeatable; default: the task's)."),
        click.option("--regression", is_flag=True, default=None, help="The label is one float (STS-B style)."),
        click.option("--max-length", type=click.IntRange(min=2), default=None, help="Truncate inputs to this many tokens (default 128)."),
        click.option("--max-examples", type=click.IntRange(min=1), default=None, help="Use only the first examples of each split."),
        click.option("--max-eval-examples", type=click.IntRange(min=1), default=None,
                     help="Score each evaluation split on a seeded random sample of this many examples (the same ones "
                          "every run; after --max-examples), recorded in the output."),
        tokenizer_option(saved=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _spec(task: str | None, text_column, text_pair_column, label_column, labels, metrics, regression, max_length):
    """The TaskSpec fields the options give: a GLUE name or a task file, then the column flags over it."""
    from kroncompress.tasks import task_spec

    base: Any = None
    if task is not None:
        path = Path(task).expanduser()
        if path.is_file():
            import yaml

            try:
                text = path.read_text(encoding="utf-8")
                loaded = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
            except (UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise click.UsageError(f"--task {task}: not a readable task file ({first})") from None
            base = loaded.get("task", loaded) if isinstance(loaded, dict) else loaded
        else:
            base = task
    overrides = dict(text=text_column, text_pair=text_pair_column, label=label_column,
                     labels=[x.strip() for x in labels.split(",")] if labels else None,
                     metrics=list(metrics) or None, kind="regression" if regression else None, max_length=max_length)
    if base is None and not any(v is not None for v in overrides.values()):
        return None
    data = base.get("data") if isinstance(base, dict) else None
    return task_spec(base, **overrides), data


def _scores_table(title: str, scores: dict[str, Any], metrics: list[str]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for split in [k for k in next(iter(scores.values())) if k not in ("score", "examples")]:
        for metric in metrics:
            table.add_column(f"{split} {metric}", justify="right")
    table.add_column("score", justify="right", style="bold")
    for stage, entry in scores.items():
        cells = [f"{entry[split][metric] * 100:.2f}" for split in entry if split not in ("score", "examples") for metric in metrics]
        table.add_row(stage, *cells, f"{entry['score'] * 100:.2f}")
    return table


@click.command(epilog="\b\nExample:\n  kroncompress finetune ./bert --task sst2 --data glue/sst2 --output runs/bert-sst2\n"
                      "  kroncompress finetune ./minilm --data spam.jsonl --text-column text --label-column label --output runs/t")
@click.argument("model")
@_task_options
@click.option("--output", "-o", required=True, help="Folder for the fine-tuned model.")
@click.option("--epochs", type=float, default=3.0, show_default=True, help="Training epochs.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Cap the optimizer steps.")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="Peak learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Examples per step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the new head and the data order.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it already exists.")
@_user_errors
def finetune(model: str, task, data, text_column, text_pair_column, label_column, labels, metrics, regression, max_length,
             max_examples, max_eval_examples, tokenizer, output: Path, epochs: float, max_steps, lr: float, batch_size: int,
             seed: int, overwrite: bool) -> None:
    """Fine-tune MODEL on a task (a new classification head when it has none): the teacher to compress."""
    from kroncompress.cli import render
    from kroncompress.distill.guards import check_training_settings
    from kroncompress.tasks import finetune as run

    check_training_settings(epochs=epochs, lr=lr, seed=seed, flags=True)  # before the data and the model load
    found = _spec(task, text_column, text_pair_column, label_column, labels, metrics, regression, max_length)
    if found is None:
        raise click.UsageError("name the task: --task (a GLUE name or a task file) or its columns (--text-column, --label-column ...)")
    spec, task_data = found
    loaded_tokenizer = _check_tokenizer(tokenizer)
    with _claimed(output, overwrite, [model, data, *_local(tokenizer)]) as output:
        result = run(model, spec, data if data is not None else task_data, output, epochs=epochs, max_steps=max_steps,
                     lr=lr, batch_size=batch_size, seed=seed, overwrite=overwrite, max_examples=max_examples,
                     max_eval_examples=max_eval_examples, tokenizer=loaded_tokenizer)
    out = render.console()
    out.print(_scores_table(f"{result.data.spec.name}: fine-tuned, {result.steps} steps, {result.seconds:.1f} s",
                            {"fine-tuned": result.scores}, result.data.spec.metrics))
    out.print(f"[green]saved[/green] {output}")


@click.command("compress-task", epilog="\b\nExample:\n  kroncompress compress-task runs/bert-sst2 --recipe kron-task --task sst2 "
                                       "--data glue/sst2 --output runs/kron-sst2")
@click.argument("model")
@click.option("--recipe", "-r", required=True, help="Bundled recipe (kron-task, svd-task, budget-task, layerdrop-task) or a YAML path (may hold a task: section).")
@_task_options
@click.option("--output", "-o", required=True, help="Folder for the compressed model.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Cap the distillation steps.")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Score the student every N steps (the plot's points).")
@click.option("--no-distill", is_flag=True, help="Compress and score only.")
@click.option("--calibration-tokens", type=click.IntRange(min=1), default=None, help="Task tokens for data-aware init (default: the recipe's).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it already exists.")
@_user_errors
def compress_task(model: str, recipe: str, task, data, text_column, text_pair_column, label_column, labels, metrics, regression,
                  max_length, max_examples, max_eval_examples, tokenizer, output: Path, max_steps, eval_every,
                  no_distill: bool, calibration_tokens, overwrite: bool) -> None:
    """Compress MODEL (fine-tuned on the task) with RECIPE, distil it on the task, score it, save it.

    Scores of the teacher, the compressed and the distilled model go to OUTPUT/report.json, with
    score.png (the score over the distillation steps). The task defaults to RECIPE's `task:`
    section, else to the task.json that `kroncompress finetune` saved next to MODEL. --max-eval-examples
    scores every stage on the same seeded sample of each evaluation split (report.json records it).
    """
    from kroncompress.cli import render
    from kroncompress.tasks import run_task_pipeline

    found = _spec(task, text_column, text_pair_column, label_column, labels, metrics, regression, max_length)
    spec, task_data = found if found is not None else (None, None)
    loaded_tokenizer = _check_tokenizer(tokenizer)
    with _claimed(output, overwrite, [model, recipe, data, *_local(tokenizer)]) as output:
        report = run_task_pipeline(model, recipe, output, task=spec, data=data if data is not None else task_data,
                                   max_steps=max_steps, distill=not no_distill, calibration_tokens=calibration_tokens,
                                   eval_every=eval_every, overwrite=overwrite, max_examples=max_examples,
                                   max_eval_examples=max_eval_examples, tokenizer=loaded_tokenizer)
    out = render.console()
    before, after = report["params_before"], report["params_after"]
    out.print(_scores_table(f"{report['task']['name']} with {report['recipe']}: {before:,} -> {after:,} parameters",
                            report["scores"], report["task"]["metrics"]))
    out.print(f"[green]saved[/green] {output}" + (f"  (plot: {report['plot']})" if report.get("plot") else ""))


def _claimed(output: str, overwrite: bool, sources: list):
    """The output folder checked (path, contents, writable) and locked for the run, as `compress` does."""
    from kroncompress.outputs import claim_output

    return claim_output(output, overwrite=overwrite, sources=[s for s in sources if s], style="cli")


COMMANDS = (finetune, compress_task)


def register(group: click.Group) -> click.Group:
    """Add the task commands to `group` (the main `kroncompress` group); adding them twice is harmless."""
    for command in COMMANDS:
        if command.name not in group.commands:
            group.add_command(command)
    return group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def tasks_cli() -> None:
    """Downstream-task commands of kroncompress (also available as `kroncompress finetune / compress-task`)."""


register(tasks_cli)


def main(argv: list[str] | None = None) -> None:
    """`python -m kroncompress.cli.tasks ...`."""
    from kroncompress.cli.main import listen_to_ctrl_c

    listen_to_ctrl_c()
    tasks_cli.main(args=argv, prog_name="kroncompress")


if __name__ == "__main__":
    main()
