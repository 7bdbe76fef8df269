"""Compress wall time on a real LM: Kronecker `ratio: 2` with calibration (shape search by output error, ALS
init) against whitened SVD at the same budget, with the same calibration statistics, and the Kronecker
path of an older commit (the code before the per-input caches and the resumed shortlist fit) in the same run.

    python benchmarks/bench_compress_time.py --output benchmarks/results/compress-time.md
    python benchmarks/bench_compress_time.py --layers 0-2 --output ...   # a subset of the blocks

Calibration (one teacher pass, 16k tokens of ~/.cache/kroncompress/real/english/train.jsonl) runs once and
its statistics are cached; each cell (one strategy/variant) then runs in a fresh subprocess that loads the
model and the cached statistics and times kc.compress (plan with the shape search + decompose) alone. The
old code runs from `git archive OLD_COMMIT` on PYTHONPATH. Each cell takes /tmp/kc-heavy.lock (one heavy job
at a time on a shared machine) and is cached in a jsonl next to the report, so a rerun skips finished cells.
A report, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = Path("~/.cache/kroncompress/real").expanduser()
MODEL = REAL / "gemma3-270m"
TRAIN = REAL / "english" / "train.jsonl"
STATS = Path("~/.cache/kroncompress/bench/gemma-calib-16k.safetensors").expanduser()
LOCK = "/tmp/kc-heavy.lock"
OLD_COMMIT = "28d90a9"  # main before the Cholesky whitening start (2026-12-01)
TARGETS = r"model\.layers\.({layers})\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
CELLS = {  # name -> (code: "new" or "old", strategy, options)
    "svd-whitened": ("new", "svd", {"ratio": 2, "init": "whitened"}),
    "kron-old": ("old", "kronecker", {"ratio": 2, "rank": "auto", "init": "als"}),
    "kron-new": ("new", "kronecker", {"ratio": 2, "rank": "auto", "init": "als"}),
    # one term, as benchmarks/bench_gemma.py's 1/2 cells
    "kron1-old": ("old", "kronecker", {"ratio": 2, "init": "als"}),
    "kron1-new": ("new", "kronecker", {"ratio": 2, "init": "als"}),
    # issue 15, section 3: does more ALS work close the gap to whitened SVD? (try with --layers 0)
    "kron1-shortlist1": ("new", "kronecker", {"ratio": 2, "init": "als", "shortlist": 1}),
    "kron1-sweeps12": ("new", "kronecker", {"ratio": 2, "init": "als", "sweeps": 12}),
    "kron1-sweeps24": ("new", "kronecker", {"ratio": 2, "init": "als", "sweeps": 24}),
    # issue 24: the shape search with rank "auto" on the MLP matrices alone, against its own one-term layout
    "svd-mlp": ("new", "svd", {"ratio": 2, "init": "whitened"}),
    "kron1-mlp": ("new", "kronecker", {"ratio": 2, "init": "als"}),
    "kron-auto-mlp": ("new", "kronecker", {"ratio": 2, "rank": "auto", "init": "als"}),
    "kron-auto133-mlp": ("new", "kronecker", {"ratio": 1.3333, "rank": "auto", "init": "als"}),
}
MLP_TARGETS = r"model\.layers\.({layers})\.mlp\.(gate|up|down)_proj"


def layer_regex(spec: str) -> str:
    if spec == "all":
        return r"\d+"
    lo, _, hi = spec.partition("-")
    return "|".join(str(i) for i in range(int(lo), int(hi or lo) + 1))


def recipe(strategy: str, options: dict, layers: str, mlp_only: bool = False) -> dict:
    targets = (MLP_TARGETS if mlp_only else TARGETS).format(layers=layer_regex(layers))
    return {"version": 1, "name": f"bench-{strategy}", "compress": [
        {"targets": ["re:" + targets], "strategy": strategy, "options": options}]}


@contextlib.contextmanager
def heavy_lock():
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the worker: one cell in a fresh process ----------------------------------------------------------

def load_stats(path: Path):
    from kroncompress.calibration import CalibrationStats

    return CalibrationStats.load(path), json.loads(path.with_suffix(".json").read_text())["seconds"]


def calibrate(path: Path, tokens: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kroncompress as kc
    from kroncompress.calibration import calibrate as run

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    the_plan = kc.plan(model, recipe("svd", {"ratio": 2}, "all"))
    start = time.perf_counter()
    stats = run(model, the_plan, tokenizer, data={"files": [str(TRAIN)]}, tokens=tokens, block_size=256, batch_size=4)
    seconds = time.perf_counter() - start
    stats.save(path)
    path.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "tokens": tokens}))


def worker(cell: str, layers: str, stats_path: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import kroncompress as kc

    torch.set_num_threads(2)
    _, strategy, options = CELLS[cell]
    stats, calibration_seconds = load_stats(stats_path)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    start = time.perf_counter()
    report = kc.compress(model, recipe(strategy, options, layers, cell.endswith("-mlp")), calibration=stats)
    seconds = time.perf_counter() - start
    rows = report.rows
    shapes: dict[str, int] = {}
    for row in rows:
        key = json.dumps(row.spec, sort_keys=True)
        shapes[key] = shapes.get(key, 0) + 1
    return {"cell": cell, "layers": layers, "seconds": seconds, "matrices": len(rows),
            "params_before": sum(r.params_before for r in rows), "params_after": sum(r.params_after for r in rows),
            "werr": sum(r.rel_error for r in rows) / len(rows), "oerr": sum(r.output_error for r in rows) / len(rows),
            "oerr_by_module": {r.name: r.output_error for r in rows}, "calibration_seconds": calibration_seconds,
            "shapes": shapes, "load": os.getloadavg()[0], "when": dt.datetime.now(dt.timezone.utc).isoformat()}


# -- the driver ---------------------------------------------------------------------------------------

def old_tree() -> Path:
    target = Path(tempfile.gettempdir()) / f"kc-old-{OLD_COMMIT}"
    if not (target / "kroncompress").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, "kroncompress"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def run_cell(cell: str, layers: str, stats_path: Path, timeout: float) -> dict:
    code = CELLS[cell][0]
    env = dict(os.environ, PYTHONPATH=str(old_tree() if code == "old" else ROOT), OMP_NUM_THREADS="2")
    # the script itself from this checkout (in --worker mode), the package from the tree of its cell
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", cell, layers, str(stats_path)]
    try:
        out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"cell": cell, "layers": layers, "timeout": timeout, "load": os.getloadavg()[0],
                "when": dt.datetime.now(dt.timezone.utc).isoformat()}
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"cell {cell} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def write_report(path: Path, results: list[dict], command: str) -> None:
    timed_out = [r for r in results if "timeout" in r]
    results = [r for r in results if "timeout" not in r]
    by_cell = {r["cell"]: r for r in results}
    svd = by_cell.get("svd-whitened")
    any_row = results[0]
    lines = [
        "# Compress wall time: Kronecker (shape search + ALS) vs whitened SVD on Gemma 3 270M", "",
        f"Regenerate: `{command}`", "",
        f"- model: {MODEL.name} (Gemma3ForCausalLM, float32), blocks `{any_row['layers']}`, every q/k/v/o and "
        "gate/up/down projection at ratio 2 (explicit regex targets); `-mlp` cells: gate/up/down only, at the "
        "cell's ratio",
        f"- calibration: 16,384 tokens of english/train.jsonl, block 256, one teacher pass: "
        f"{any_row['calibration_seconds']:.0f} s (run once; every cell below uses the same cached statistics)",
        "- each cell: a fresh process, `kc.compress(model, recipe, calibration=stats)` timed (plan with the "
        "shape search, decompose, module swap), under /tmp/kc-heavy.lock, torch on 2 threads; "
        f"`-old` cells run the code at commit {OLD_COMMIT} (before the change), from `git archive`",
        "- werr / oerr: mean over matrices of ||W - W^|| / ||W|| and the relative output error on the calibration "
        "statistics (docs/dataaware.md)", "",
        "| cell | code | matrices | params after / before | compress s | x whitened SVD | werr | oerr | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = by_cell.get("svd-mlp") if r["cell"].endswith("-mlp") else svd  # whitened SVD on the same matrices
        ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "n/a"
        lines.append(f"| {r['cell']} | {CELLS[r['cell']][0]} | {r['matrices']} | {r['params_after']:,} / "
                     f"{r['params_before']:,} | {r['seconds']:.1f} | {ratio} | {r['werr']:.4f} | {r['oerr']:.4f} | "
                     f"{r['load']:.1f} |")
    for r in timed_out:
        lines.append(f"| {r['cell']} | {CELLS[r['cell']][0]} | | | > {r['timeout']:.0f} (stopped) | | | | {r['load']:.1f} |")
    for prefix in ("kron", "kron1"):
        old, new = by_cell.get(f"{prefix}-old"), by_cell.get(f"{prefix}-new")
        if old and new:
            lines += ["", comparison(prefix, old, new)]
    single, auto = by_cell.get("kron1-mlp"), by_cell.get("kron-auto-mlp")
    if single and auto:
        lines += ["", guard_check(single, auto)]
    lines += ["", "Shapes chosen (spec: matrices):", ""]
    for r in results:
        lines.append(f"- {r['cell']}: " + "; ".join(f"`{k}` x{v}" for k, v in sorted(r["shapes"].items(), key=lambda kv: -kv[1])[:12]))
    path.write_text("\n".join(lines) + "\n")


def guard_check(single: dict, auto: dict) -> str:
    """Issue 24's guard: at the same ratio, `rank: auto` never ends worse than its own one-term layout."""
    worse = {name: (auto["oerr_by_module"][name], e) for name, e in single["oerr_by_module"].items()
             if auto["oerr_by_module"].get(name, float("inf")) > e * (1 + 1e-3)}
    better = sum(auto["oerr_by_module"][name] < e * (1 - 1e-3) for name, e in single["oerr_by_module"].items()
                 if name in auto["oerr_by_module"])
    return (f"The shape search's guard, MLP matrices at ratio 2: `rank: auto` ends with a higher output error than the "
            f"one-term layout (relative tolerance 1e-3) in {len(worse)} of {len(single['oerr_by_module'])} matrices, "
            f"lower in {better}; mean oerr {auto['oerr']:.4f} vs {single['oerr']:.4f}; "
            f"{auto['seconds']:.0f} s vs {single['seconds']:.0f} s"
            + (": " + ", ".join(f"{k} {a:.4f} vs {b:.4f}" for k, (a, b) in list(worse.items())[:5]) if worse else "."))


def comparison(prefix: str, old: dict, new: dict) -> str:
    """How much faster the new code is, and in which modules its output error is higher."""
    worse = {name: (new["oerr_by_module"][name], e) for name, e in old["oerr_by_module"].items()
             if new["oerr_by_module"].get(name, float("inf")) > e * (1 + 1e-6) + 1e-9}
    return (f"{prefix}-new vs {prefix}-old: {old['seconds'] / new['seconds']:.2f}x faster; per-module output error "
            f"higher than the old code's (relative tolerance 1e-6) in {len(worse)} of {len(old['oerr_by_module'])} "
            "modules" + (": " + ", ".join(f"{k} {a:.6f} vs {b:.6f}" for k, (a, b) in list(worse.items())[:5])
                         if worse else "."))

def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # one cell in a fresh process (run_cell): CELL LAYERS STATS
        cell, layers, stats = sys.argv[2:5]
        print("RESULT", json.dumps(worker(cell, layers, Path(stats))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/compress-time.md"))
    parser.add_argument("--layers", default="all", help="'all' or a range of block indices such as 0-2")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated, from: " + ", ".join(CELLS))
    parser.add_argument("--stats", default=str(STATS), help="cached calibration statistics (made when missing)")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds a cell may run (then reported as > that)")
    parser.add_argument("--no-lock", action="store_true", help="the caller already holds /tmp/kc-heavy.lock")
    args = parser.parse_args()
    stats_path = Path(args.stats)
    lock = contextlib.nullcontext if args.no_lock else heavy_lock
    if not stats_path.exists():
        with lock():
            calibrate(stats_path, args.tokens)
    output = Path(args.output)
    cache = output.with_suffix(".jsonl")
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    results = []
    for cell in args.cells.split(","):
        hit = next((r for r in done if r["cell"] == cell and r["layers"] == args.layers), None)
        if hit is None:
            with lock():
                hit = run_cell(cell, args.layers, stats_path, args.timeout)
            with cache.open("a") as handle:
                handle.write(json.dumps(hit) + "\n")
        print(f"{cell}: " + (f"timed out after {hit['timeout']:.0f} s" if "timeout" in hit else
                             f"{hit['seconds']:.1f} s, {hit['matrices']} matrices, oerr {hit['oerr']:.4f}"), flush=True)
        results.append(hit)
    command = "python benchmarks/bench_compress_time.py " + " ".join(sys.argv[1:])
    write_report(output, results, command.strip())


if __name__ == "__main__":
    main()
