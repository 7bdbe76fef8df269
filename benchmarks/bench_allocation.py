"""The best student at every budget (issue 24): one global budget against one uniform ratio, the refit after
truncation, and sequential calibration, for whitened SVD and for Kronecker, zero-shot and after a short ILKD.

Every attention and MLP matrix of every block is compressed so that together they keep a fraction (80%, 2/3,
1/2; the demo also 1/4, 1/8) of their weight parameters. A cell is one way to get there:

- family: `svd` (whitened SVD), `kronecker` (ALS on the activations), `mixed` (each module svd, kronecker or
  dense, whichever the allocation picks; global only);
- alloc: `uniform` (one ratio for every matrix: svd at rank keep*m*n/(m+n); kronecker at ratio 1/keep with the
  shape search's `rank: auto` where the ratio is below 2, one term at 2 and above, as bench_gemma), `global`
  (kroncompress.budget's allocation over each module's measured error curve, weighted by its measured
  sensitivity), `global-s1` (the same without sensitivity, every s = 1);
- stats: `parallel` (every module's statistics from the original model) or `sequential` (group by group, the
  modules before already compressed: kroncompress.sequential);
- refit: on or off (kroncompress.refit; with parallel statistics the whitened SVD is already the least-squares
  optimum, so only the report's output errors before/after are shown there);
- steps: 0 (zero-shot) or the ILKD budget (12 steps on Gemma, 40 on the demo), from the same start.

The curves (every module's svd spectrum and Kronecker candidates), the statistics and the sensitivities are
computed once and cached beside the cells, with the seconds each took; cells append to
`<output stem>.cells.jsonl` and are reused.

    python benchmarks/bench_allocation.py --model gemma --output benchmarks/results/allocation-gemma.md \\
        --cells "svd|uniform|parallel|refit|2/3|0,svd|global|parallel|refit|2/3|12"
    python benchmarks/bench_allocation.py --model demo --output benchmarks/results/allocation-demo.md --cells all
    python benchmarks/bench_allocation.py ... --report-only
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import LMProtocol, save_figure, write_atomic

import kroncompress as kc
from kroncompress.budget import Choice, module_candidates
from kroncompress.calibration import CalibrationStats
from kroncompress.distill import distill
from kroncompress.layers.base import dense_weight_of
from kroncompress.linalg.allocation import Candidate, allocate
from kroncompress.sensitivity import measure_sensitivity
from kroncompress.sequential import SequentialStatistics

KEEP = {"80%": 0.8, "2/3": 2 / 3, "1/2": 0.5, "1/4": 0.25, "1/8": 0.125}
FAMILIES = ("svd", "kronecker", "mixed")
ALLOCS = ("uniform", "global", "global-s1")


@dataclass(frozen=True)
class Cell:
    family: str
    alloc: str
    stats: str
    refit: bool
    keep: str
    steps: int

    @property
    def key(self) -> str:
        return "|".join([self.family, self.alloc, self.stats, "refit" if self.refit else "norefit", self.keep,
                         str(self.steps)])

    @classmethod
    def parse(cls, key: str) -> "Cell":
        family, alloc, stats, refit, keep, steps = key.split("|")
        if family not in FAMILIES or alloc not in ALLOCS or stats not in ("parallel", "sequential") \
                or refit not in ("refit", "norefit") or keep not in KEEP:
            raise SystemExit(f"--cells: cannot read {key!r}; write family|alloc|stats|refit|keep|steps, e.g. "
                             "svd|global|parallel|refit|2/3|0")
        if family == "mixed" and alloc == "uniform":
            raise SystemExit(f"--cells: {key!r}: `mixed` exists only with a global allocation")
        return cls(family, alloc, stats, refit == "refit", keep, int(steps))


# -- what is computed once -------------------------------------------------------------------------

def block_matrices(model) -> list[str]:
    recipe = kc.Recipe.from_dict({"version": 1, "name": "all-blocks", "compress": [
        {"targets": ["role:attention", "role:mlp"], "strategy": "svd", "options": {"rank": 1}}]})
    return [row.name for row in kc.plan(model, recipe).rows]


def weight_of(model, name) -> torch.Tensor:
    return dense_weight_of(dict(model.named_modules())[name])[0].detach()


class Shared:
    """Statistics, sensitivities and curves of the teacher, each computed once and cached on disk."""

    def __init__(self, protocol: LMProtocol, stem: Path):
        self.protocol, self.stem = protocol, stem
        self.names = block_matrices(protocol.teacher)
        self.weights = {n: weight_of(protocol.teacher, n) for n in self.names}
        self.seconds = json.loads(self._path("seconds.json").read_text()) if self._path("seconds.json").exists() else {}
        self._stats = None
        self._curves: dict[str, dict] = {}

    def _path(self, suffix: str) -> Path:
        return self.stem.with_name(f"{self.stem.name}.{suffix}")

    def _timed(self, what: str, seconds: float) -> None:
        self.seconds[what] = round(seconds, 2)
        write_atomic(self._path("seconds.json"), json.dumps(self.seconds, indent=1))

    @property
    def stats(self) -> CalibrationStats:
        if self._stats is None:
            path = self._path("stats.safetensors")
            if path.exists():
                self._stats = CalibrationStats.load(path)
            else:
                t = time.perf_counter()
                stats = kc.collect_statistics(self.protocol.teacher, self.protocol.blocks, self.names)
                self._timed("calibrate_s", time.perf_counter() - t)
                t = time.perf_counter()
                stats.sensitivity = measure_sensitivity(self.protocol.teacher, self.protocol.blocks, self.names)
                self._timed("sensitivity_s", time.perf_counter() - t)
                stats.save(path)
                self._stats = stats
        return self._stats

    def curves(self, structure: str) -> dict[str, list[tuple[Choice, int, float]]]:
        """name -> [(choice, params, unweighted squared output error)] of one structure (svd or kronecker)."""
        if structure not in self._curves:
            path = self._path(f"curves-{structure}.json")
            if path.exists():
                raw = json.loads(path.read_text())
            else:
                raw, t = {}, time.perf_counter()
                for i, name in enumerate(self.names):
                    found = module_candidates(self.weights[name], self.stats.matrix(name), 1.0, (structure,))
                    raw[name] = [[c.label.strategy, [[k, v] for k, v in c.label.options], c.params, c.error]
                                 for c in found if c.label.strategy != "dense"]
                    print(f"  curves {structure}: {i + 1}/{len(self.names)} {name}", flush=True)
                self._timed(f"curves_{structure}_s", time.perf_counter() - t)
                write_atomic(path, json.dumps(raw))
            self._curves[structure] = {
                name: [(Choice(s, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in opts)), p, e)
                       for s, opts, p, e in points] for name, points in raw.items()}
        return self._curves[structure]


# -- one cell ----------------------------------------------------------------------------------------

def allocated_rules(shared: Shared, cell: Cell) -> tuple[list[dict], float]:
    structures = ("svd", "kronecker") if cell.family == "mixed" else (cell.family,)
    sens = shared.stats.sensitivity if cell.alloc == "global" else None
    curves = {}
    for name in shared.names:
        m, n = shared.weights[name].shape
        s = 1.0 if sens is None else float(sens[name])
        curves[name] = [Candidate(m * n, 0.0, Choice("dense"))] + [
            Candidate(p, s * e, choice) for structure in structures for choice, p, e in shared.curves(structure)[name]]
    dense = sum(W.numel() for W in shared.weights.values())
    t = time.perf_counter()
    result = allocate(curves, int(KEEP[cell.keep] * dense))
    seconds = time.perf_counter() - t
    rules = []
    for name, picked in result.choice.items():
        if picked.label.strategy == "dense":
            continue
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in picked.label.options}
        options["init"] = "whitened" if picked.label.strategy == "svd" else "als"
        rules.append({"targets": [name], "strategy": picked.label.strategy, "options": options})
    return rules, seconds


def uniform_rules(shared: Shared, cell: Cell) -> list[dict]:
    keep = KEEP[cell.keep]
    if cell.family == "kronecker":
        ratio = 1 / keep
        options = {"ratio": round(ratio, 6), "init": "auto"} | ({"rank": "auto"} if ratio < 2 else {})
        return [{"targets": shared.names, "strategy": "kronecker", "options": options}]
    rules = []
    for name in shared.names:
        m, n = shared.weights[name].shape
        rank = max(1, int(keep * m * n / (m + n)))
        rules.append({"targets": [name], "strategy": "svd", "options": {"rank": rank, "init": "whitened"}})
    return rules


def run_cell(cell: Cell, shared: Shared, protocol: LMProtocol) -> dict:
    timings = {}
    if cell.alloc == "uniform":
        rules = uniform_rules(shared, cell)
    else:
        rules, timings["allocate_s"] = allocated_rules(shared, cell)
    recipe = kc.Recipe.from_dict({"version": 1, "name": cell.key.replace("|", "-").replace("/", "of").replace("%", "pct"),
                                  "compress": rules, "ignore": protocol.ignore, "distill": protocol.distill_config})
    student = copy.deepcopy(protocol.teacher)
    sequential = SequentialStatistics(protocol.teacher, protocol.blocks) if cell.stats == "sequential" else None
    t = time.perf_counter()
    report = kc.compress(student, recipe, calibration=shared.stats, refit=cell.refit, sequential=sequential)
    timings["compress_s"] = time.perf_counter() - t
    modules = dict(student.named_modules())
    params = sum(p.numel() for n in shared.names for name_p, p in modules[n].named_parameters() if name_p != "bias")
    errors = [(r.output_error_before_refit, r.output_error) for r in report.rows if r.output_error is not None]
    strategies: dict[str, int] = {}
    for row in report.rows:
        strategies[row.strategy] = strategies.get(row.strategy, 0) + 1
    dense_kept = len(shared.names) - sum(strategies.values())
    if dense_kept:
        strategies["dense"] = dense_kept
    t = time.perf_counter()
    row = {**asdict(cell), "key": cell.key, "params": params, "zero_shot": protocol.perplexity(student),
           "strategies": strategies,
           "output_error": sum(a for _, a in errors) / max(len(errors), 1),
           "output_error_before_refit": sum((b if b is not None else a) for b, a in errors) / max(len(errors), 1)}
    timings["eval_s"] = time.perf_counter() - t
    if cell.steps:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            distill(student, protocol.teacher, recipe.distill, protocol.train, output_dir=tmp, max_steps=cell.steps,
                    progress=False, tokenizer=protocol.tokenizer)
        timings["distill_s"] = time.perf_counter() - t
        row["distilled"] = protocol.perplexity(student)
    if sequential is not None:
        timings["sequential_passes"] = sequential.passes
    # the process's peak resident memory so far (Linux: KiB): the teacher, a student copy and the statistics
    timings["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row.update(timings)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


# -- the report --------------------------------------------------------------------------------------

def write_report(out: Path, rows: dict, teacher: dict, shared_seconds: dict, args, protocol_text: str,
                 name: str) -> None:
    cells = [r for k, r in rows.items() if k != "teacher"]
    order = {k: i for i, k in enumerate(KEEP)}
    cells.sort(key=lambda r: (order[r["keep"]], FAMILIES.index(r["family"]), ALLOCS.index(r["alloc"]), r["stats"],
                              not r["refit"], r["steps"]))
    base = {r["keep"]: r for r in cells if r["family"] == "svd" and r["alloc"] == "uniform"
            and r["stats"] == "parallel"}
    lines = [f"# One global budget, the refit and sequential calibration: {name}", "",
             f"Written by `python benchmarks/bench_allocation.py --model {args.model} --output {args.output}` "
             f"(cells cached in `{out.with_suffix('.cells.jsonl').name}`); {platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"Teacher perplexity {teacher['perplexity']:.2f}; {protocol_text}. Every attention and MLP matrix of "
             f"every block is compressed; `params` counts their weights ({teacher['dense']:,} dense). "
             "`vs uniform`: zero-shot perplexity against whitened SVD at one uniform ratio with parallel "
             "statistics, the same keep. `out err`: mean relative output error of the compressed modules on "
             "their calibration statistics after the refit (before it in brackets).", "",
             "Computed once for every cell: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s"
                                                            for k, v in shared_seconds.items()) + ".", "",
             "| keep | family | alloc | stats | refit | params | zero-shot | vs uniform | after ILKD | out err | "
             "modules | allocate s | compress s | distill s |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in cells:
        b = base.get(r["keep"])
        gain = f"{100 * (r['zero_shot'] / b['zero_shot'] - 1):+.1f}%" if b else ""
        after = f"{r['distilled']:.2f} ({r['steps']} steps)" if "distilled" in r else ""
        mix = ", ".join(f"{k} {v}" for k, v in sorted(r["strategies"].items()))
        lines.append(f"| {r['keep']} | {r['family']} | {r['alloc']} | {r['stats']} | {'on' if r['refit'] else 'off'} | "
                     f"{r['params']:,} | {r['zero_shot']:.2f} | {gain} | {after} | {r['output_error']:.3f} "
                     f"({r['output_error_before_refit']:.3f}) | {mix} | {r.get('allocate_s', 0):.1f} | "
                     f"{r['compress_s']:.0f} | {r.get('distill_s', 0):.0f} |")
    write_atomic(out, "\n".join(lines) + "\n")
    plot(out, cells, teacher)
    print("\n".join(lines))


def plot(out: Path, cells: list[dict], teacher: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for axis, field, title in ((axes[0], "zero_shot", "zero-shot"), (axes[1], "distilled", "after ILKD")):
        series: dict[str, list] = {}
        for r in cells:
            if field in r:
                label = f"{r['family']} {r['alloc']} {r['stats']}{'' if r['refit'] else ' no refit'}"
                series.setdefault(label, []).append((100 * r["params"] / teacher["dense"], r[field]))
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(set(points)))
            axis.plot(xs, ys, marker="o", label=label)
        axis.axhline(teacher["perplexity"], color="grey", linestyle=":", label="teacher")
        axis.set_yscale("log")
        axis.set_xlabel("block matrix parameters kept (%)")
        axis.set_ylabel("perplexity")
        axis.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("demo", "gemma"), default="demo")
    parser.add_argument("--cells", default="", help="comma-separated cell keys (family|alloc|stats|refit|keep|steps)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--rerun", action="store_true", help="run the --cells again even where cached (the new row wins)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/allocation-demo.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells_path = args.output.with_suffix(".cells.jsonl")
    cells_path.parent.mkdir(parents=True, exist_ok=True)
    rows = {}
    if cells_path.exists():
        for line in cells_path.read_text().splitlines():
            row = json.loads(line)
            rows[row["key"]] = row
    wanted = [Cell.parse(k) for k in args.cells.split(",") if k] if not args.report_only else []
    protocol = LMProtocol(args.model, args.eval_tokens, args.calibration_tokens)
    stem = args.output.with_suffix("")
    shared = Shared(protocol, stem)
    if "teacher" not in rows:
        rows["teacher"] = {"key": "teacher", "perplexity": protocol.perplexity(protocol.teacher),
                           "dense": sum(W.numel() for W in shared.weights.values())}
        with cells_path.open("a") as f:
            f.write(json.dumps(rows["teacher"]) + "\n")
    for cell in wanted:
        if cell.key in rows and not args.rerun:
            continue
        print(f"cell {cell.key} ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = run_cell(cell, shared, protocol)
        row.update(threads=args.threads, machine=platform.machine())
        print(json.dumps(row), flush=True)
        with cells_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows[cell.key] = row
    write_report(args.output, rows, rows["teacher"], shared.seconds, args, protocol.text, protocol.name)


if __name__ == "__main__":
    main()
