"""Downstream-task benchmark: a real encoder (all-MiniLM-L6-v2) and the demo GPT-2 as a decoder, fine-tuned
on real labelled text, then compressed to one parameter budget and distilled for one step budget.

Needs the cache of `scripts/fetch_real_data.py` (MiniLM, SpamAssassin, Shakespeare genres); runs offline.

    python scripts/fetch_real_data.py
    python benchmarks/bench_tasks.py --output benchmarks/results/tasks.md \\
        [--train-examples 800] [--eval-examples 300] [--max-length 64] [--finetune-steps N] [--distill-steps 100] [--seeds 0 1]

Every finished teacher and student run is cached in `<output>.cells.jsonl` (models under `--work`), so an
interrupted run resumes where it stopped; `--finetune-steps/--finetune-lr/--distill-lr` default per model.

Cells (model x task): MiniLM on spam (ham / spam, F1 + accuracy), MiniLM on genres (comedy / history /
tragedy, accuracy) and shakespeare-gpt2 on genres. Each cell fine-tunes the teacher once (seed 0), then
for every seed runs `kroncompress.tasks.run_task_pipeline` with four recipes at the same budget (the
transformer blocks' matrices halved):

- `kron-task`: Kronecker factors with data-aware init (calibrated on the task's text) + ILKD;
- `svd-task`: whitened truncated SVD at ratio 2 + ILKD;
- `budget-task`: the same budget for the same matrices together, each one's rank (or dense) allocated from its
  whitened-SVD error curve weighted by the task loss's measured sensitivity (kroncompress.budget) + ILKD;
- `layerdrop-task`: every other block kept + KD (soft labels, gold labels, hidden states of kept blocks).

The report gives each score (mean and min-max over seeds), the share of the teacher's score, parameters
(whole model and the transformer blocks), wall times, and the verdict on the paper's claim that the
Kronecker student keeps >= 99% of the teacher's score and beats layer dropping.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

RECIPES = ("kron-task", "svd-task", "budget-task", "layerdrop-task")
LABELS = {"kron-task": "Kronecker, data-aware init + ILKD", "svd-task": "whitened SVD + ILKD",
          "budget-task": "whitened SVD, global budget by task sensitivity + ILKD",
          "layerdrop-task": "layer dropping (every other block) + KD"}
CELLS = (("minilm", "spam"), ("minilm", "genres"), ("shakespeare-gpt2", "genres"))
TASKS = {
    "spam": {"name": "spam", "text": "text", "label": "label", "labels": ["ham", "spam"], "metrics": ["f1", "accuracy"]},
    "genres": {"name": "genres", "text": "text", "label": "label", "labels": ["comedy", "history", "tragedy"],
               "metrics": ["accuracy"]},
}


def default_cache() -> Path:
    return Path(os.environ.get("KRONCOMPRESS_CACHE") or Path.home() / ".cache" / "kroncompress") / "real"


def _subset(rows: list[dict], count: int | None, seed: int = 0) -> list[dict]:
    """`count` rows spread evenly over the file (the files are grouped by label), deterministic."""
    if count is None or count >= len(rows):
        return rows
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(rows), generator=generator)[:count].sort().values.tolist()
    return [rows[i] for i in keep]


def load_rows(cache: Path, task: str, train_examples: int | None, eval_examples: int | None) -> dict[str, list[dict]]:
    folder = cache / task
    if not (folder / "validation.jsonl").is_file():
        raise SystemExit(f"{folder} is missing: run `python scripts/fetch_real_data.py` first")
    read = lambda name: [json.loads(line) for line in (folder / f"{name}.jsonl").open(encoding="utf-8") if line.strip()]  # noqa: E731
    return {"train": _subset(read("train"), train_examples), "validation": _subset(read("validation"), eval_examples)}


def block_params(model) -> int:
    """Parameters of the transformer blocks (the ModuleList the `layers` role names)."""
    from kroncompress.aliases import aliases_for

    for pattern in aliases_for(model).get("layers", []):
        try:
            return sum(p.numel() for p in model.get_submodule(pattern).parameters())
        except AttributeError:
            continue
    return 0


# Per-model defaults (a flag given on the command line wins): the pretrained encoder takes the usual BERT-style
# fine-tuning rate; the 2.2M demo decoder is small enough to need a larger one and more steps to learn the task.
MODEL_DEFAULTS = {
    "minilm": {"finetune_lr": 1e-4, "distill_lr": 1e-4, "finetune_steps": 150},
    "shakespeare-gpt2": {"finetune_lr": 1e-3, "distill_lr": 5e-4, "finetune_steps": 400},
}
SCALE_FIELDS = ("train_examples", "eval_examples", "max_length", "finetune_steps", "finetune_lr", "distill_steps",
                "distill_lr", "batch_size", "calibration_tokens")


def settings_for(args, model_name: str) -> dict[str, Any]:
    """The run's scale for this model: the command line's value where given, else the model's default."""
    defaults = MODEL_DEFAULTS.get(model_name, MODEL_DEFAULTS["minilm"])
    return {field: getattr(args, field) if getattr(args, field) is not None else defaults[field] for field in SCALE_FIELDS}


class RunCache:
    """Finished teachers and student runs, one JSON line each, keyed by everything that changes the result; an
    interrupted benchmark resumes from the last finished run."""

    def __init__(self, path: Path):
        self.path, self.entries = path, {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["value"]

    @staticmethod
    def key(**fields) -> str:
        return json.dumps(fields, sort_keys=True)

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "value": value}, default=str) + "\n")


def _teacher(model_name: str, task: str, spec, data, scale, args, work: Path, cache: RunCache) -> dict[str, Any]:
    from kroncompress import tasks

    key = cache.key(model=model_name, task=task, what="teacher", **scale)
    folder = work / f"{model_name}-{task}-teacher"
    cached = cache.get(key)
    if cached and (folder / "finetune.json").is_file():
        return cached
    source = str(args.cache / "minilm") if model_name == "minilm" else model_name
    start = time.perf_counter()
    teacher = tasks.finetune(source, spec, data, folder, lr=scale["finetune_lr"], max_steps=scale["finetune_steps"],
                             batch_size=scale["batch_size"], seed=0, overwrite=True,
                             eval_every=max(1, scale["finetune_steps"] // 4))
    value = {"teacher": teacher.scores, "finetune_seconds": round(time.perf_counter() - start, 1),
             "examples": {k: len(v) for k, v in data.splits.items()},
             "params": sum(p.numel() for p in teacher.model.parameters()), "block_params": block_params(teacher.model)}
    cache.put(key, value)
    return value


def run_cell(model_name: str, task: str, args, work: Path, log, cache: RunCache) -> dict[str, Any]:
    from kroncompress import tasks
    from kroncompress.recipe import load_recipe

    scale = settings_for(args, model_name)
    spec = dict(TASKS[task], max_length=scale["max_length"])
    data = tasks.load_task(spec, load_rows(args.cache, task, scale["train_examples"], scale["eval_examples"]))
    cell = {"model": model_name, "task": task, "scale": scale,
            **_teacher(model_name, task, spec, data, scale, args, work, cache), "runs": []}
    log(f"{model_name}/{task}: teacher {cell['teacher']['score']:.4f} ({cell['finetune_seconds']} s)")
    for recipe_name in args.recipes:
        for seed in args.seeds:
            key = cache.key(model=model_name, task=task, what=recipe_name, seed=seed, **scale)
            run = cache.get(key)
            if run is None:
                _teacher(model_name, task, spec, data, scale, args, work, cache)  # its folder may be gone
                recipe = load_recipe(recipe_name).to_dict()
                recipe["distill"]["train"].update(lr=scale["distill_lr"], batch_size=scale["batch_size"], seed=seed,
                                                  max_steps=scale["distill_steps"])
                if "calibration" in recipe:
                    recipe["calibration"]["tokens"] = scale["calibration_tokens"]
                out = work / f"{model_name}-{task}-{recipe_name}-{seed}"
                start = time.perf_counter()
                report = tasks.run_task_pipeline(work / f"{model_name}-{task}-teacher", recipe, out, task=spec, data=data,
                                                 overwrite=True, eval_every=max(1, scale["distill_steps"] // 4))
                student = __import__("kroncompress").load_compressed(out)
                run = {"recipe": recipe_name, "seed": seed, "scores": report["scores"], "params": report["params_after"],
                       "block_params": block_params(student), "seconds": round(time.perf_counter() - start, 1),
                       "timings": report["timings"], "history": report["distill"]["history"],
                       "load_average": round(os.getloadavg()[0], 1)}
                cache.put(key, run)
            cell["runs"].append(run)
            log(f"  {recipe_name} seed {seed}: compressed {run['scores']['compressed']['score']:.4f} -> distilled "
                f"{run['scores']['distilled']['score']:.4f} ({run['seconds']} s)")
    return cell


def _range(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} [{100 * min(values):.2f}, {100 * max(values):.2f}]"


def _run_minutes(cells: list[dict]) -> float:
    """Wall time of the measured runs (cached ones included), not of this invocation."""
    return sum(c["finetune_seconds"] + sum(r["seconds"] for r in c["runs"]) for c in cells) / 60


def _resolution_line(cell: dict) -> str:
    """How far apart two scores must be to mean anything: one example, and the teacher's binomial standard error."""
    count, score = cell["examples"]["validation"], cell["teacher"]["score"]
    error = (score * (1 - score) / count) ** 0.5
    return (f"Resolution: {count} validation examples, so one example moves accuracy by {100 / count:.2f} points, and "
            f"the binomial standard error at the teacher's score is {100 * error:.1f} points; differences below about "
            f"{200 * error:.0f} points are not evidence. The compressed score is the same for every seed (compression "
            "is deterministic); the seed changes the distillation.")


def _scale_line(scale: dict[str, Any]) -> str:
    return (f"Scale: inputs truncated to {scale['max_length']} tokens; teacher fine-tuned {scale['finetune_steps']} steps "
            f"(lr {scale['finetune_lr']}); each student distilled {scale['distill_steps']} steps (lr {scale['distill_lr']}), "
            f"batch {scale['batch_size']}; data-aware init from {scale['calibration_tokens']} task tokens.")


def render(cells: list[dict], args, seconds: float) -> str:
    lines = ["# Downstream tasks: Kronecker vs whitened SVD vs layer dropping at one budget", "",
             f"Generated by `python benchmarks/bench_tasks.py {' '.join(sys.argv[1:])}`; the runs took {_run_minutes(cells):.1f} min "
             f"on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s).", "",
             f"Seeds {', '.join(map(str, args.seeds))}; each cell states its scale (examples, input length, steps, "
             "learning rates). Scores are x100: the task's metric (spam: mean of F1 and accuracy; genres: accuracy) on "
             "the validation split; brackets give the min-max over seeds. Wall times are per run on this machine "
             "(compress + calibrate + distill + the three evaluations), with the load average after each run.", ""]
    verdicts, budget_verdicts = [], []
    for cell in cells:
        teacher = cell["teacher"]["score"]
        lines += [f"## {cell['model']} on {cell['task']}", "",
                  f"Teacher: score **{100 * teacher:.2f}** ({', '.join(f'{k} {100 * v:.2f}' for k, v in cell['teacher']['validation'].items() if k != 'score')}), "
                  f"{cell['params']:,} parameters ({cell['block_params']:,} in the transformer blocks), fine-tuned in "
                  f"{cell['finetune_seconds']} s; {cell['examples']['train']} train / {cell['examples']['validation']} validation examples.", "",
                  _scale_line(cell["scale"]), "", _resolution_line(cell), "",
                  "| student | params (blocks) | compressed | distilled | % of teacher | wall s per run |",
                  "|---|---|---:|---:|---:|---:|"]
        means = {}
        for recipe in RECIPES:
            runs = [r for r in cell["runs"] if r["recipe"] == recipe]
            if not runs:
                continue
            compressed = [r["scores"]["compressed"]["score"] for r in runs]
            distilled = [r["scores"]["distilled"]["score"] for r in runs]
            means[recipe] = statistics.fmean(distilled)
            lines.append(f"| {LABELS[recipe]} | {runs[0]['params']:,} ({runs[0]['block_params']:,}) | {_range(compressed)} | "
                         f"{_range(distilled)} | {100 * means[recipe] / teacher:.1f}% | {statistics.fmean(r['seconds'] for r in runs):.0f} "
                         f"(load {'/'.join(str(r.get('load_average', '?')) for r in runs)}) |")
        if "kron-task" in means:
            keeps = means["kron-task"] >= 0.99 * teacher
            beats = means["kron-task"] > means.get("layerdrop-task", float("inf"))
            verdicts.append(f"- {cell['model']} on {cell['task']}: Kronecker keeps {100 * means['kron-task'] / teacher:.1f}% of the "
                            f"teacher ({'>=' if keeps else '<'} 99%) and {'beats' if beats else 'does not beat'} layer dropping "
                            f"({100 * means['kron-task']:.2f} vs {100 * means.get('layerdrop-task', float('nan')):.2f}).")
        if "budget-task" in means:
            best = means["budget-task"]
            budget_verdicts.append(
                f"- {cell['model']} on {cell['task']}: the global budget scores {100 * best:.2f} "
                f"({100 * best / teacher:.1f}% of the teacher's {100 * teacher:.2f}; uniform whitened SVD "
                f"{100 * means.get('svd-task', float('nan')):.2f}) and {'beats' if best > means.get('layerdrop-task', float('inf')) else 'does not beat'} "
                f"layer dropping ({100 * means.get('layerdrop-task', float('nan')):.2f}).")
        lines.append("")
    lines += ["## Verdict on the paper's claim", "",
              "The claim: the Kronecker student keeps >= 99% of the teacher's score and beats layer dropping.", "", *verdicts, ""]
    if budget_verdicts:
        lines += ["## The global budget (issue 24)", "",
                  "Does the best low-rank recipe (whitened SVD, ranks allocated globally) beat layer dropping and "
                  "match the teacher? Read against the resolution line of each cell.", "", *budget_verdicts, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/tasks.md"))
    parser.add_argument("--cells", nargs="+", default=[f"{m}/{t}" for m, t in CELLS], help="MODEL/TASK pairs to run.")
    parser.add_argument("--train-examples", type=int, default=800)
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--finetune-steps", type=int, default=None, help="Default: per model (MODEL_DEFAULTS).")
    parser.add_argument("--finetune-lr", type=float, default=None, help="Default: per model (MODEL_DEFAULTS).")
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--distill-lr", type=float, default=None, help="Default: per model (MODEL_DEFAULTS).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="Which students to run (default: all four).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_tasks"),
                        help="Folder for the teachers and students (kept, so an interrupted run resumes).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    cells, cache = [], RunCache(args.output.with_suffix(".cells.jsonl"))
    for entry in args.cells:
        model_name, task = entry.split("/")
        cells.append(run_cell(model_name, task, args, args.work, log, cache))
        write(cells, args, time.perf_counter() - start)
    log(f"wrote {args.output} and {args.output.with_suffix('.json')}")
    return 0


def write(cells: list[dict], args, seconds: float) -> None:
    """The markdown report and the raw cells (JSON), each through a temporary file renamed into place."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((args.output, render(cells, args, seconds)),
                       (args.output.with_suffix(".json"), json.dumps(cells, indent=2, default=str) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
