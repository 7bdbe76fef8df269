"""Sums of terms with different shapes (issue 15, section 3): low rank + Kronecker vs whitened SVD at equal parameters.

A rank-1 matrix u v^T is the Kronecker product of an (m x 1) and a (1 x n) factor, so a sum of Kronecker terms
with mixed shapes includes whitened SVD as the special case where every term is degenerate. This asks whether
spending part of a matrix's budget on a few non-degenerate Kronecker terms beats spending all of it on rank:

    W ~ U V^T (rank k, a fraction f of the budget) + sum_r A_r (x) B_r (the rest)

fitted by alternating whitened SVD of W - K and data-aware Kronecker ALS of W - U V^T (both exact for their
block, so the output error never increases), scored by the relative output error
sqrt(tr(D C D^T) / tr(W C W^T)) on the calibration statistics. The budget is half of each matrix's
parameters (ratio 2); f = 1 is whitened SVD, f = 0 a pure Kronecker sum. The Kronecker part takes the best
of a fixed set of B shapes (up to `--max-rank` terms that fit the rest of the budget).

    python benchmarks/bench_hybrid.py --model demo                  # every MLP matrix of the demo teacher
    python benchmarks/bench_hybrid.py --model gemma --layers 0      # Gemma 3 270M block 0 (cached statistics)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import kroncompress as kc
from kroncompress.layers.base import dense_weight_of
from kroncompress.linalg.als import kronecker_als
from kroncompress.linalg.kronecker import kron_sum
from kroncompress.linalg.whitening import output_error, whitened_svd

from common import write_atomic

GEMMA = Path(os.environ.get("KRONCOMPRESS_CACHE") or Path.home() / ".cache" / "kroncompress") / "real" / "gemma3-270m"
GEMMA_STATS = Path("benchmarks/results/gemma.calibration-gemma3-270m-16384.safetensors")  # bench_gemma's cache
GEMMA_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")


def b_shapes(m: int, n: int) -> list[tuple[int, int]]:
    """Small, square-ish and half/quarter-sized B factors (the shape search's usual picks and their neighbours)."""
    shapes = [(1, 2), (2, 1), (2, 2), (4, 4), (8, 8), (16, 16), (m // 2, n), (m, n // 2), (m // 4, n // 4),
              (m // 8, n // 8)]
    return list(dict.fromkeys(s for s in shapes if min(s) >= 1 and m % s[0] == 0 and n % s[1] == 0))


def kronecker_part(R: torch.Tensor, C: torch.Tensor, budget: int, max_rank: int) -> tuple[torch.Tensor, str, int]:
    """The best Kronecker sum of R (by output error) within `budget` parameters: (W_hat, description, params)."""
    m, n = R.shape
    best = None
    for m2, n2 in b_shapes(m, n):
        m1, n1 = m // m2, n // n2
        per_term = m1 * n1 + m2 * n2
        rank = min(max_rank, budget // per_term)
        if rank < 1:
            continue
        result = kronecker_als(R, C, (m1, n1), (m2, n2), rank=rank)
        K = kron_sum(result.a, result.b)
        error = output_error(R, K, C, relative=False)
        if best is None or error < best[0]:
            best = (error, K, f"{rank} x ({m1}x{n1})(x)({m2}x{n2})", rank * per_term)
    if best is None:
        return torch.zeros_like(R), "none fits", 0
    return best[1], best[2], best[3]


def hybrid(W: torch.Tensor, C: torch.Tensor, fraction: float, max_rank: int, rounds: int) -> dict:
    m, n = W.shape
    budget = m * n // 2
    k = int(fraction * budget) // (m + n)
    if k == 0:
        K, shape, params = kronecker_part(W, C, budget, max_rank)
        return {"rank": 0, "kronecker": shape, "params": params, "oerr": output_error(W, K, C)}
    U, V = whitened_svd(W, C, k)
    if fraction >= 1:
        return {"rank": k, "kronecker": "", "params": k * (m + n), "oerr": output_error(W, U @ V, C)}
    L, rest = U @ V, budget - k * (m + n)
    for _ in range(rounds):
        K, shape, params = kronecker_part(W - L, C, rest, max_rank)
        U, V = whitened_svd(W - K, C, k)
        L = U @ V
    return {"rank": k, "kronecker": shape, "params": k * (m + n) + params, "oerr": output_error(W, L + K, C)}


def matrices(args) -> tuple[str, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    if args.model == "demo":
        model, info = kc.load_model("shakespeare-gpt2")
        recipe = kc.load_recipe({"version": 1, "name": "mlp", "compress": [
            {"targets": ["role:mlp"], "strategy": "svd", "options": {"ratio": 2, "init": "whitened"}}]})
        plan = kc.plan(model, recipe)
        stats = kc.calibrate(model, plan, info.tokenizer, data="shakespeare", tokens=args.calibration_tokens)
        names = [row.name for row in plan.rows]
        about = f"the packaged demo teacher `shakespeare-gpt2`, every MLP matrix, {args.calibration_tokens:,} calibration tokens"
    else:
        from transformers import AutoModelForCausalLM

        from kroncompress.calibration import CalibrationStats

        model = AutoModelForCausalLM.from_pretrained(GEMMA, dtype=torch.float32)
        stats = CalibrationStats.load(args.stats)
        names = [f"model.layers.{layer}.{m}" for layer in args.layers for m in GEMMA_MATRICES]
        about = f"Gemma 3 270M, blocks {', '.join(map(str, args.layers))}, statistics `{args.stats}` (bench_gemma's)"
    return about, [(name, dense_weight_of(model.get_submodule(name))[0].detach().double(), stats.matrix(name))
                   for name in names]


def report(about: str, rows: list[dict], args, seconds: float) -> str:
    fractions = args.fractions
    out = [
        "# Low rank + Kronecker vs whitened SVD at equal parameters", "",
        f"Generated by `python benchmarks/bench_hybrid.py {' '.join(args.argv)}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({seconds:.0f} s). Model: {about}.", "",
        "Each matrix keeps half of its parameters. f = the fraction of that budget spent on rank (whitened SVD); "
        "the rest on a Kronecker sum (best of the script's B shapes, up to "
        f"{args.max_rank} terms), fitted by {args.rounds} rounds of alternating exact steps. Cells: relative output "
        "error on the calibration statistics (lower is better); bold: the best f of the row.", "",
        "| matrix | shape | " + " | ".join(f"f = {f:g}" for f in fractions) + " | best f | Kronecker part at best f |",
        "|---|---|" + "---|" * len(fractions) + "---|---|",
    ]
    by_module: dict[str, dict[float, dict]] = {}
    for row in rows:
        by_module.setdefault(row["module"], {})[row["fraction"]] = row
    for module, cells in by_module.items():
        best = min(cells, key=lambda f: cells[f]["oerr"])
        values = [("**{:.4f}**" if f == best else "{:.4f}").format(cells[f]["oerr"]) for f in fractions]
        out.append(f"| {module} | {cells[best]['shape']} | " + " | ".join(values) + f" | {best:g} | "
                   f"{cells[best]['kronecker'] or '-'} |")
    means = [statistics.fmean(c[f]["oerr"] for c in by_module.values()) for f in fractions]
    best_each = statistics.fmean(min(c[f]["oerr"] for f in fractions) for c in by_module.values())
    out.append("| **mean** | | " + " | ".join(f"{v:.4f}" for v in means) + f" | per matrix: {best_each:.4f} | |")
    wins = sum(1 for c in by_module.values() if min(c, key=lambda f: c[f]["oerr"]) != 1.0)
    out += ["", f"A hybrid (f < 1) beats whitened SVD on {wins} of {len(by_module)} matrices; choosing f per matrix "
                f"gives a mean output error of {best_each:.4f} against {means[fractions.index(1.0)]:.4f} for whitened SVD "
                "alone." if 1.0 in fractions else ""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "gemma"), default="demo")
    parser.add_argument("--layers", type=int, nargs="+", default=[0], help="Gemma blocks")
    parser.add_argument("--stats", default=str(GEMMA_STATS), help="Gemma: CalibrationStats file (bench_gemma writes it)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.9, 0.75, 0.5, 0.0])
    parser.add_argument("--max-rank", type=int, default=32, help="most Kronecker terms")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the SVD and Kronecker parts")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="default benchmarks/results/hybrid-<model>.md")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    about, mats = matrices(args)
    rows = []
    for name, W, C in mats:
        for fraction in args.fractions:
            row = {"module": name, "shape": f"{W.shape[0]} x {W.shape[1]}", "fraction": fraction,
                   **hybrid(W, C, fraction, args.max_rank, args.rounds)}
            rows.append(row)
            print(row, flush=True)
    text = report(about, rows, args, time.perf_counter() - start)
    output = Path(args.output or f"benchmarks/results/hybrid-{args.model}.md")
    write_atomic(output, text)
    print(text)
    return text


if __name__ == "__main__":
    main()
