"""Deployment benchmark: one compressed model served four ways, greedy generation speed and logits agreement.

The packaged demo teacher compressed with kn-gpt2 (weight-only: speed depends only on shapes, and every
backend runs the same weights), then:

- eager PyTorch, `generate()` with its KV cache (what a user gets by default);
- eager PyTorch without a cache (the full sequence recomputed each step: the work the ONNX graph does);
- `torch.compile` (inductor, dynamic shapes) of the same no-cache logits function;
- onnxruntime (CPU) running the `kroncompress export --onnx` graph, driven by the same greedy loop;

and the uncompressed teacher eager with cache, for scale. All at batch size 1 with a fixed prompt, the
same fixed number of threads for torch and onnxruntime; rounds interleave the backends so machine load
hits them alike, and the median is reported. Agreement: max |logit difference| to eager on a fixed
batch, against the float32 bound of `kroncompress.io.onnx.logits_tolerance`, and whether the greedy
tokens are the same as eager's.

    flock /work/wt/heavy.lock python benchmarks/bench_deployment.py --output benchmarks/results/deployment.md
    [--threads 1] [--rounds 3] [--prompt 32] [--new 64] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import kroncompress as kc
from common import write_atomic
from kroncompress.evaluate import max_positions
from kroncompress.io.onnx import LogitsOnly, export_onnx, logits_tolerance


def greedy(step, ids: torch.Tensor, new: int) -> torch.Tensor:
    """`new` greedy tokens after `ids` (1, P) with `step(ids, mask) -> logits`, no cache."""
    for _ in range(new):
        logits = step(ids, torch.ones_like(ids))
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def backends(model, teacher, onnx_path: Path, threads: int, compile_: bool) -> dict:
    """name -> (greedy generator: (prompt, new) -> ids, logits function or None)."""
    import onnxruntime

    plain = LogitsOnly(model).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def ort_logits(ids, mask):
        return torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])

    def generate(m):
        def run(prompt, new):
            return m.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=m.config.eos_token_id)
        return run

    out = {
        "teacher, eager, KV cache": (generate(teacher), None),
        "kn-gpt2, eager, KV cache": (generate(model), None),
        "kn-gpt2, eager, no cache": (lambda p, n: greedy(plain, p, n), plain),
    }
    if compile_:
        compiled = torch.compile(plain, dynamic=True)
        out["kn-gpt2, torch.compile, no cache"] = (lambda p, n: greedy(compiled, p, n), compiled)
    out["kn-gpt2, onnxruntime, no cache"] = (lambda p, n: greedy(ort_logits, p, n), ort_logits)
    return out


@torch.no_grad()
def measure(model, teacher, *, threads: int, rounds: int, prompt_len: int, new: int, compile_: bool,
            work: Path) -> dict:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    export = export_onnx(model, work / "onnx", overwrite=True)
    export_seconds = time.perf_counter() - started
    runs = backends(model, teacher, export.path / "model.onnx", threads, compile_)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    batch = torch.randint(0, vocab, (4, min(128, max_positions(model) or 128)),
                          generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(batch)
    reference = LogitsOnly(model)(batch, mask)
    rows = {name: {"seconds": []} for name in runs}
    for name, (run, logits_fn) in runs.items():  # warm-up (and compile), then the logits check
        started = time.perf_counter()
        rows[name]["ids"] = run(prompt, new)
        rows[name]["first call s"] = time.perf_counter() - started
        if logits_fn is not None:
            rows[name]["max |diff|"] = (logits_fn(batch, mask) - reference).abs().max().item()
    for _ in range(rounds):
        for name, (run, _) in runs.items():
            started = time.perf_counter()
            run(prompt, new)
            rows[name]["seconds"].append(time.perf_counter() - started)
    eager = rows["kn-gpt2, eager, KV cache"]["ids"]
    for row in rows.values():
        row["tokens/s"] = new / statistics.median(row["seconds"])
        row["same tokens"] = torch.equal(row.pop("ids"), eager)
    sizes = {"compressed model.safetensors": None, "model.onnx": (export.path / "model.onnx").stat().st_size}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        kc.save_compressed(model, Path(tmp) / "c")
        sizes["compressed model.safetensors"] = (Path(tmp) / "c" / "model.safetensors").stat().st_size
        teacher.save_pretrained(Path(tmp) / "t")
        sizes["teacher model.safetensors"] = (Path(tmp) / "t" / "model.safetensors").stat().st_size
    return {"rows": rows, "export": export, "export seconds": export_seconds, "sizes": sizes,
            "tolerance": logits_tolerance(model.config, reference), "params": model.num_parameters(),
            "teacher params": teacher.num_parameters(), "batch": tuple(batch.shape)}


def report(result: dict, args: argparse.Namespace, command: str) -> str:
    rows, export = result["rows"], result["export"]
    base = rows["kn-gpt2, eager, KV cache"]["tokens/s"]
    lines = [
        "# Deployment: eager vs torch.compile vs onnxruntime", "",
        f"The demo teacher (`shakespeare-gpt2`, {result['teacher params']:,} parameters) compressed with `kn-gpt2` "
        f"({result['params']:,} parameters, weight-only), greedy generation at batch size 1: a {args.prompt}-token prompt, "
        f"{args.new} new tokens, median of {args.rounds} interleaved rounds after one warm-up call. "
        f"torch and onnxruntime both use {args.threads} thread(s). \"no cache\" recomputes the whole sequence at every "
        "step, which is what the exported graph (logits from input_ids and attention_mask, no past key values) does.", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}, onnxscript {__import__('onnxscript').__version__}. "
        f"Made by `{command}`.", "",
        "| backend | tokens/s | vs kn-gpt2 eager (cache) | first call (s) | max \\|logit diff\\| to eager | same greedy tokens |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        diff = f"{row['max |diff|']:.2g}" if "max |diff|" in row else "(reference)" if name == "kn-gpt2, eager, no cache" else "-"
        same = "-" if name.startswith("teacher") else "yes" if row["same tokens"] else "no"
        lines.append(f"| {name} | {row['tokens/s']:.0f} | {row['tokens/s'] / base:.2f}x | {row['first call s']:.1f} | "
                     f"{diff} | {same} |")
    sizes = result["sizes"]
    lines += [
        "",
        f"Logits compared on a {result['batch'][0]} x {result['batch'][1]} batch; the float32 bound "
        f"(`logits_tolerance`: eps x width x (blocks + 1) x max |logit|) is {result['tolerance']:.2g}. "
        f"The export took {result['export seconds']:.0f} s (opset {export.opset}; its own check: "
        f"{export.max_abs_diff:.2g}).", "",
        "| file | bytes |", "|---|---:|",
        *[f"| {name} | {size:,} |" for name, size in sizes.items()], "",
        "The ONNX graph stores the factors (about the compressed safetensors' size), not dense matrices.", "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/deployment.md"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--model", default="shakespeare-gpt2", help="teacher (default: the packaged demo)")
    parser.add_argument("--recipe", default="kn-gpt2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from kroncompress.models import load_model

    teacher, _ = load_model(args.model)
    teacher.eval()
    model, _ = load_model(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight-only initialisation
        kc.compress(model, kc.load_recipe(args.recipe))
    model.eval()
    with tempfile.TemporaryDirectory() as work:
        result = measure(model, teacher, threads=args.threads, rounds=args.rounds, prompt_len=args.prompt,
                         new=args.new, compile_=args.compile, work=Path(work))
    command = "python benchmarks/bench_deployment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_atomic(args.output, report(result, args, command.strip()))
    print(args.output.read_text())
    return result


if __name__ == "__main__":
    main()
