"""Distillation throughput: one ILKD training step vs one plain cross-entropy step of the same student.

The student is the demo teacher compressed by a bundled recipe (weight-only, kn-gpt2 by default); the
teacher is the original. Both steps run forward, backward and an AdamW update on the same batch, written
as the distillation trainer's `compute_loss` does it (student forward with the extra outputs the loss
terms read, teacher forward under no_grad, `DistillationLoss`), without the HF Trainer around it. The
overhead is broken down into the teacher's forward, the student's extra outputs (hidden states and
attention maps, eager attention), and each loss term's forward and backward (to the student's outputs;
ce is inside the plain step too). Rounds interleave the measurements; medians are reported. The goal's
reference is the plain step plus the teacher's full forward (with its LM head); the ILKD step runs the
teacher without the head when no logits term is enabled (`DistillationLoss.teacher_forward`).

    python benchmarks/bench_distill.py --output benchmarks/results/distill.md [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import kroncompress as kc
from kroncompress.distill.losses import (
    DistillationLoss, attention_kl, causal_lm_loss, embedding_mse, hidden_mse, use_eager_attention,
)
from kroncompress.recipe import LossWeights

GOAL = 0.8  # ILKD step throughput >= GOAL x that of (plain step + teacher forward)


def build(model_name: str, recipe: str):
    teacher = kc.load_model(model_name, meta_ok=False, load_tokenizer=False)[0]
    student = copy.deepcopy(teacher)
    spec = kc.load_recipe(recipe).to_dict()
    spec.pop("calibration", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kc.compress(student, spec)
    for model in (teacher, student):
        use_eager_attention(model)  # attention maps need eager attention; the plain step uses it too (same student)
    return teacher.eval(), student.train()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(teacher, student, batch: int, seq_len: int, rounds: int, seed: int = 0) -> dict[str, list[float]]:
    generator = torch.Generator().manual_seed(seed)
    vocab = student.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    loss_fn = DistillationLoss(LossWeights())  # KnGPT2's ILKD: ce + hidden + attention + embedding, weight 1 each
    extra = loss_fn.model_kwargs()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    for p in teacher.parameters():
        p.requires_grad_(False)

    def plain_step():
        optimizer.zero_grad(set_to_none=True)
        student(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    def ilkd_step():
        optimizer.zero_grad(set_to_none=True)
        outputs = student(input_ids=ids, labels=ids, **extra)
        with torch.no_grad():
            teacher_outputs = loss_fn.teacher_forward(teacher, input_ids=ids)
        total, _ = loss_fn(outputs, teacher_outputs, ids)
        total.backward()
        optimizer.step()

    def teacher_forward():
        with torch.no_grad():
            teacher(input_ids=ids, **extra)

    def teacher_base_forward():
        with torch.no_grad():
            loss_fn.teacher_forward(teacher, input_ids=ids)

    def student_forward(**kwargs):
        with torch.no_grad():
            student(input_ids=ids, labels=ids, **kwargs)

    with torch.no_grad():
        s_out = student(input_ids=ids, **extra)
        t_out = teacher(input_ids=ids, **extra)
    layer_map = list(range(len(s_out.hidden_states) - 1))

    def leaf(x):
        return x.detach().requires_grad_()

    def term(name, backward):
        def run():
            with torch.set_grad_enabled(backward):
                if name == "ce":
                    value = causal_lm_loss(leaf(s_out.logits), ids)
                elif name == "hidden_mse":
                    value = hidden_mse([leaf(h) for h in s_out.hidden_states], t_out.hidden_states, layer_map, None)
                elif name == "attention_kl":
                    value = attention_kl([leaf(a) for a in s_out.attentions], t_out.attentions, layer_map, None, True)
                else:
                    value = embedding_mse(leaf(s_out.hidden_states[0]), t_out.hidden_states[0], None)
                if backward:
                    value.backward()
        return run

    cases = {"plain CE step": plain_step, "ILKD step": ilkd_step, "teacher forward (extra outputs, no_grad)": teacher_forward,
             "teacher forward as ILKD runs it (no LM head without a logits term)": teacher_base_forward,
             "student forward (no_grad)": student_forward,
             "student forward + hidden states + attention maps (no_grad)": lambda: student_forward(**extra)}
    for name in ("ce", "hidden_mse", "attention_kl", "embedding_mse"):
        cases[f"loss term {name} (forward)"] = term(name, False)
        cases[f"loss term {name} (forward + backward to the student's outputs)"] = term(name, True)
    for fn in cases.values():  # warm-up
        fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    return times


def report(times, args, elapsed: float) -> str:
    tokens = args.batch * args.seq_len
    med = {name: statistics.median(values) for name, values in times.items()}
    plain, ilkd, teacher = med["plain CE step"], med["ILKD step"], med["teacher forward (extra outputs, no_grad)"]
    reference = plain + teacher
    extra_outputs = med["student forward + hidden states + attention maps (no_grad)"] - med["student forward (no_grad)"]
    terms = sum(v for k, v in med.items() if k.startswith("loss term") and "backward" in k and "term ce" not in k)
    unexplained = ilkd - plain - med["teacher forward as ILKD runs it (no LM head without a logits term)"] - terms
    lines = ["# Distillation throughput: ILKD step vs plain CE step", "",
             f"Generated by `python benchmarks/bench_distill.py {' '.join(args.argv)}` on {platform.machine()}, "
             f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at the end "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; {elapsed / 60:.1f} min.", "",
             f"Student: `{args.model}` compressed by `{args.recipe}` (weight-only); teacher: the original. Batch "
             f"{args.batch} x {args.seq_len} random tokens, AdamW, CPU, eager attention for both. ILKD = ce + "
             f"hidden_mse + attention_kl + embedding_mse, weight 1 each (KnGPT2). Median of {args.rounds} interleaved rounds.", "",
             "| measurement | ms | tokens/s | share of the ILKD step |", "|---|---|---|---|"]
    for name, value in med.items():
        lines.append(f"| {name} | {value * 1e3:.1f} | {tokens / value:,.0f} | {value / ilkd:.0%} |")
    lines += ["", "| summary | value |", "|---|---|",
              f"| ILKD step / plain step (time) | {ilkd / plain:.2f}x |",
              f"| ILKD tokens/s / (plain step + teacher forward) tokens/s | {reference / ilkd:.2f} (goal >= {GOAL}) |",
              f"| extra student outputs (hidden states, attention maps) | {extra_outputs * 1e3:.1f} ms |",
              f"| ILKD - plain - teacher as run - loss terms (forward + backward) | {unexplained * 1e3:.1f} ms |",
              ""]
    verdict = "meets" if reference / ilkd >= GOAL else "**misses**"
    lines += [f"The ILKD step {verdict} the goal: {reference / ilkd:.2f} of the throughput of a plain step plus the teacher's forward.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/distill.md")
    parser.add_argument("--model", default="shakespeare-gpt2")
    parser.add_argument("--recipe", default="kn-gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    teacher, student = build(args.model, args.recipe)
    times = measure(teacher, student, args.batch, args.seq_len, args.rounds)
    text = report(times, args, time.perf_counter() - started)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, output)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
