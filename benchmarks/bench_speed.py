"""Speed benchmark: whole-model throughput of compressed models vs the original, side by side in one run.

Two models: the packaged demo teacher with every bundled recipe at the kn-gpt2 budget, and a
GPT-2-small-shaped model (random weights, the real 124M shapes) with kn-gpt2, svd-gpt2 and distilgpt2 vs
dense, since the demo teacher is small and a GPT-2 user sees the second ratio. Each variant is measured
for forward throughput (8 x 128 tokens) and batch-1 greedy generation (KV cache), on CPU and on CUDA
when there is a GPU. Rounds interleave the variants so drifting machine load hits them alike; the
median over rounds is reported, with the ratio to the original, the parameter ratio and the ratio of
matrix-multiply FLOPs per token (what an ideal kernel would gain).

    python benchmarks/bench_speed.py --output benchmarks/results/speed.md [--rounds 5] [--threads N]

Speed depends only on shapes, so the variants are decomposed weight-only and not distilled.

A third table compares generation of one compressed model in memory with the same model saved and
reloaded (from_pretrained, kc.load_compressed, and its dense export), after a short distillation as the
pipeline runs one (training turns the KV cache off and switches to eager attention; a saved model must
generate as fast as the one in memory). `--saved-only` measures just that table and rewrites it in place
in an existing report:

    python benchmarks/bench_speed.py --saved-only --output benchmarks/results/speed.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import kroncompress as kc
from common import Cell, cell_recipe, main_keep, num_layers_of, save_figure, write_atomic
from kroncompress.evaluate import generation_throughput, max_positions, throughput
from kroncompress.layers import FactorizedLinear, KroneckerTiedHead

DEMO_RECIPES = ("kn-gpt2", "kn-gpt2-mlp", "svd-gpt2", "tucker-gpt2", "tt-gpt2", "distilgpt2")
GPT2_SMALL_RECIPES = DEMO_RECIPES
# variants also timed with every factorised layer in forward_mode "dense" (W built once: memory for speed)
DENSE_MODE_RECIPES = ("tucker-gpt2", "tt-gpt2")


def matmul_flops_per_token(model: nn.Module) -> int:
    """FLOPs per token of the model's weight matrices (linear maps and the LM head); attention scores and
    elementwise work are left out (they are the same for every factorisation)."""
    total = 0
    for module in model.modules():
        if isinstance(module, FactorizedLinear):
            total += module.dense_flops_per_token() if module.forward_mode == "dense" else module.flops_per_token()
        elif isinstance(module, KroneckerTiedHead):
            total += module.tied_to.projection_flops_per_token()
        elif isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            total += 2 * module.weight.numel()
    return total


def matmul_kernels(model: nn.Module) -> int:
    """Matrix-product kernels per forward over the weight matrices: 1 per dense matrix, and per factorised
    layer the contractions its factored forward runs (low-rank, Kronecker, CP: 2; Tucker: 2 d + 1; TT: d)."""
    from kroncompress.layers import CPLinear, KroneckerLinear, LowRankLinear, TTLinear, TuckerLinear

    total = 0
    for module in model.modules():
        if isinstance(module, FactorizedLinear):
            if module.forward_mode == "dense" or isinstance(module, (LowRankLinear, KroneckerLinear, CPLinear)):
                total += 1 if module.forward_mode == "dense" else 2
            elif isinstance(module, TuckerLinear):
                total += 2 * len(module.out_shape) + 1
            elif isinstance(module, TTLinear):
                total += len(module.out_shape)
        elif isinstance(module, KroneckerTiedHead):
            total += 2
        elif isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            total += 1
    return total


def dense_mode_copy(model: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, FactorizedLinear):
            module.forward_mode = "dense"
    return model


def variant_recipe(recipe: str, num_layers: int) -> dict:
    """The bundled recipe as the quality benchmark runs it at the kn-gpt2 budget (distilgpt2 keeps 2/3 of the blocks)."""
    layout = f"keep {main_keep(num_layers)}" if recipe == "distilgpt2" else "recipe"
    return cell_recipe(Cell(recipe, layout, "weight-only", 0), num_layers)


def build_variants(name: str, original: nn.Module, recipes: tuple[str, ...], num_layers: int) -> list[tuple[str, nn.Module]]:
    import copy

    variants = [("original", original)]
    for recipe in recipes:
        model = copy.deepcopy(original)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kc.compress(model, variant_recipe(recipe, num_layers))
        print(f"{name}: {recipe} compressed in {time.perf_counter() - start:.1f} s", flush=True)
        variants.append((recipe, model.eval()))
        if recipe in DENSE_MODE_RECIPES:
            variants.append((f"{recipe}, forward_mode dense", dense_mode_copy(model).eval()))
    return variants


def gpt2_small(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config()).eval()


def measure(variants: list[tuple[str, nn.Module]], device: torch.device, rounds: int, batch: int, seq_len: int,
            new_tokens: int, forward_repeats: int) -> list[dict]:
    """Median tokens/s over `rounds` interleaved rounds, forward and generation, for each variant."""
    forward = {name: [] for name, _ in variants}
    generate = {name: [] for name, _ in variants}
    for name, model in variants:
        model.to(device)
    for _ in range(rounds):
        for name, model in variants:
            forward[name].append(throughput(model, batch_size=batch, seq_len=seq_len, repeats=forward_repeats,
                                            warmup=1, device=device))
            generate[name].append(generation_throughput(model, new_tokens=new_tokens, repeats=1, warmup=1, device=device))
    rows = []
    for name, model in variants:
        rows.append({"variant": name, "params": sum(p.numel() for p in model.parameters()),
                     "flops": matmul_flops_per_token(model), "kernels": matmul_kernels(model),
                     "forward": statistics.median(forward[name]), "forward_spread": _spread(forward[name]),
                     "generate": statistics.median(generate[name]), "generate_spread": _spread(generate[name])})
        model.to("cpu")
    return rows


def compiled_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose forward is `torch.compile`d (inductor, dynamic shapes): its own calls and
    `generate()`, which calls forward at every step, both run the compiled graphs."""
    import copy

    fast = copy.deepcopy(model)
    fast.forward = torch.compile(fast.forward, dynamic=True)
    return fast


def measure_compiled(variants: list[tuple[str, nn.Module]], args) -> list[dict]:
    """Forward and generation tokens/s, eager vs compiled, interleaved rounds; the compile time of each
    (the first call of each, less a warm one) and the largest logit difference."""
    torch._dynamo.reset()
    compiled_models = []
    for name, model in variants:
        fast = compiled_copy(model)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            start = time.perf_counter()
            got = fast(input_ids=ids).logits
            first = time.perf_counter() - start
            start = time.perf_counter()
            fast(input_ids=ids)
            forward_compile = first - (time.perf_counter() - start)
            diff = (got - model(input_ids=ids).logits).abs().max().item()
        start = time.perf_counter()
        generation_throughput(fast, new_tokens=args.new_tokens, repeats=1, warmup=0)
        first = time.perf_counter() - start
        generate_compile = first - args.new_tokens / generation_throughput(fast, new_tokens=args.new_tokens, repeats=1, warmup=0)
        print(f"compiled {name}: forward {forward_compile:.0f} s, generation {generate_compile:.0f} s "
              f"(max logit difference {diff:.1e})", flush=True)
        compiled_models.append((name, model, fast, forward_compile, generate_compile, diff))
    timings = {(name, kind): [] for name, *_ in compiled_models
               for kind in ("forward eager", "forward compiled", "generate eager", "generate compiled")}
    for _ in range(args.rounds):
        for name, model, fast, *_ in compiled_models:
            for label, m in (("eager", model), ("compiled", fast)):
                timings[(name, f"forward {label}")].append(
                    throughput(m, batch_size=args.batch, seq_len=args.seq_len, repeats=args.forward_repeats, warmup=1))
                timings[(name, f"generate {label}")].append(
                    generation_throughput(m, new_tokens=args.new_tokens, repeats=1, warmup=1))
    return [{"variant": name, **{kind: statistics.median(timings[(name, kind)])
                                 for kind in ("forward eager", "forward compiled", "generate eager", "generate compiled")},
             "forward_compile_s": fc, "generate_compile_s": gc, "diff": diff}
            for name, _, _, fc, gc, diff in compiled_models]


def compiled_table(rows: list[dict], args) -> list[str]:
    base = rows[0]
    lines = ["### torch.compile (inductor, CPU), the small model", "",
             f"Eager vs a copy whose `forward` is `torch.compile(forward, dynamic=True)` (generate() runs it at every "
             f"step). Forward: {args.batch} x {args.seq_len} tokens; generation: greedy, batch 1, {args.new_tokens} new "
             f"tokens. Median of {args.rounds} interleaved rounds; 'vs eager original' divides by the eager "
             "original's tokens/s. Compile s: the first call less a warm one.", "",
             "| variant | forward eager tok/s | forward compiled tok/s | compiled / eager | vs eager original | "
             "generation eager tok/s | generation compiled tok/s | compiled / eager | vs eager original | "
             "compile s (fwd / gen) | max logit diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['forward eager']:,.0f} | {row['forward compiled']:,.0f} | "
            f"{row['forward compiled'] / row['forward eager']:.2f}x | {row['forward compiled'] / base['forward eager']:.2f}x | "
            f"{row['generate eager']:,.1f} | {row['generate compiled']:,.1f} | "
            f"{row['generate compiled'] / row['generate eager']:.2f}x | {row['generate compiled'] / base['generate eager']:.2f}x | "
            f"{row['forward_compile_s']:.0f} / {row['generate_compile_s']:.0f} | {row['diff']:.1e} |")
    cuda = "" if torch.cuda.is_available() else " CUDA was not measured (no GPU on this machine)."
    return lines + ["", f"Compiled on CPU only.{cuda}", ""]


def _spread(values: list[float]) -> float:
    """(max - min) / median: how much the rounds disagree."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def why_slower(row: dict, base: dict, what: str) -> str:
    """The number behind a speed-up < 1.0x: more matmul FLOPs per token than the original, or (fewer FLOPs,
    fewer weight bytes) more, smaller matmul kernels per forward, whose fixed cost dominates at small widths
    and at batch 1 (generation reads each weight once per token: bytes ~ parameters)."""
    speed = row[what] / base[what]
    if speed >= 1.0:
        return ""
    if row["flops"] > base["flops"]:
        return f"{what}: {row['flops'] / base['flops']:.2f}x the FLOPs"
    if row["kernels"] <= base["kernels"]:
        return f"{what}: no more FLOPs or kernels than the original: measurement noise (see the spread)"
    return (f"{what}: {base['flops'] / row['flops']:.2f}x fewer FLOPs, {base['params'] / row['params']:.2f}x fewer weight bytes, "
            f"but {row['kernels'] / base['kernels']:.2f}x the matmul kernels ({row['kernels']} vs {base['kernels']})")


def table(title: str, rows: list[dict], batch: int, seq_len: int, new_tokens: int) -> list[str]:
    base = rows[0]
    lines = [f"### {title}", "",
             f"| variant | parameters | params ratio | matmul FLOPs/token ratio | forward tokens/s ({batch} x {seq_len}) | "
             f"forward speed-up | generation tokens/s (batch 1, {new_tokens} new) | generation speed-up | round-to-round spread (fwd / gen) | why < 1.0x |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        why = "; ".join(filter(None, (why_slower(row, base, "forward"), why_slower(row, base, "generate"))))
        lines.append(f"| {row['variant']} | {row['params']:,} | {base['params'] / row['params']:.2f}x | "
                     f"{base['flops'] / row['flops']:.2f}x | {row['forward']:,.0f} | {row['forward'] / base['forward']:.2f}x | "
                     f"{row['generate']:,.1f} | {row['generate'] / base['generate']:.2f}x | "
                     f"{row['forward_spread']:.0%} / {row['generate_spread']:.0%} | {why} |")
    return lines + [""]


def plot(path: Path, sections: list[tuple[str, list[dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(6.5 * len(sections), 4.6), squeeze=False)
    for axis, (title, rows) in zip(axes[0], sections):
        base, names = rows[0], [r["variant"] for r in rows[1:]]
        x = range(len(names))
        width = 0.27
        for offset, label, values in (
            (-width, "matmul FLOP ratio (ideal)", [base["flops"] / r["flops"] for r in rows[1:]]),
            (0.0, "forward speed-up", [r["forward"] / base["forward"] for r in rows[1:]]),
            (width, "generation speed-up", [r["generate"] / base["generate"] for r in rows[1:]]),
        ):
            axis.bar([i + offset for i in x], values, width, label=label)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(list(x), names, rotation=20, fontsize=8)
        axis.set_title(title, fontsize=9)
        axis.set_ylabel("x the original")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


SAVED_START, SAVED_END = "<!-- saved-vs-memory:start -->", "<!-- saved-vs-memory:end -->"


def saved_variants(args, workdir: Path) -> list[tuple[str, nn.Module]]:
    """The original, `args.saved_recipe` of it in memory after a short distillation, and that model saved
    and reloaded three ways. Weights do not matter for speed: random token blocks are the training data."""
    import copy

    from transformers import AutoModelForCausalLM

    from kroncompress.recipe import DistillConfig, TrainConfig

    original = kc.load_model(args.model, meta_ok=False, load_tokenizer=False)[0].eval()
    compressed = copy.deepcopy(original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kc.compress(compressed, variant_recipe(args.saved_recipe, num_layers_of(args.model)))
    blocks = torch.randint(0, original.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    settings = DistillConfig(train=TrainConfig(batch_size=4, max_steps=2, lr=1e-6))
    kc.distill.distill(compressed, original, settings, blocks, output_dir=workdir / "distill", progress=False)
    saved = kc.save_compressed(compressed.eval(), workdir / "saved")
    kc.export_dense(saved, workdir / "dense")
    return [("original", original), (f"{args.saved_recipe}, in memory", compressed),
            (f"{args.saved_recipe}, saved -> AutoModelForCausalLM.from_pretrained", AutoModelForCausalLM.from_pretrained(saved).eval()),
            (f"{args.saved_recipe}, saved -> kc.load_compressed", kc.load_compressed(saved).eval()),
            (f"{args.saved_recipe}, export --dense -> from_pretrained", AutoModelForCausalLM.from_pretrained(workdir / "dense").eval())]


def measure_saved(args) -> list[dict]:
    """Generation tokens/s of `saved_variants`, median of interleaved rounds, with each model's settings."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-speed-saved-") as tmp:
        variants = saved_variants(args, Path(tmp))
    new_tokens = args.saved_new_tokens
    limit = max_positions(variants[0][1])
    if limit is not None:
        new_tokens = min(new_tokens, limit - 8)
    times = {name: [] for name, _ in variants}
    for _ in range(args.rounds):
        for name, model in variants:
            times[name].append(generation_throughput(model, new_tokens=new_tokens, repeats=1, warmup=1))
    return [{"variant": name, "use_cache": model.config.use_cache,
             "attention": getattr(model.config, "_attn_implementation", None),
             "params": sum(p.numel() for p in model.parameters()), "new_tokens": new_tokens,
             "generate": statistics.median(times[name]), "spread": _spread(times[name])} for name, model in variants]


def saved_table(rows: list[dict], args) -> list[str]:
    base, memory = rows[0]["generate"], rows[1]["generate"]
    command = f"python benchmarks/bench_speed.py {' '.join(args.argv)}"
    lines = [SAVED_START, f"### Saved vs in memory: generation of `{args.model}` and its {args.saved_recipe}, cpu", "",
             f"Measured by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f}). The compressed model had "
             "2 distillation steps before it was saved, as a pipeline run has; greedy generation at batch 1 of exactly "
             f"{rows[0]['new_tokens']} new tokens after an 8-token prompt, median of {args.rounds} interleaved rounds. "
             "`use_cache` and the attention implementation are the reloaded model's own (from its config.json).", "",
             "| model | parameters | use_cache | attention | generation tokens/s | vs original | vs in memory | spread |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['params']:,} | {row['use_cache']} | {row['attention']} | "
                     f"{row['generate']:,.1f} | {row['generate'] / base:.2f}x | {row['generate'] / memory:.2f}x | "
                     f"{row['spread']:.0%} |")
    return lines + ["", SAVED_END, ""]


def with_saved_section(report: str, section: list[str]) -> str:
    """`report` with its saved-vs-memory section replaced by `section` (inserted before the plot if absent)."""
    block = "\n".join(section)
    if SAVED_START in report and SAVED_END in report:
        head, rest = report.split(SAVED_START, 1)
        tail = rest.split(SAVED_END, 1)[1].lstrip("\n")
        return head + block + tail
    marker = "![speed-ups]("
    if marker in report:
        head, tail = report.split(marker, 1)
        return head + block + marker + tail
    return report.rstrip("\n") + "\n\n" + block


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/speed.md")
    parser.add_argument("--model", default="shakespeare-gpt2", help="the small model (a folder or the packaged demo)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant (median reported)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per batch-1 generation run")
    parser.add_argument("--forward-repeats", type=int, default=3, help="timed forward passes per round")
    parser.add_argument("--no-gpt2-small", dest="gpt2_small", action="store_false", help="skip the 124M-shaped model")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's choice)")
    parser.add_argument("--compile", nargs="*", default=None, metavar="VARIANT",
                        help="also time torch.compile (inductor) forward of these variants of the small model "
                             "(no names: original and kn-gpt2); compiling takes minutes on 2 CPU cores")
    parser.add_argument("--recipes", nargs="+", default=None, help="variants of both models (default: every bundled recipe)")
    parser.add_argument("--saved-recipe", default="kn-gpt2", help="the recipe of the saved-vs-in-memory table")
    parser.add_argument("--saved-new-tokens", type=int, default=128, help="tokens generated per run in that table")
    parser.add_argument("--no-saved", dest="saved", action="store_false", help="skip the saved-vs-in-memory table")
    parser.add_argument("--saved-only", action="store_true",
                        help="measure only the saved-vs-in-memory table and rewrite it in place in --output")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> list[tuple[str, list[dict]]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.saved_only:
        output = Path(args.output)
        section = saved_table(measure_saved(args), args)
        write_atomic(output, with_saved_section(output.read_text() if output.exists() else "", section))
        print("\n".join(section))
        return []
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    models = []
    original = kc.load_model(args.model, meta_ok=False, load_tokenizer=False)[0].eval()
    layers = num_layers_of(args.model)
    models.append((f"`{args.model}` ({layers} blocks)", build_variants(args.model, original, tuple(args.recipes or DEMO_RECIPES), layers)))
    if args.gpt2_small:
        models.append(("GPT-2-small shapes (12 blocks, random weights)",
                       build_variants("gpt2-small", gpt2_small(), tuple(args.recipes or GPT2_SMALL_RECIPES), 12)))
    sections = []
    for device in devices:
        device_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
        for title, variants in models:
            rows = measure(variants, torch.device(device), args.rounds, args.batch, args.seq_len, args.new_tokens,
                           args.forward_repeats)
            sections.append((f"{title}, {device} ({device_name})", rows))
            print(f"measured {title} on {device}", flush=True)
    compiled = []
    if args.compile is not None:
        wanted = args.compile or ["original", "kn-gpt2"]
        compiled = measure_compiled([(n, m) for n, m in models[0][1] if n in wanted], args)
    output = Path(args.output)
    lines = ["# Speed: compressed models vs the original", "",
             f"Generated by `python benchmarks/bench_speed.py {' '.join(args.argv)}` on {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at the end "
             f"{os.getloadavg()[0]:.2f}; {(time.perf_counter() - started) / 60:.1f} min.", "",
             f"Median of {args.rounds} interleaved rounds. Forward: {args.forward_repeats} timed passes of {args.batch} x "
             f"{args.seq_len} random tokens per round, eval mode, no gradients. Generation: greedy, batch 1, a prompt of 8 "
             f"tokens then exactly {args.new_tokens} new ones with the KV cache. Variants are the bundled recipes at the "
             "kn-gpt2 budget (distilgpt2: 2/3 of the blocks kept), decomposed weight-only; \"forward_mode dense\" rows "
             "are the same model with W built once per factorised layer (memory for speed: the parameter column "
             "counts the factors only, the cached W adds the original's matrix size). The FLOP ratio counts the "
             "weight matrices and the LM head only; \"why < 1.0x\" gives the number behind a slow-down: more FLOPs, "
             "or (fewer FLOPs) more matmul kernels per forward, whose fixed cost dominates at small widths and "
             "at batch 1.", ""]
    for title, rows in sections:
        lines += table(title, rows, args.batch, args.seq_len, args.new_tokens)
    if compiled:
        lines += compiled_table(compiled, args)
    if args.saved:
        lines += saved_table(measure_saved(args), args)
    lines += [f"![speed-ups]({output.with_suffix('.png').name})", ""]
    write_atomic(output, "\n".join(lines))
    plot(output.with_suffix(".png"), sections)
    print(output.read_text())
    return sections


if __name__ == "__main__":
    main()
