"""Quantization stacked on decomposition: size on disk, perplexity and generation speed of the original model,
the original with its Linear/Conv1D weights in int8 (the same quantizer, kc.quantize(dense=True)), the compressed
model, and the compressed model with its factors in int8 / int4 (and with the remaining dense weights too).

    python benchmarks/bench_quantize.py --output benchmarks/results/quantize.md [--threads 1] [--models demo,gemma]

Models: the packaged demo teacher (shakespeare-gpt2) compressed with kn-gpt2 and with svd-gpt2, and Gemma 3 270M
(when scripts/fetch_gemma.py has put it in the cache) with every attention and MLP projection at 2/3 of its
parameters by whitened SVD (Gemma's weight-only SVD is no model). No distillation: the point is
what quantization adds on top of a given factorization, so each int row is read against the float row of the
same model. Perplexity: the packaged Shakespeare corpus' test split (`kroncompress eval --data shakespeare`),
the first --eval-tokens tokens. Generation: greedy, batch 1, KV cache, --new-tokens tokens after an 8-token
prompt, median of 3 after a warmup (kroncompress.evaluate.generation_throughput). Size: model.safetensors as
kc.save_compressed writes it. Finished cells are cached in `<output stem>.cells.jsonl`; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

import kroncompress as kc
from kroncompress.evaluate import evaluate_perplexity, generation_throughput

from common import write_atomic

CACHE = Path(os.environ.get("KRONCOMPRESS_CACHE") or Path.home() / ".cache" / "kroncompress") / "real"
# Gemma's weight-only truncated SVD is no model (perplexity ~3e13: its activations are far from isotropic,
# benchmarks/results/init-gemma.md), so Gemma is compressed data-aware: whitened SVD on 4,096 calibration tokens.
GEMMA_SVD = {"version": 1, "name": "svd-gemma-whitened", "ignore": ["role:embedding", "lm_head"], "compress": [
    {"targets": ["role:attention", "role:mlp"], "strategy": "svd", "options": {"ratio": 1.5, "init": "whitened"}}],
    "calibration": {"data": {"source": "shakespeare"}, "tokens": 4096, "block_size": 256}}
# int4 with one scale per output channel costs Gemma 3x its perplexity; one scale per 128 weights is the usual fix.
# Only on the original: a group must divide the quantized axis, and the factors' ranks (262, ...) are not
# multiples of 128 (kc.quantize refuses them by name).
GROUPED = [("int4 g128 dense", {"bits": 4, "group_size": 128, "dense": True})]
# (label, kc.quantize arguments or None)
QUANT = [("float32", None), ("int8 factors", {"bits": 8}), ("int8 factors + dense", {"bits": 8, "dense": True}),
         ("int4 factors", {"bits": 4}), ("int4 factors + dense", {"bits": 4, "dense": True})]
ORIGINAL = [("float32", None), ("int8 dense", {"bits": 8, "dense": True}), ("int4 dense", {"bits": 4, "dense": True})]


def models(args) -> dict[str, dict]:
    out = {"demo": {"source": "shakespeare-gpt2", "recipes": {"kn-gpt2": "kn-gpt2", "svd-gpt2": "svd-gpt2"},
                    "block": 256, "stride": 128}}
    gemma = CACHE / "gemma3-270m"
    if (gemma / "config.json").is_file():
        out["gemma"] = {"source": str(gemma), "recipes": {"whitened svd (blocks 2/3)": GEMMA_SVD}, "block": 256,
                        "stride": 256, "eval_tokens": args.gemma_eval_tokens, "grouped": True}
    return {k: v for k, v in out.items() if k in args.models}


def cells(spec: dict) -> list[tuple[str, str, str, dict | None]]:
    """(cell key, variant, quantization label, kc.quantize kwargs)."""
    grouped = spec.get("grouped", False)
    rows = [("original", label, q) for label, q in ORIGINAL + (GROUPED if grouped else [])]
    rows += [(name, label, q) for name in spec["recipes"] for label, q in QUANT]
    return rows


def build(spec: dict, variant: str, scratch: Path):
    """The model of a variant, float: the original, or compressed once and reloaded from a scratch folder."""
    model, info = kc.load_model(spec["source"])
    if variant == "original":
        return model.eval(), info.tokenizer
    folder = scratch / variant.replace(" ", "_").replace("/", "_")
    if not (folder / "config.json").is_file():
        recipe = spec["recipes"][variant]
        recipe = kc.load_recipe(recipe) if isinstance(recipe, str) else kc.Recipe.from_dict(recipe)
        stats = kc.calibrate(model, recipe, info.tokenizer) if recipe.calibration is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the demo's weight-only initialisation, on purpose
            kc.compress(model, recipe, calibration=stats)
        kc.save_compressed(model, folder)
    return kc.load_compressed(folder), info.tokenizer


def measure(model, tokenizer, spec: dict, quant: dict | None, args, scratch: Path) -> dict:
    row: dict = {}
    if quant is not None:
        summary = kc.quantize(model, **quant)
        row["kept_float"] = len(summary.kept)
    row["weight_bytes"] = kc.weight_bytes(model)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        folder = kc.save_compressed(model, Path(tmp) / "m")
        row["disk_bytes"] = (folder / "model.safetensors").stat().st_size
    start = time.perf_counter()
    result = evaluate_perplexity(model, tokenizer, "shakespeare", block_size=spec["block"], stride=spec["stride"],
                                 max_tokens=spec.get("eval_tokens", args.eval_tokens))
    row["perplexity"], row["eval_tokens"] = result.perplexity, result.tokens
    row["eval_seconds"] = time.perf_counter() - start
    row["tokens_per_s"] = generation_throughput(model, new_tokens=args.new_tokens, repeats=3, warmup=1)
    return row


def run(args) -> list[dict]:
    cache = args.output.with_suffix(".cells.jsonl")
    done = {} if args.fresh or not cache.exists() else {
        (r["model"], r["variant"], r["quant"]): r for r in map(json.loads, cache.read_text().splitlines()) if r}
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, spec in models(args).items():
        for variant, label, quant in cells(spec):
            key = (name, variant, label)
            if key in done:
                rows.append(done[key])
                continue
            print(f"{name} / {variant} / {label} ...", flush=True)
            model, tokenizer = build(spec, variant, scratch / name)
            row = {"model": name, "variant": variant, "quant": label, "threads": torch.get_num_threads(),
                   **measure(model, tokenizer, spec, quant, args, scratch)}
            rows.append(row)
            with cache.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"  {row}", flush=True)
    return rows


def table(rows: list[dict], name: str) -> list[str]:
    mine = [r for r in rows if r["model"] == name]
    if not mine:
        return []
    base = next((r for r in mine if r["variant"] == "original" and r["quant"] == "float32"), mine[0])
    lines = ["| model | weights | model.safetensors | vs original | perplexity | generation tokens/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in mine:
        lines.append(f"| {r['variant']} | {r['quant']} | {r['disk_bytes'] / 1e6:,.2f} MB | "
                     f"{base['disk_bytes'] / r['disk_bytes']:.2f}x | {r['perplexity']:.2f} | {r['tokens_per_s']:.1f} |")
    return lines


def report(rows: list[dict], args) -> str:
    threads = sorted({r["threads"] for r in rows})
    out = ["# Quantization stacked on decomposition", "",
           "Written by `benchmarks/bench_quantize.py` (see its docstring for the protocol):", "",
           f"    python benchmarks/bench_quantize.py --output {args.output} --threads {args.threads} --models "
           f"{','.join(args.models)} --eval-tokens {args.eval_tokens} --new-tokens {args.new_tokens}", "",
           f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
           f"{', '.join(map(str, threads))} torch thread(s) (torch.set_num_threads), run beside other jobs: "
           "tokens/s compare rows of one table, not machines, and on a shared, loaded machine they move by about "
           "30% from run to run (a row faster than its float row is such noise).", "",
           "Every compression is right after decomposition (no distillation), weight-only on the demo, whitened "
           "SVD on 4,096 Shakespeare calibration tokens on Gemma (its weight-only SVD scores ~3e13), so "
           "perplexities are those of the undistilled factorization; what matters here is each int row against the "
           "float32 row of the same model. `int8` / `int4`: kc.quantize, symmetric, one scale per output channel "
           "(per row of each factor), weights only (`g128`: one scale per 128 weights of a row); `factors` quantizes the factor matrices, `+ dense` also the "
           "remaining nn.Linear / Conv1D weights; `dense` on the original is the same quantizer on its Linear/Conv1D "
           "weights. Never quantized: embeddings kept dense, the head tied to them, biases, norms. Forward "
           "dequantizes each factor when it reads it, so int rows save bytes, not time.", ""]
    titles = {"demo": "## Demo teacher (shakespeare-gpt2, GPT-2 layout, 6 blocks)",
              "gemma": "## Gemma 3 270M"}
    for name in ("demo", "gemma"):
        lines = table(rows, name)
        if lines:
            first = next(r for r in rows if r["model"] == name)
            out += [titles[name], "",
                    f"Perplexity on the first {first['eval_tokens']:,} tokens of the Shakespeare test split; generation: "
                    f"{args.new_tokens} new tokens.", "", *lines, ""]
    if not any(r["model"] == "gemma" for r in rows):
        out += ["Gemma 3 270M: not measured yet (it needs `python scripts/fetch_gemma.py --only gemma` first; then "
                "`--models gemma` adds its rows to this report).", ""]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/quantize.md"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="demo,gemma")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--gemma-eval-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "kc-bench-quantize"))
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = run(args) if not args.report_only else [
        json.loads(line) for line in args.output.with_suffix(".cells.jsonl").read_text().splitlines() if line]
    write_atomic(args.output, report(rows, args))
    return rows


if __name__ == "__main__":
    main()
