"""Why does a better start not stay better after ILKD? (issue 24, item 4). A small sweep over what the
recovery does with each family's factors, from the same compressed start:

- `default`: the protocol's ILKD as it is (Gemma: recipes/kron-gemma.yaml's losses, lr 1e-4; demo: kn-gpt2's);
- `lr x0.3`, `lr x3`: the learning rate scaled;
- `wd 0.01`: weight decay on every trainable tensor;
- `logits only`: only the CE and logits-KL losses (no attention KL, no hidden MSE);
- `rms-balanced`: before training, each term's two factors rescaled (W unchanged) so that their entries
  have the same root mean square. Adam moves every entry by about lr whatever its size, so a factor whose
  entries are small (the large B of a Kronecker term with a small A, when the init balances Frobenius norms)
  changes relatively much faster than its partner; this gives both the same relative step.

Families: whitened SVD and Kronecker (ALS on the activations; `rank: auto` below ratio 2), every attention
and MLP matrix at `--keep` of its parameters, parallel statistics, refit on.

    python benchmarks/bench_recovery.py --model demo --keep 1/4 --output benchmarks/results/recovery-demo.md
    python benchmarks/bench_recovery.py --model gemma --keep 2/3 --variants default,rms-balanced \\
        --output benchmarks/results/recovery-gemma.md
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import LMProtocol, write_atomic

import kroncompress as kc
from kroncompress.calibration import CalibrationStats
from kroncompress.distill import distill
from kroncompress.layers.kronecker import KroneckerLinear
from kroncompress.layers.lowrank import LowRankLinear

KEEP = {"80%": 0.8, "2/3": 2 / 3, "1/2": 0.5, "1/4": 0.25}
VARIANTS = ("default", "rms-balanced", "lr x0.3", "lr x3", "wd 0.01", "logits only")
TARGETS = ["role:attention", "role:mlp"]


@torch.no_grad()
def rms_balance(model) -> int:
    """Rescale every factorized layer's paired factors so their entries have equal RMS; returns how many layers."""
    count = 0
    for module in model.modules():
        if isinstance(module, KroneckerLinear):
            first, second = module.a, module.b  # (r, m1, n1), (r, m2, n2): one scale per term
            ra = first.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-30)
            rb = second.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-30)
            c = (rb / ra).sqrt()
            first.mul_(c[:, None, None])
            second.div_(c[:, None, None])
            count += 1
        elif isinstance(module, LowRankLinear):
            first, second = module.u, module.v  # (m, k), (k, n): one scale per rank-one term
            ru = first.pow(2).mean(0).sqrt().clamp_min(1e-30)
            rv = second.pow(2).mean(1).sqrt().clamp_min(1e-30)
            c = (rv / ru).sqrt()
            first.mul_(c[None, :])
            second.div_(c[:, None])
            count += 1
    return count


def distill_config(protocol: LMProtocol, variant: str) -> dict:
    config = copy.deepcopy(protocol.distill_config)
    if variant.startswith("lr x"):
        config["train"]["lr"] = config["train"]["lr"] * float(variant.removeprefix("lr x"))
    elif variant == "wd 0.01":
        config["train"]["weight_decay"] = 0.01
    elif variant == "logits only":
        losses = config["losses"]
        config["losses"] = {k: (0.0 if k in ("attention_kl", "hidden_mse", "embedding_mse") else v)
                            for k, v in losses.items()}
    return config


def recipe_for(family: str, keep: float, protocol: LMProtocol, variant: str):
    ratio = round(1 / keep, 6)
    if family == "svd":
        options = {"ratio": ratio, "init": "whitened"}
    else:
        options = {"ratio": ratio, "init": "auto"} | ({"rank": "auto"} if ratio < 2 else {})
    return kc.Recipe.from_dict({"version": 1, "name": f"recovery-{family}", "ignore": protocol.ignore,
                                "compress": [{"targets": TARGETS, "strategy": family, "options": options}],
                                "distill": distill_config(protocol, variant)})


def statistics(protocol: LMProtocol, stem: Path) -> CalibrationStats:
    path = stem.with_name(f"{stem.name}.stats.safetensors")
    if path.exists():
        return CalibrationStats.load(path)
    names = [row.name for row in kc.plan(protocol.teacher, recipe_for("svd", 0.5, protocol, "default")).rows]
    stats = kc.collect_statistics(protocol.teacher, protocol.blocks, names)
    stats.save(path)
    return stats


def run_cell(family: str, variant: str, keep_name: str, steps: int, protocol: LMProtocol, stats) -> dict:
    recipe = recipe_for(family, KEEP[keep_name], protocol, variant)
    student = copy.deepcopy(protocol.teacher)
    t = time.perf_counter()
    kc.compress(student, recipe, calibration=stats)
    row = {"family": family, "variant": variant, "keep": keep_name, "steps": steps,
           "compress_s": time.perf_counter() - t}
    if variant == "rms-balanced":
        row["balanced_layers"] = rms_balance(student)
    row["zero_shot"] = protocol.perplexity(student)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = distill(student, protocol.teacher, recipe.distill, protocol.train, output_dir=tmp, max_steps=steps,
                         progress=False, tokenizer=protocol.tokenizer)
    row["distill_s"] = time.perf_counter() - t
    row["distilled"] = protocol.perplexity(student)
    row["final_losses"] = {k: round(float(v), 4) for k, v in result.final_losses.items()}
    return row


def write_report(out: Path, rows: dict, args, protocol: LMProtocol, teacher: float) -> None:
    cells = sorted((r for k, r in rows.items() if k != "teacher"),
                   key=lambda r: (r["keep"], VARIANTS.index(r["variant"]), r["family"]))
    lines = [f"# Recovery sweep: {protocol.name}", "",
             f"Written by `python benchmarks/bench_recovery.py --model {args.model} --output {args.output}` "
             f"(cells in `{out.with_suffix('.cells.jsonl').name}`); {platform.machine()}, {torch.get_num_threads()} "
             f"torch threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"Teacher perplexity {teacher:.2f}; {protocol.text}. Every attention and MLP matrix at the given keep; "
             "the variants are described in the script's docstring.", "",
             "| keep | variant | family | zero-shot | after ILKD | steps | distill s |", "|---|---|---|---:|---:|---:|---:|"]
    for r in cells:
        lines.append(f"| {r['keep']} | {r['variant']} | {r['family']} | {r['zero_shot']:.2f} | {r['distilled']:.2f} | "
                     f"{r['steps']} | {r['distill_s']:.0f} |")
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("demo", "gemma"), default="demo")
    parser.add_argument("--keep", default="1/4", choices=list(KEEP))
    parser.add_argument("--families", default="svd,kronecker")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="ILKD steps (default: 12 on Gemma, 40 on the demo)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/recovery-demo.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (12 if args.model == "gemma" else 40)
    cells_path = args.output.with_suffix(".cells.jsonl")
    cells_path.parent.mkdir(parents=True, exist_ok=True)
    rows = {}
    if cells_path.exists():
        rows = {r["key"]: r for r in map(json.loads, cells_path.read_text().splitlines())}
    protocol = LMProtocol(args.model, args.eval_tokens, args.calibration_tokens)
    if "teacher" not in rows:
        rows["teacher"] = {"key": "teacher", "perplexity": protocol.perplexity(protocol.teacher)}
        with cells_path.open("a") as f:
            f.write(json.dumps(rows["teacher"]) + "\n")
    stats = statistics(protocol, args.output.with_suffix(""))
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown {variant!r}; choose from {', '.join(VARIANTS)}")
        for family in args.families.split(","):
            key = f"{family}|{variant}|{args.keep}|{steps}"
            if key in rows:
                continue
            print(f"cell {key} ...", flush=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row = run_cell(family, variant, args.keep, steps, protocol, stats)
            row.update(key=key, threads=args.threads)
            row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            print(json.dumps(row), flush=True)
            with cells_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows[key] = row
    write_report(args.output, rows, args, protocol, rows["teacher"]["perplexity"])


if __name__ == "__main__":
    main()
