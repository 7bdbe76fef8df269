"""The task pipeline: fine-tuned teacher -> score -> calibrate on the task's text -> compress -> score ->
distil on the task -> score -> save.

    report = run_task_pipeline("runs/bert-sst2", "kron-task", "runs/kron-sst2", task="sst2", data="glue/sst2")
    report["scores"]   # {"teacher": {...}, "compressed": {...}, "distilled": {...}}, each with "score"

A task recipe is an ordinary recipe (compress / ignore / calibration / distill) plus a `task:` section:
the TaskSpec fields (`glue: sst2`, or `text`, `text_pair`, `label`, `labels`, `kind`, `metrics`, ...)
and optionally `data:`. The section is read here, from the raw YAML; the rest is validated by
`kc.load_recipe` as usual. Arguments given to `run_task_pipeline` win over the section.

The output folder is a `save_compressed` folder (reloads with `kc.load_compressed`) whose report.json also
holds `task`, `scores`, `distill` (steps, loss terms, the score history) and `timings`, plus task.json (the
spec, labels included) and score.png (the score over the distillation steps, the teacher's as a line).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from kroncompress.models import tokenizer_name
from kroncompress.tasks.data import EVAL_SAMPLE_SEED, TaskData, cap_eval_splits, load_task, task_spec
from kroncompress.tasks.modeling import encode, evaluate_task, load_task_model
from kroncompress.tasks.training import TASK_FILE, distill_task

PLOT_NAME = "score.png"


def load_task_recipe(recipe: Any) -> tuple[Any, dict[str, Any]]:
    """(Recipe, its task section as a dict, checked) from a bundled name, a YAML path, a mapping or a Recipe."""
    from kroncompress.recipe import load_recipe

    parsed = load_recipe(recipe)
    return parsed, _section(parsed.task, parsed.source)


def _section(section: Any, source: str) -> dict[str, Any]:
    if section is None:
        return {}
    if isinstance(section, str):
        return {"glue": section}
    if not isinstance(section, Mapping):
        raise ValueError(f"{source}: task: expected a mapping of task fields (glue, text, text_pair, label, labels, kind, "
                         f"metrics, data, ...), got {type(section).__name__}")
    try:
        task_spec(dict(section))  # validate now, before any model is loaded
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return dict(section)


def run_task_pipeline(model: Any, recipe: Any, output_dir: str | os.PathLike, *, task: Any = None, data: Any = None,
                      tokenizer: Any = None, max_steps: int | None = None, distill: bool = True,
                      calibration_tokens: int | None = None, eval_every: int | None = None, overwrite: bool = False,
                      device: str | torch.device | None = None, max_examples: int | None = None,
                      max_eval_examples: int | None = None) -> dict[str, Any]:
    """Compress a fine-tuned model with `recipe`, distil it on the task and save it in `output_dir`.

    `model`: a folder of a model fine-tuned on the task (e.g. by `finetune`), or a *ForSequenceClassification
    module with `tokenizer`. `tokenizer` (an object, a folder or a hub id) replaces the folder's and is saved
    with the result; it must fit the model's embedding. `task` / `data`: as for `load_task`; the task
    defaults to the recipe's `task` section, else the task.json `finetune` saved next to the model; the data to the section's `data`. Data-aware initialisation runs when the recipe has a `calibration` section, on the
    task's own training text (`calibration_tokens` or the section's `tokens`). `max_steps` caps the
    distillation steps; `distill=False` stops after compressing. `max_examples` keeps the first examples of
    every split; `max_eval_examples` scores each evaluation split on a seeded sample of that many examples
    (`cap_eval_splits`: the same examples for the teacher, the compressed and the distilled model, and on
    every run), recorded in the report with the split sizes it was drawn from. Returns the report (also in
    report.json).
    """
    from kroncompress.distill.guards import check_finite_weights
    from kroncompress.io import save_compressed
    from kroncompress.outputs import check_output_path, check_output_state
    from kroncompress.surgery import compress, plan

    parsed, section = load_task_recipe(recipe)
    spec_values = dict(section)
    section_data = spec_values.pop("data", None)
    if task is not None:
        spec = task_spec(task)
    elif spec_values:
        spec = task_spec(spec_values)
    elif not isinstance(model, torch.nn.Module) and (Path(os.fspath(model)) / TASK_FILE).is_file():
        spec = read_task_file(Path(os.fspath(model)) / TASK_FILE)
    else:
        raise ValueError("name the task: pass task= (a GLUE name or task fields), give the recipe a task: section, "
                         f"or fine-tune the teacher with kc.tasks.finetune (it saves {TASK_FILE} next to the model)")
    target = check_output_path(output_dir)
    check_output_state(target, overwrite=overwrite)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    task_data = load_task(spec, data if data is not None else section_data, max_examples=max_examples)
    available = {name: len(split) for name, split in task_data.eval_splits().items()}
    task_data = cap_eval_splits(task_data, max_eval_examples)
    teacher, tokenizer = load_task_model(model, task_data, tokenizer=tokenizer, require_head=True)
    check_finite_weights(teacher, "teacher")  # before scoring and compressing: no recipe option can repair it
    if device is not None:
        teacher.to(device)
    lap("load")
    planned = plan(teacher, parsed)  # a recipe error that needs the model surfaces here, before any scoring
    lap("plan")
    scores: dict[str, Any] = {"teacher": evaluate_task(teacher, tokenizer, task_data)}
    lap("evaluate_teacher")
    student = copy.deepcopy(teacher)
    stats = None
    if parsed.calibration is not None:
        stats = calibrate_on_task(student, planned, tokenizer, task_data, tokens=calibration_tokens,
                                  section=parsed.calibration)
        lap("calibrate")
    compression = compress(student, planned, calibration=stats)
    del stats
    lap("compress")
    scores["compressed"] = evaluate_task(student, tokenizer, task_data)
    lap("evaluate_compressed")
    summary = None
    if distill:
        summary = distill_task(student, teacher, tokenizer, task_data, parsed.distill, max_steps=max_steps,
                               eval_every=eval_every, scratch_near=target)
        lap("distill")
        scores["distilled"] = evaluate_task(student, tokenizer, task_data)
        lap("evaluate_distilled")
    report = {
        "model": os.fspath(model) if not isinstance(model, torch.nn.Module) else type(model).__name__,
        "recipe": parsed.name, "task": task_data.spec.to_dict(), "data": task_data.source,
        "examples": {name: len(split) for name, split in task_data.splits.items()},
        "max_eval_examples": max_eval_examples, "eval_examples_available": available,
        "eval_sample": None if max_eval_examples is None else f"seeded random sample (seed {EVAL_SAMPLE_SEED}) of each "
                                                               "evaluation split, in the split's order",
        "tokenizer": tokenizer_name(tokenizer),
        "params_before": compression.params_before, "params_after": compression.params_after,
        "scores": scores, "distill": summary, "timings": timings,
    }
    metrics = {f"{task_data.spec.name} score {stage}": round(value["score"], 4) for stage, value in scores.items()}
    metrics["task metrics"] = ", ".join(task_data.spec.metrics) + f" on {', '.join(task_data.spec.eval_splits)}"

    def finish(folder: Path) -> None:  # into the temporary folder: part of the atomic save
        (folder / TASK_FILE).write_text(json.dumps(task_data.spec.to_dict(), indent=2) + "\n", encoding="utf-8")
        report["plot"] = plot_scores(folder / PLOT_NAME, summary, scores, task_data.spec.name)
        path = folder / "report.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved.update({k: v for k, v in report.items() if k not in ("params_before", "params_after")})
        path.write_text(json.dumps(saved, indent=2, default=str) + "\n", encoding="utf-8")

    save_compressed(student, target, recipe=parsed, report=compression, metrics=metrics, tokenizer=tokenizer,
                    overwrite=True, extra=finish)
    report["compression"] = compression.to_dict()
    return report


def read_task_file(path: Path):
    """The TaskSpec a task.json holds (`finetune` writes one next to the model); a ValueError naming the file."""
    try:
        return task_spec(json.loads(path.read_text(encoding="utf-8")))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); it should be the task.json `finetune` "
                         "wrote: fine-tune again, or pass the task (--task / task=)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); it should be the "
                         "task.json `finetune` wrote: fix it, fine-tune again, or pass the task (--task / task=)") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def calibrate_on_task(model: torch.nn.Module, recipe: Any, tokenizer: Any, data: TaskData, *,
                      tokens: int | None = None, section: Any = None):
    """Input statistics of the data-aware targets of `recipe` (a recipe, or its CompressionPlan from
    `kc.plan`, then with the recipe's calibration `section`) from the task's own training examples (each
    example one sequence, as the model will see it), up to `tokens` tokens (default: `calibration.tokens`)."""
    from kroncompress.calibration import calibration_targets, collect_statistics

    section = section if section is not None else recipe.calibration
    budget = int(tokens or section.tokens)
    encoded = encode(data.train, tokenizer, data.spec.max_length)
    blocks, total = [], 0
    for item in encoded:
        if total >= budget:
            break
        ids = torch.tensor(item["input_ids"], dtype=torch.long)
        blocks.append(ids)
        total += ids.numel()
    names = calibration_targets(model, recipe)
    if not names:
        return None
    return collect_statistics(model, blocks, names, damping=section.damping)


def plot_scores(path: Path, summary: dict | None, scores: dict[str, Any], task_name: str) -> str | None:
    """score.png: the student's score over the distillation steps, the teacher's as a dashed line."""
    history = (summary or {}).get("history") or []
    if not history:
        return None
    from kroncompress.pipeline_output import plot_history

    return plot_history(path, [p["step"] for p in history], [p["score"] for p in history], scores["teacher"]["score"],
                        label="student", ylabel="score",
                        title=f"distillation on {task_name}: score on the evaluation split")
