"""Distillation-budget curve: perplexity against distillation tokens, one line per recipe, on the demo teacher.

Issue 15 asks whether the quality benchmark's ranking (measured after one budget, 40 steps) holds at larger
budgets. Each (recipe, seed) is ONE distillation run with a schedule that does not depend on its length
(linear warmup, then a constant learning rate: the stable phase of a warmup-stable-decay schedule, no decay),
evaluated at the checkpoints `--steps` (e.g. 40, 160, 640): a run's prefix is the curve, and extending it
resumes from its last checkpoint. Every evaluation scores the same held-out text as bench_quality (the
pipeline's own scorer: since the one-protocol change the test plays, before it the validation plays; block 256, stride 128).

    python benchmarks/bench_budget.py --steps 40 160 640 --seeds 0 1 [--until 160] [--only REGEX] [--report-only]

Every run is recorded (checkpoints under `--runs`) with the step budget `--horizon`, and stopped at each
checkpoint by a callback, so a later call continues it; `--until N` stops every run at its last checkpoint
<= N (run a first segment of every recipe, then extend them). Each evaluated point is appended to
`<output stem>.cells.jsonl`, so a rerun skips what is done. The report (`--output`, + .png) is rewritten from
that cache after every call.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import kroncompress as kc

from common import Cell, cached_rows, cell_recipe, num_layers_of, save_figure, source_fingerprint, write_atomic

# Same optimiser as bench_quality, fewer tokens per step (no accumulation), a schedule that ignores the total.
TRAIN = {"lr": 2.5e-4, "warmup_ratio": 0.0, "schedule": "constant", "batch_size": 8, "grad_accum": 1,
         "max_grad_norm": 1.0, "weight_decay": 0.01, "bf16": False}
WARMUP_STEPS = 20  # linear warmup, then constant (HF constant_with_warmup); the same for every run length
HORIZON = 2560  # the step budget every run is recorded with (resumes must match it); nothing depends on it
# The recipes of issue 15, section 4 (each with its best init on the demo), plus whitened SVD at the MLP-only
# layout (the kn-gpt2-mlp budget), which the quality benchmark found best zero-shot.
RUNS = (Cell("kn-gpt2", "recipe", "data-aware", 0), Cell("kn-gpt2-mlp", "recipe", "data-aware", 0),
        Cell("svd-gpt2", "mlp only", "data-aware", 0), Cell("distilgpt2", "keep 4", "-", 0),
        Cell("svd-gpt2", "recipe", "data-aware", 0))
LABELS = {"kn-gpt2|recipe": "kn-gpt2 (kronecker, embedding + odd blocks)",
          "kn-gpt2-mlp|recipe": "kn-gpt2-mlp (kronecker, every MLP)",
          "svd-gpt2|recipe": "svd-gpt2 (whitened SVD, embedding + odd blocks)",
          "svd-gpt2|mlp only": "whitened SVD, every MLP",
          "distilgpt2|keep 4": "layer drop (DistilGPT2, 4 of 6 blocks)"}


def label(row_or_cell) -> str:
    recipe, layout = (row_or_cell["recipe"], row_or_cell["layout"]) if isinstance(row_or_cell, dict) else (
        row_or_cell.recipe, row_or_cell.layout)
    return LABELS.get(f"{recipe}|{layout}", f"{recipe} ({layout})")


def budget_recipe(cell: Cell, num_layers: int) -> dict[str, Any]:
    """bench_quality's recipe for the cell, with this benchmark's training settings."""
    recipe = cell_recipe(cell, num_layers)
    recipe["distill"]["train"] = {**TRAIN, "seed": cell.seed, "save_every": HORIZON,
                                  "training_args": {"warmup_steps": WARMUP_STEPS}}
    return recipe


def stop_at(step: int):
    """A TrainerCallback that saves a checkpoint and stops at `step` (the run stays recorded with its horizon)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopAt()


def point_key(cell: Cell, step: int) -> str:
    return f"{cell.key}|{step}"


def _record(cache: Path, row: dict[str, Any]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{row['key']}: perplexity {row['perplexity']:.2f} ({row['seconds']:.0f} s)", flush=True)


def advance(cell: Cell, targets: list[int], args: argparse.Namespace, cache: Path, num_layers: int) -> None:
    """Bring one run to each step in `targets` not cached yet: compress once (step 0), then distil segment by
    segment, resuming from the last checkpoint, and score after each."""
    torch.set_num_threads(args.threads)
    from kroncompress.distill.trainer import distill
    from kroncompress.evaluate import max_positions
    from kroncompress.pipeline.evaluate import Scorer
    from kroncompress.pipeline.text import RunText, distill_config

    done = cached_rows(cache)
    todo = [s for s in targets if point_key(cell, s) not in done]
    if not todo:
        return
    recipe = kc.load_recipe(budget_recipe(cell, num_layers))
    folder = Path(args.runs) / re.sub(r"[^A-Za-z0-9]+", "-", cell.key).strip("-")
    student_dir = folder / "student-0"
    common = {"recipe": cell.recipe, "layout": cell.layout, "init": cell.init, "seed": cell.seed, "run": cell.key,
              "line": label(cell), "source": source_fingerprint(), "threads": args.threads, "jobs": args.jobs}
    data_aware = cell.init == "data-aware"
    compressed_at = 0.0  # seconds to compress (0: compressed by an earlier call)
    if point_key(cell, 0) not in done or not (student_dir / "config.json").is_file():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kc.run_pipeline(args.model, recipe, student_dir, data=args.data, distill=False, overwrite=True,
                                     measure_speed=False, progress=False,
                                     calibration_data=args.data if data_aware else None,
                                     calibration_tokens=args.calibration_tokens if data_aware else None)
        compressed_at = round(time.perf_counter() - start, 1)
    teacher, info = kc.load_model(args.model)
    tokenizer = info.tokenizer
    config = distill_config(recipe, args.data, HORIZON)
    limit = max_positions(teacher)
    data = RunText(config, args.data, tokenizer, None, limit)
    score = Scorer(recipe, args.data, data, tokenizer, None, limit)
    train, _ = data.blocks()
    student = kc.load_compressed(student_dir)
    params = sum(p.numel() for p in student.parameters())
    if point_key(cell, 0) not in done:
        # zero-shot and teacher under the same scorer as every later point (run_pipeline with distill=False
        # scores another sample of the held-out text)
        zero, ref = score(student, "compressed"), score(teacher, "teacher")
        _record(cache, {**common, "key": point_key(cell, 0), "step": 0, "tokens": 0, "perplexity": zero["perplexity"],
                        "teacher": ref["perplexity"], "params": params, "teacher_params": sum(p.numel() for p in teacher.parameters()),
                        "protocol": {k: zero[k] for k in ("block_size", "stride", "tokens")},
                        "seconds": compressed_at})
    todo = [s for s in todo if s > 0]
    for step in todo:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = distill(student, teacher, config, train, None, output_dir=folder / "checkpoints",
                             resume=True, progress=False, callbacks=[stop_at(step)],
                             run_settings={"recipe": cell.key})
        if result.steps != step:
            raise RuntimeError(f"{cell.key}: the run stopped at step {result.steps}, not {step}")
        scored = score(student, "distilled")
        per_step = TRAIN["batch_size"] * int(train.shape[1])
        _record(cache, {**common, "key": point_key(cell, step), "step": step, "tokens": step * per_step,
                        "tokens_per_step": per_step,
                        "perplexity": scored["perplexity"], "params": params,
                        "protocol": {k: scored[k] for k in ("block_size", "stride", "tokens")},
                        "train_blocks": int(train.shape[0]), "seconds": round(time.perf_counter() - start, 1)})


# -- report --------------------------------------------------------------------------------------

def curves(rows: list[dict]) -> dict[str, dict[int, list[float]]]:
    """line -> step -> perplexities over seeds."""
    out: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        out.setdefault(row["line"], {}).setdefault(row["step"], []).append(row["perplexity"])
    return out


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ({min(values):.2f}-{max(values):.2f}, {len(values)} seeds)"


def crossings(lines: dict[str, dict[int, list[float]]]) -> list[str]:
    """Every pair of lines whose order changes between two steps both measured (by the seed means), with
    whether the seed ranges separate the lines on each side; and the pairs that never change order."""
    names = sorted(lines)
    text = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            steps = sorted(s for s in set(lines[a]) & set(lines[b]) if s > 0)
            if len(steps) < 2:
                continue
            diff = {s: statistics.fmean(lines[a][s]) - statistics.fmean(lines[b][s]) for s in steps}
            flips = [(s0, s1) for s0, s1 in zip(steps, steps[1:]) if (diff[s0] > 0) != (diff[s1] > 0)]
            if not flips:
                lower = a if diff[steps[-1]] < 0 else b
                continue_note = f"{lower} lower at every measured step ({steps[0]}-{steps[-1]})"
                overlap = [str(s) for s in steps if not _separated(lines[a][s], lines[b][s])]
                gaps = ", ".join(f"{abs(diff[s]):.2f}" for s in steps)
                text.append(f"- {a} vs {b}: no crossing; {continue_note}; gap {gaps}"
                            + (f"; the seed ranges overlap at step {', '.join(overlap)}" if overlap else "") + ".")
                continue
            for s0, s1 in flips:
                sep = [s for s in (s0, s1) if _separated(lines[a][s], lines[b][s])]
                before = a if diff[s0] < 0 else b
                after = a if diff[s1] < 0 else b
                clear = ("the seed ranges separate the lines at both ends" if len(sep) == 2 else
                         f"the seed ranges overlap at step {', '.join(str(s) for s in (s0, s1) if s not in sep)}")
                text.append(f"- {a} vs {b}: **cross between steps {s0} and {s1}** ({before} lower before, {after} after; {clear}).")
    return text


def _separated(x: list[float], y: list[float]) -> bool:
    return max(x) < min(y) or max(y) < min(x)


def plot(path: Path, rows: list[dict], teacher: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 5.2))
    per_step = next(r["tokens_per_step"] for r in rows if r["step"] > 0)
    for i, (line, points) in enumerate(sorted(curves(rows).items())):
        steps = sorted(s for s in points if s > 0)
        x = [s * per_step for s in steps]
        mean = [statistics.fmean(points[s]) for s in steps]
        axis.plot(x, mean, marker="o", color=f"C{i}", label=line)
        axis.fill_between(x, [min(points[s]) for s in steps], [max(points[s]) for s in steps], color=f"C{i}", alpha=0.2)
        if any(len(points[s]) > 1 for s in steps):
            axis.errorbar(x, mean, yerr=[[m - min(points[s]) for m, s in zip(mean, steps)],
                                         [max(points[s]) - m for m, s in zip(mean, steps)]],
                          fmt="none", color=f"C{i}", capsize=3)
    axis.axhline(teacher, color="black", linewidth=0.8, linestyle=":", label=f"teacher ({teacher:.1f})")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(f"distillation tokens ({per_step:,} per step)")
    axis.set_ylabel("perplexity (held-out plays)")
    axis.set_title("perplexity vs distillation budget (band / bars: range over seeds)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _threads(rows: list[dict]) -> str:
    kinds = sorted({(r.get("threads"), r.get("jobs")) for r in rows if r["step"] > 0}, key=str)
    return "runs with " + "; ".join(f"{t} torch thread(s) each, {j} side by side" for t, j in kinds)


def report(rows: list[dict], args: argparse.Namespace) -> str:
    later = next((r for r in rows if r["step"] > 0), None)
    protocol = later["protocol"] if later else next(r["protocol"] for r in rows if r["step"] == 0)
    zero = {r["run"]: r for r in rows if r["step"] == 0}
    same = [r for r in zero.values() if r["protocol"] == protocol]
    first = (same or list(zero.values()))[0]
    teacher = first["teacher"]
    lines_ = curves(rows)
    steps = sorted({r["step"] for r in rows if r["step"] > 0})
    per_step = next((r["tokens_per_step"] for r in rows if r["step"] > 0), 0)
    sources = sorted({r["source"] for r in rows})
    out = [
        "# Distillation budget: perplexity against distillation tokens on the demo teacher", "",
        f"Generated by `python benchmarks/bench_budget.py {' '.join(args.argv)}` (the points come from "
        f"`{Path(args.output).stem}.cells.jsonl`, filled by calls of the same script under the heavy-job lock) on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{_threads(rows)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{sum(r['seconds'] for r in rows) / 60:.0f} minutes of runs, sources {', '.join(sources)}.", "",
        "## Protocol", "",
        f"- Teacher `{args.model}`, {first['teacher_params']:,} parameters, perplexity {teacher:.2f}"
        + ("" if same else f" (on {first['protocol']['tokens']:,} other held-out tokens, like the zero-shot column)")
        + "; every distilled point "
        f"scored on the held-out text of `{args.data}` exactly as bench_quality does (block {protocol['block_size']}, "
        f"stride {protocol['stride']}, {protocol['tokens']:,} tokens).",
        f"- One run per (recipe, seed), evaluated at steps {', '.join(map(str, steps))}: {TRAIN['batch_size']} sequences x "
        f"{per_step // TRAIN['batch_size']} tokens = {per_step:,} tokens per step, no accumulation; AdamW lr {TRAIN['lr']}, linear warmup over "
        f"{WARMUP_STEPS} steps then constant (no decay phase: a final decay would lower every point), clip "
        f"{TRAIN['max_grad_norm']}, weight decay {TRAIN['weight_decay']}. A later point continues the same run from "
        "its checkpoint (optimizer, scheduler and RNG state), so each line is one run's trajectory.",
        "- Students and losses as in bench_quality: data-aware init (activation-aware ALS / whitened SVD, "
        f"{args.calibration_tokens:,} calibration tokens), ILKD for the factorised students, DistilGPT2's losses for "
        "layer dropping.",
        f"- For scale: bench_quality's 40-step budget is {40 * 32 * 256:,} tokens (= step 160 here, with a "
        "cosine schedule instead of a constant rate).", "",
        f"![perplexity vs distillation tokens]({Path(args.output).with_suffix('.png').name})", "",
        "| recipe | parameters | zero-shot | " + " | ".join(f"step {s} ({s * per_step:,} tokens)" for s in steps) + " |",
        "|---|---|---|" + "---|" * len(steps),
    ]
    for line in sorted(lines_, key=lambda name: statistics.fmean(lines_[name][max(lines_[name])])):
        row = next(r for r in rows if r["line"] == line and r["step"] == 0)
        cells = [(_fmt(lines_[line][s]) if s in lines_[line] else "") for s in steps]
        zero_shot = (f"{row['perplexity']:.2f}" if row["protocol"] == protocol else
                     f"({row['perplexity']:.2f} on {row['protocol']['tokens']:,} other tokens)")
        out.append(f"| {line} | {row['params']:,} | {zero_shot} | " + " | ".join(cells) + " |")
    out += ["", "Cells: mean over seeds (range, seeds); a blank cell was not measured.", "", "## Do the lines cross?", ""]
    out += crossings(lines_) or ["No pair of lines has two measured steps in common."]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/budget.md")
    parser.add_argument("--runs", default="runs/bench_budget", help="checkpoints of every run (resumable)")
    parser.add_argument("--model", default="shakespeare-gpt2")
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 160, 320, 640], help="evaluated checkpoints")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--until", type=int, default=None, help="stop every run at its last checkpoint <= this step")
    parser.add_argument("--only", default=None, help="regex: only the runs whose key (recipe|layout|init|seed) matches")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (e.g. --jobs 2 --threads 1)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: rewrite the report from the cache")
    args = parser.parse_args(argv)
    if max(args.steps) > HORIZON:
        parser.error(f"--steps: at most {HORIZON} (the step budget the runs are recorded with)")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    cache = output.with_name(output.stem + ".cells.jsonl")
    runs = [Cell(c.recipe, c.layout, c.init, seed) for seed in args.seeds for c in RUNS]
    if args.only:
        runs = [c for c in runs if re.search(args.only, c.key)]
    targets = [0, *sorted(s for s in args.steps if args.until is None or s <= args.until)]
    if not args.report_only:
        num_layers = num_layers_of(args.model)
        if args.jobs <= 1:
            for cell in runs:
                advance(cell, targets, args, cache, num_layers)
        else:  # runs side by side, one process each (their points append whole lines to the cache)
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
                for future in [pool.submit(advance, cell, targets, args, cache, num_layers) for cell in runs]:
                    future.result()
    rows = [r for r in cached_rows(cache).values() if r["step"] in (0, *args.steps)]
    if not rows:
        raise SystemExit(f"no cached points in {cache}")
    write_atomic(output, report(rows, args))
    plot(output.with_suffix(".png"), rows, next(r["teacher"] for r in rows if r["step"] == 0))
    print(output.read_text())
    return rows


if __name__ == "__main__":
    main()
