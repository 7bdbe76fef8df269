"""Quality benchmark: every bundled strategy at the same parameter budget, then the same distillation budget.

On the packaged demo teacher (`shakespeare-gpt2`) and its held-out Shakespeare plays, each cell is one
`kc.run_pipeline` run: decompose (weight-only or data-aware init), score zero-shot, distil for the same
number of steps with the same tokens and learning-rate schedule, score again. Cells at the kn-gpt2 budget
make the main table (kn-gpt2, kn-gpt2-mlp, svd-gpt2 plain and whitened, tucker-gpt2, tt-gpt2 and
DistilGPT2-style layer dropping); extra layouts of the same strategies add budget points, and the report
plots perplexity against parameters, one line per strategy.

    python benchmarks/bench_quality.py --output benchmarks/results/quality.md [--steps 40] [--seeds 0 1] [--jobs 2]

Finished cells are appended to `<output stem>.cells.jsonl` as they complete, so an interrupted run
resumes where it stopped; cached cells are reused only when the settings and the kroncompress sources
are unchanged (`--fresh` starts over, e.g. after editing this script); `--keep-earlier` also reuses cells made by
earlier sources, and the report marks them. `--import-report OLD.md` puts an earlier report's cells into the cache
(for when its cells.jsonl is gone). Every cell runs with one torch thread whatever
`--jobs` is, so its numbers do not depend on how many cells run side by side.
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
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import kroncompress as kc
from common import (
    CURVE_LAYOUTS, LINE_NAMES, MLP_ONLY, TRAIN, Cell, cached_rows, cell_recipe, main_keep, num_layers_of, save_figure,
    source_fingerprint, write_atomic,
)

# Main table rows: (recipe, init). Data-aware init exists for kronecker (activation-aware ALS) and svd (whitened).
MAIN = (("kn-gpt2", "weight-only"), ("kn-gpt2", "data-aware"), ("kn-gpt2-mlp", "weight-only"),
        ("kn-gpt2-mlp", "data-aware"), ("svd-gpt2", "weight-only"), ("svd-gpt2", "data-aware"),
        ("tucker-gpt2", "weight-only"), ("tt-gpt2", "weight-only"), ("distilgpt2", "-"))
# Extra budget points: the factorising recipes over fewer or more modules. "recipe" is the bundled layout (for
# kn-gpt2: the embedding + every matrix of the odd blocks, ~72% of the demo teacher); the others leave the
# embedding dense and/or take every block.
# Every strategy gets every layout and every init it has (data-aware: kronecker and svd; tucker and tt have none).
CURVE_RECIPES = (("kn-gpt2", "weight-only"), ("kn-gpt2", "data-aware"), ("svd-gpt2", "weight-only"),
                 ("svd-gpt2", "data-aware"), ("tucker-gpt2", "weight-only"), ("tt-gpt2", "weight-only"))
# Main-table cells repeated with every seed (the others run with the first seed).
REPEAT = r"^(kn-gpt2|kn-gpt2-mlp|distilgpt2)\|"


def cells(num_layers: int, seeds: list[int], curve: bool, repeat: str = REPEAT) -> list[Cell]:
    """The default grid: the main table (the cells matching `repeat` with every seed, the others with the
    first), then the extra budget points with the first seed."""
    keep_main = main_keep(num_layers)
    grid = []
    for seed in seeds:
        for recipe, init in MAIN:
            layout = f"keep {keep_main}" if recipe == "distilgpt2" else "recipe"
            cell = Cell(recipe, layout, init, seed, main=True)
            if seed == seeds[0] or re.search(repeat, cell.key):
                grid.append(cell)
    if curve:
        for recipe, init in CURVE_RECIPES:
            grid += [Cell(recipe, layout, init, seeds[0], main=layout == MLP_ONLY) for layout in CURVE_LAYOUTS
                     if not (recipe == "kn-gpt2" and layout == MLP_ONLY)]
        keeps = sorted({k for k in (num_layers - 1, num_layers - num_layers // 2, num_layers // 3) if 1 <= k < num_layers} - {keep_main})
        grid += [Cell("distilgpt2", f"keep {k}", "-", seeds[0]) for k in keeps]
    return grid


def run_cell(cell: Cell, model: str, data: str, steps: int, calibration_tokens: int, num_layers: int,
             threads: int | None = 1) -> dict[str, Any]:
    """Run one cell and return its row (perplexities with their protocol, parameters, seconds)."""
    if threads:
        torch.set_num_threads(threads)
    data_aware = cell.init == "data-aware"
    recipe = cell_recipe(cell, num_layers)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = kc.run_pipeline(model, recipe, Path(tmp) / "out", data=data,
                                 max_steps=steps, measure_speed=False, progress=False,
                                 calibration_data=data if data_aware else None,
                                 calibration_tokens=calibration_tokens if data_aware else None)
    ppl = report["perplexity"]
    protocol = {k: ppl["teacher"][k] for k in ("block_size", "stride", "tokens")}
    protocol["data"] = ppl["teacher"].get("data")  # the text scored (cells before it was recorded: the validation plays)
    embedding = any(t.endswith(".wte") for rule in recipe["compress"] for t in rule["targets"])
    return {**asdict(cell), "key": cell.key, "line": cell.line, "embedding_compressed": embedding,
            "params": report["params_after"],
            "teacher_params": report["params_before"], "teacher": ppl["teacher"]["perplexity"],
            "zero_shot": ppl["compressed"]["perplexity"], "distilled": ppl["distilled"]["perplexity"],
            "steps": report["distill"]["steps"], "protocol": protocol, "seconds": round(time.perf_counter() - start, 1)}


def import_report(report_path: Path, cache: Path, label: str) -> int:
    """Append the cells of an earlier report to `cache` (those not already there), marked as made by earlier
    sources; returns how many were added."""
    from quality_legacy import rows_from_report

    cached = cached_rows(cache)
    rows = [r for r in rows_from_report(report_path.read_text(), label, LINE_NAMES) if r["key"] not in cached]
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


def usable(row: dict, settings: dict, keep_earlier: bool) -> bool:
    """Whether a cached row counts: the same settings, and the same sources unless `keep_earlier`."""
    if row.get("settings") != settings["settings"]:
        return False
    return row.get("source") == settings["source"] or keep_earlier


def run_all(grid: list[Cell], cache: Path, jobs: int, keep_earlier: bool = False, **kwargs) -> list[dict[str, Any]]:
    """Run the cells not already in `cache` (one JSON row per line), `jobs` at a time; return every row of the grid.

    A cached row counts only when it was made with the same settings and the same kroncompress sources
    (with `keep_earlier`: or earlier sources; such rows keep their `source` and the report marks them)."""
    settings = {"settings": {k: kwargs[k] for k in ("model", "data", "steps", "calibration_tokens")},
                "source": source_fingerprint()}
    done = {key: row for key, row in cached_rows(cache).items() if usable(row, settings, keep_earlier)}
    todo = [cell for cell in grid if cell.key not in done]
    print(f"{len(grid)} cells, {len(grid) - len(todo)} cached, {len(todo)} to run ({jobs} at a time)", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)

    def record(row):
        row = {**row, **settings}
        done[row["key"]] = row
        with cache.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['key']}: {row['params']:,} params, {row['zero_shot']:.2f} -> {row['distilled']:.2f} "
              f"({row['seconds']:.0f} s)", flush=True)

    if jobs <= 1:
        for cell in todo:
            record(run_cell(cell, **kwargs))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(run_cell, cell, **kwargs) for cell in todo]
            for future in concurrent.futures.as_completed(futures):
                record(future.result())
    return [done[cell.key] for cell in grid]


def _budget_key(row: dict) -> tuple:
    return (row["recipe"], row["layout"], row["init"])


def group_seeds(rows: list[dict]) -> list[dict]:
    """One entry per (recipe, layout, init): the first seed's row, with the mean and range over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_budget_key(row), []).append(row)
    out = []
    for members in groups.values():
        after = [m["distilled"] for m in members]
        out.append({**members[0], "seeds": [m["seed"] for m in members], "distilled_runs": after,
                    "distilled_mean": statistics.fmean(after), "seconds": _mean_seconds(members)})
    return out


def _mean_seconds(rows: list[dict]) -> float | None:
    known = [r["seconds"] for r in rows if r.get("seconds") is not None]
    return statistics.fmean(known) if known else None


def _earlier(row: dict) -> str:
    """A marker for a row made by earlier sources ("" for the current ones)."""
    return " (e)" if row.get("earlier_source") else ""


def _fmt_after(row: dict) -> tuple[str, str]:
    runs = row["distilled_runs"]
    if len(runs) == 1:
        return f"{runs[0]:.2f}", ""
    return f"{row['distilled_mean']:.2f}", f"{min(runs):.2f}-{max(runs):.2f} ({len(runs)} seeds)"


def claim(main: list[dict]) -> str:
    """The paper's KnGPT2-vs-DistilGPT2 comparison, worded from the measured rows."""
    kron = [r for r in main if r["recipe"] == "kn-gpt2"]
    drop = [r for r in main if r["recipe"] == "distilgpt2"]
    if not kron or not drop:
        return "Not measured: the run had no kn-gpt2 or no distilgpt2 cell."
    best, baseline = min(kron, key=lambda r: r["distilled_mean"]), drop[0]
    gap = (baseline["distilled_mean"] - best["distilled_mean"]) / baseline["distilled_mean"]
    overlap = min(baseline["distilled_runs"]) <= max(best["distilled_runs"]) and min(best["distilled_runs"]) <= max(baseline["distilled_runs"])
    verdict = ("**holds here**" if gap > 0 else "**does not hold here**") + (
        " (but the seed ranges overlap: not a clear difference)" if overlap and (len(best["distilled_runs"]) > 1) else "")
    return (f"The paper: KnGPT2 + ILKD 20.5 vs DistilGPT2 23.7 WikiText-103 perplexity at ~82-84M parameters. Here, "
            f"kn-gpt2 ({best['init']}) reaches {best['distilled_mean']:.2f} with {best['params']:,} parameters and "
            f"layer dropping ({baseline['layout']}) {baseline['distilled_mean']:.2f} with {baseline['params']:,}: "
            f"kn-gpt2 is {abs(gap) * 100:.1f}% {'lower' if gap > 0 else 'higher'}. The claim {verdict}.")


def best_at_budget(main: list[dict]) -> str:
    """Which row of the main table ends lowest, and where layer dropping ranks."""
    ranked = sorted(main, key=lambda r: r["distilled_mean"])
    if not ranked:
        return ""
    best = ranked[0]
    drop = [i for i, r in enumerate(ranked) if r["recipe"] == "distilgpt2"]
    name = best["recipe"] if best["layout"] == "recipe" else f"{best['recipe']} ({best['layout']})"
    text = f"Lowest after distillation at this budget: {name} ({best['init']}), {best['distilled_mean']:.2f}."
    if drop:
        text += f" Layer dropping ranks {drop[0] + 1} of {len(ranked)}."
    return text


def plot(path: Path, rows: list[dict], teacher: float, teacher_params: int) -> None:
    """Perplexity vs parameters (% of the teacher), zero-shot and after distillation: a colour per strategy,
    solid where the embedding is compressed too, dashed where it stays dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, bool], list[dict]] = {}
    for row in rows:
        series.setdefault((row["line"], row["embedding_compressed"]), []).append(row)
    colours = {line: f"C{i}" for i, line in enumerate(dict.fromkeys(r["line"] for r in rows))}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    for axis, field, title in ((axes[0], "zero_shot", "right after decomposition"),
                               (axes[1], "distilled_mean", f"after {rows[0]['steps']} distillation steps")):
        for (line, embedding), members in series.items():
            members = sorted(members, key=lambda r: r["params"])
            x = [100 * r["params"] / teacher_params for r in members]
            label = f"{line}{' + embedding' if embedding else ''}"
            axis.plot(x, [r[field] for r in members], marker="o", color=colours[line],
                      linestyle="-" if embedding else "--", label=label)
        axis.axhline(teacher, color="black", linewidth=0.8, linestyle=":", label=f"teacher ({teacher:.1f})")
        axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("parameters (% of the teacher)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity (held-out text)")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)


def report(rows: list[dict], args: argparse.Namespace, wall: float, missing: list[str] = ()) -> str:
    grouped = group_seeds(rows)
    first = rows[0]
    teacher, teacher_params, protocol = first["teacher"], first["teacher_params"], first["protocol"]
    main = sorted([r for r in grouped if r["main"]], key=lambda r: r["distilled_mean"])
    curve = sorted(grouped, key=lambda r: (r["line"], r["params"]))
    tokens = TRAIN["batch_size"] * TRAIN["grad_accum"] * protocol["block_size"] * first["steps"]
    lines = [
        "# Quality: every strategy at the same budget on the demo teacher", "",
        f"Generated by `python benchmarks/bench_quality.py {' '.join(args.argv)}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(rows)} cells, "
        + (f"{sum(r['seconds'] or 0 for r in rows) / 60:.0f} cell-minutes (rewritten from the cached cells)" if args.report_only else
           f"{wall / 60:.1f} min of wall time for the cells run this time")
        + f" ({args.jobs} at a time, one torch thread each).", "",
        "## Protocol", "",
        f"- Teacher: `{args.model}`, {teacher_params:,} parameters, perplexity {teacher:.2f}.",
        (f"- Perplexity: the held-out text of `{args.data}` ({protocol['data']}, what `kroncompress eval --data "
         f"{args.data}` scores), "
         if protocol.get("data") else
         f"- Perplexity: the held-out text of `{args.data}` (for Shakespeare: the validation plays), a fixed sample, ")
        + f"block {protocol['block_size']}, stride {protocol['stride']}, {protocol['tokens']:,} scored tokens; the same "
        "text for every cell and seed."
        + (" **Not so here: the cells were scored under different protocols (text, windows or tokens); rerun the older "
           "ones before comparing them.**" if len({json.dumps(r["protocol"], sort_keys=True) for r in rows}) > 1 else ""),
        f"- Distillation budget, identical for every cell: {first['steps']} steps x {TRAIN['batch_size']} sequences x "
        f"{TRAIN['grad_accum']} accumulation x {protocol['block_size']} tokens = {tokens:,} tokens; AdamW lr "
        f"{TRAIN['lr']}, {TRAIN['warmup_ratio']:.0%} warmup then {TRAIN['schedule']}, clip {TRAIN['max_grad_norm']}, "
        f"weight decay {TRAIN['weight_decay']}.",
        "- Losses: each recipe's own. The factorised students use ILKD (embedding MSE + attention KL + hidden MSE + CE, "
        "weights 1); layer dropping uses DistilGPT2's soft-target KL (T = 2, weight 5) + CE (2) + hidden MSE (1) "
        "through its layer map.",
        f"- Init: weight-only = nearest Kronecker product / truncated SVD / Tucker / TT of the weights; data-aware = "
        f"activation-aware ALS (kronecker) or whitened SVD (svd) from {args.calibration_tokens:,} tokens of the training "
        "text. Layer dropping copies the kept blocks.",
        f"- Seeds: {', '.join(map(str, args.seeds))} for the main table (the seed drives data order and dropout; "
        "decomposition and calibration are deterministic); the extra budget points use the first seed.", "",
        "## At the kn-gpt2 budget", "",
        "| recipe | init | parameters | % of teacher | zero-shot perplexity | perplexity after distillation | range over seeds | minutes per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in main:
        after, spread = _fmt_after(row)
        name = row["recipe"] if row["layout"] == "recipe" else f"{row['recipe']} ({row['layout']})"
        minutes = f"{row['seconds'] / 60:.1f}" if row.get("seconds") is not None else ""
        lines.append(f"| {name}{_earlier(row)} | {row['init']} | "
                     f"{row['params']:,} | {100 * row['params'] / teacher_params:.1f} | {row['zero_shot']:.2f} | {after} | "
                     f"{spread} | {minutes} |")
    earlier = sorted({r["earlier_source"] for r in rows if r.get("earlier_source")})
    if earlier:
        count = sum(1 for r in rows if r.get("earlier_source"))
        lines += ["", f"(e): {count} of the {len(rows)} runs were made by an earlier version of the sources "
                  f"({'; '.join(earlier)}) and kept (`--keep-earlier`); the others by the current sources "
                  f"({rows_source(rows)}). Where an earlier report gave only a two-seed range, its ends stand for the two "
                  "runs (which seed gave which is unknown; a mean recomputed from the rounded ends may differ from the "
                  "earlier report's by 0.01)."]
    if missing:
        lines += ["", f"Not in this report ({len(missing)} cells of the full grid, not run or not selected): "
                  + ", ".join(f"`{key}`" for key in missing) + "."]
    lines += ["", "## The paper's claim in miniature", "", claim(main), "", best_at_budget(main), "",
              "## Perplexity vs parameters", "", f"![perplexity vs parameters]({Path(args.output).with_suffix('.png').name})", "",
              "| line | layout | parameters | % of teacher | zero-shot perplexity | perplexity after distillation |",
              "|---|---|---|---|---|---|"]
    for row in curve:
        lines.append(f"| {row['line']}{_earlier(row)} | {row['layout']} | {row['params']:,} | {100 * row['params'] / teacher_params:.1f} | "
                     f"{row['zero_shot']:.2f} | {_fmt_after(row)[0]} |")
    lines += ["", "Layouts: `recipe` is the bundled recipe (for kn-gpt2: the embedding and every matrix of the odd blocks); "
              "`no embedding` leaves the embedding dense; `all blocks` takes every block's matrices instead of the odd blocks'; `keep K` keeps "
              "K evenly spaced blocks, first and last included."]
    return "\n".join(lines) + "\n"


def rows_source(rows: list[dict]) -> str:
    current = sorted({r["source"] for r in rows if not r.get("earlier_source")})
    return "source " + ", ".join(current) if current else "none"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/quality.md", help="markdown report (the plot goes next to it as .png)")
    parser.add_argument("--model", default="shakespeare-gpt2", help="teacher: a model folder or the packaged demo")
    parser.add_argument("--data", default="shakespeare", help="distillation, calibration and evaluation text (its held-out part)")
    parser.add_argument("--steps", type=int, default=40, help="distillation steps of every cell")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of the main table")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--repeat", default=REPEAT, help="regex: main-table cells run with every seed (the rest with the first)")
    parser.add_argument("--no-curve", dest="curve", action="store_false", help="only the kn-gpt2 budget")
    parser.add_argument("--only", default=None, help="regex: run only the cells whose key (recipe|layout|init|seed) matches")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="cells run side by side")
    parser.add_argument("--fresh", action="store_true", help="ignore cells cached by an earlier run")
    parser.add_argument("--keep-earlier", action="store_true",
                        help="reuse cached cells made by earlier sources too (the report marks them)")
    parser.add_argument("--import-report", metavar="OLD_MD", default=None,
                        help="first add the cells of an earlier report (markdown) to the cache, marked as earlier sources")
    parser.add_argument("--import-label", default=None, help="how the report names the imported cells' sources")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the report from the cached cells, whatever sources made them")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    output = Path(args.output)
    cache = output.with_name(output.stem + ".cells.jsonl")
    if args.fresh and cache.exists():
        cache.unlink()
    if args.import_report:
        label = args.import_label or f"read back from {args.import_report}"
        print(f"imported {import_report(Path(args.import_report), cache, label)} cells of {args.import_report}", flush=True)
    num_layers = num_layers_of(args.model)
    grid = full = cells(num_layers, args.seeds, args.curve, args.repeat)
    if args.only:
        grid = [cell for cell in grid if re.search(args.only, cell.key)]
    if not grid:
        raise SystemExit(f"--only {args.only!r} matches no cell")
    start = time.perf_counter()
    if args.report_only:
        cached = cached_rows(cache)
        missing = [cell.key for cell in grid if cell.key not in cached]
        if missing:
            raise SystemExit(f"--report-only: {len(missing)} cells are not in {cache}, e.g. {missing[0]}; run without --report-only")
        rows = [cached[cell.key] for cell in grid]
        wall = sum(row["seconds"] or 0 for row in rows) / args.jobs
    else:
        rows = run_all(grid, cache, args.jobs, keep_earlier=args.keep_earlier, model=args.model, data=args.data, steps=args.steps,
                       calibration_tokens=args.calibration_tokens, num_layers=num_layers)
        wall = time.perf_counter() - start
    shown = {row["key"] for row in rows}
    write_atomic(output, report(rows, args, wall, [cell.key for cell in full if cell.key not in shown]))
    plot(output.with_suffix(".png"), group_seeds(rows), rows[0]["teacher"], rows[0]["teacher_params"])
    print(output.read_text())
    return rows


if __name__ == "__main__":
    main()
