"""One global budget against one uniform ratio, zero-shot, at equal block parameters.

Every attention and MLP matrix of every block of a model is compressed so that the blocks keep a fraction
(80%, 2/3, 1/2, 1/4, 1/8) of their weight parameters, these ways:

- uniform: whitened SVD at one rank ratio for every matrix (the recipes' `ratio` today);
- global svd: whitened SVD with each matrix's rank chosen by the allocation (kroncompress.budget), its error
  weighted by the module's measured sensitivity (kroncompress.sensitivity);
- global svd+kron: the same, each matrix also offered the shape search's Kronecker layouts and "keep dense".
- global svd, uniform s: the allocation without sensitivity (every s = 1), to separate its two ingredients.

    python benchmarks/bench_allocation.py                                # the packaged demo teacher
    python benchmarks/bench_allocation.py --model ~/.cache/kroncompress/real/gemma3-270m --data ... --output ...

Cells are appended to `<output stem>.cells.jsonl` and reused (delete a line to rerun it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import write_atomic

import kroncompress as kc
from kroncompress.budget import allocate_budget
from kroncompress.distill.data import pack_blocks, spec_bos
from kroncompress.distill.spec import text_spec
from kroncompress.distill.tokens import token_stream
from kroncompress.evaluate import evaluate_perplexity
from kroncompress.layers.base import dense_weight_of
from kroncompress.sensitivity import measure_sensitivity

KEEP = {"80%": 0.8, "2/3": 2 / 3, "1/2": 0.5, "1/4": 0.25, "1/8": 0.125}
METHODS = ("uniform", "global svd, uniform s", "global svd", "global svd+kron")


def block_matrices(model) -> list[str]:
    """Every attention and MLP matrix of every block (the `role:attention` and `role:mlp` aliases)."""
    recipe = kc.Recipe.from_dict({"version": 1, "name": "all-blocks",
                                  "compress": [{"targets": ["role:attention", "role:mlp"], "strategy": "svd",
                                                "options": {"rank": 1}}]})
    return [row.name for row in kc.plan(model, recipe).rows]


def weight_of(model, name) -> torch.Tensor:
    """W as out x in (GPT-2's Conv1D stores in x out)."""
    return dense_weight_of(dict(model.named_modules())[name])[0].detach()


def rules_for(choice: dict) -> list[dict]:
    rules = []
    for name, candidate in choice.items():
        if candidate.label.strategy == "dense":
            continue
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in candidate.label.options}
        if candidate.label.strategy == "svd":
            options["init"] = "whitened"
        else:
            options["init"] = "als"
        rules.append({"targets": [name], "strategy": candidate.label.strategy, "options": options})
    return rules


def uniform_rules(model, names, keep) -> list[dict]:
    rules = []
    for name in names:
        m, n = weight_of(model, name).shape
        rank = max(1, int(keep * m * n / (m + n)))
        rules.append({"targets": [name], "strategy": "svd", "options": {"rank": rank, "init": "whitened"}})
    return rules


def run_cell(args, method, keep_name, blocks, tokenizer, cache) -> dict:
    model, info = kc.load_model(args.model)
    names = block_matrices(model)
    weights = {n: weight_of(model, n) for n in names}
    dense = sum(W.numel() for W in weights.values())
    budget = int(KEEP[keep_name] * dense)
    stats = cache.get("stats")
    timings = {}
    if stats is None:
        t = time.perf_counter()
        stats = kc.collect_statistics(model, blocks, names)
        cache["stats"], cache["stats_s"] = stats, time.perf_counter() - t
    timings["calibrate_s"] = cache["stats_s"]
    if method == "uniform":
        rules = uniform_rules(model, names, KEEP[keep_name])
    else:
        sens = None
        if method != "global svd, uniform s":
            if "sensitivity" not in cache:
                t = time.perf_counter()
                cache["sensitivity"] = measure_sensitivity(model, blocks, names)
                cache["sensitivity_s"] = time.perf_counter() - t
            sens = cache["sensitivity"]
            timings["sensitivity_s"] = cache["sensitivity_s"]
        structures = ("svd", "kronecker") if method == "global svd+kron" else ("svd",)
        t = time.perf_counter()
        result = allocate_budget(weights, {n: stats.matrix(n) for n in names}, budget, sensitivity=sens,
                                 structures=structures)
        timings["allocate_s"] = time.perf_counter() - t
        rules = rules_for(result.choice)
    recipe = kc.Recipe.from_dict({"version": 1, "name": f"{method}-{keep_name}", "compress": rules})
    t = time.perf_counter()
    report = kc.compress(model, recipe, calibration=stats)
    timings["compress_s"] = time.perf_counter() - t
    modules = dict(model.named_modules())
    kept = sum(sum(p.numel() for name_p, p in modules[n].named_parameters() if name_p != "bias") for n in names)
    ppl = evaluate_perplexity(model, tokenizer, args.data, split="test", max_tokens=args.eval_tokens).perplexity
    strategies = {}
    for row in report.rows:
        strategies[row.strategy] = strategies.get(row.strategy, 0) + 1
    return {"method": method, "keep": keep_name, "budget": budget, "params": kept, "dense": dense,
            "perplexity": ppl, "strategies": strategies, **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shakespeare-gpt2")
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="run only cells whose 'method @ keep' contains this")
    parser.add_argument("--skip", default="\x00", help="skip cells whose 'method @ keep' contains this")
    parser.add_argument("--output", default="benchmarks/results/allocation-demo.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    cells_path = out.with_suffix(".cells.jsonl")
    cells = [json.loads(line) for line in cells_path.read_text().splitlines()] if cells_path.exists() else []
    done = {(c["method"], c["keep"]) for c in cells}
    model, info = kc.load_model(args.model)
    tokenizer = info.tokenizer
    spec = text_spec(args.data)
    ids = token_stream(spec, tokenizer, "train", max_tokens=args.tokens)[:args.tokens]
    blocks = pack_blocks(ids, args.block_size, spec_bos(spec, tokenizer))
    teacher = evaluate_perplexity(model, tokenizer, args.data, split="test", max_tokens=args.eval_tokens).perplexity
    del model
    cache: dict = {}
    for keep_name in KEEP:
        for method in METHODS:
            cell_name = f"{method} @ {keep_name}"
            if (method, keep_name) in done or args.only not in cell_name or args.skip in cell_name:
                continue
            cell = run_cell(args, method, keep_name, blocks, tokenizer, cache)
            cell.update(model=args.model, threads=args.threads, machine=platform.machine())
            print(json.dumps(cell), flush=True)
            with cells_path.open("a") as f:
                f.write(json.dumps(cell) + "\n")
            cells.append(cell)
    write_report(out, cells, teacher, args)


def write_report(out: Path, cells: list[dict], teacher: float, args) -> None:
    lines = [f"# Global budget vs uniform ratio, zero-shot ({args.model})", "",
             f"Teacher perplexity {teacher:.2f} (test split of `{args.data}`, first {args.eval_tokens:,} tokens). "
             f"Calibration and sensitivity: {args.tokens:,} training tokens in blocks of {args.block_size}. "
             "Every attention and MLP matrix of every block; `params` counts their weights.", "",
             "| keep | method | params | perplexity | vs uniform | strategies | calibrate s | sensitivity s | allocate s | compress s |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    by = {(c["method"], c["keep"]): c for c in cells}
    for keep in KEEP:
        base = by.get(("uniform", keep))
        for method in METHODS:
            c = by.get((method, keep))
            if c is None:
                continue
            gain = f"{100 * (c['perplexity'] / base['perplexity'] - 1):+.1f}%" if base else ""
            mix = ", ".join(f"{k} {v}" for k, v in sorted(c["strategies"].items()))
            lines.append(f"| {keep} | {method} | {c['params']:,} | {c['perplexity']:.2f} | {gain} | {mix} | "
                         f"{c.get('calibrate_s', 0):.1f} | {c.get('sensitivity_s', 0):.1f} | {c.get('allocate_s', 0):.1f} | "
                         f"{c['compress_s']:.1f} |")
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
