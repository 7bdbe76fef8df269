"""Weight-only vs data-aware Kronecker embedding on Gemma 3 270M (issue 15, section 2), zero-shot.

Gemma 3 270M keeps 168M of its 268M parameters in the 262,144 x 640 embedding, tied to the LM head. This
factors only the embedding 2x as A (262,144 x 320) (x) B (1 x 2) (the KnGPT2 layout), with
  nkp            the weight-only nearest Kronecker product,
  als-freq       ALS on the token-frequency-weighted row error (the embedding's own output error),
  als-freq+head  the same plus the tied head's output error tr((E - E^) C (E - E^)^T),
and scores perplexity on the first 16,384 tokens of the held-out English validation text exactly as
bench_gemma does (windows of BOS + 255 tokens, BOS never scored; the same teacher perplexity). Token counts: ~300k tokens of train.jsonl (documents shuffled with seed 0); C: the head's
input second moment (the final normed hidden states) on the first 8,192 of them, in BOS-led windows. Gemma's embedding module
multiplies its rows by sqrt(640); the table (and the head) are what is factored, so the relative errors
are unchanged by that scale. The factored table is written back densely (same numbers as a
KroneckerEmbedding; Gemma does not run through kc.compress here).

    python benchmarks/bench_embedding_gemma.py --output benchmarks/results/embedding-init-gemma.md
    # one cell per call, each under the heavy lock, then the report from the cache:
    flock /tmp/kc-heavy.lock python benchmarks/bench_embedding_gemma.py --max-cells 1

Cells are cached in `<output stem>.cells.jsonl` (statistics in ~/.cache/kroncompress/embedinit/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from kroncompress.linalg.kronecker import kron_sum
from kroncompress.linalg.weighted_kronecker import (
    TokenStatistics, embedding_weights, weighted_kronecker_als, weighted_objective, weighted_row_error,
)
from kroncompress.linalg.whitening import damp

from common import read_blocks, score, write_atomic
from kroncompress.distill import pack_blocks
from kroncompress.distill.bos import tokenizer_bos

REAL = Path.home() / ".cache/kroncompress/real"
STATS = Path.home() / ".cache/kroncompress/embedinit/gemma-stats.pt"
# cell = init[@layout]; no layout: KnGPT2's B (1 x 2), pairs of columns. "2x1" is what kronecker `ratio: 2` picks
# for Gemma's table with its weights (energy kept 0.617): B (2 x 1), pairs of consecutive token rows.
LAYOUTS = {"1x2": ((262144, 320), (1, 2)), "2x1": ((131072, 640), (2, 1))}
INITS = ("teacher", "nkp", "als-freq", "als-freq+head", "nkp@2x1", "als-freq+head@2x1")
RUN_ORDER = ("statistics", "nkp", "als-freq+head", "teacher", "als-freq", "nkp@2x1", "als-freq+head@2x1")
A_SHAPE, B_SHAPE = LAYOUTS["1x2"]


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = REAL / "gemma3-270m"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def stream(tokenizer, split: str, tokens: int, shuffle: bool) -> torch.Tensor:
    docs = [json.loads(line)["text"] for line in (REAL / "english" / f"{split}.jsonl").read_text().splitlines()]
    if shuffle:
        random.Random(0).shuffle(docs)
    ids = [tokenizer.bos_token_id]
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    return torch.tensor(ids[:tokens])


@torch.no_grad()
def statistics_cell(model, tokenizer, count_tokens: int, head_tokens: int) -> dict:
    ids = stream(tokenizer, "train", count_tokens, shuffle=True)
    counts = torch.bincount(ids, minlength=model.config.vocab_size).double()
    blocks = pack_blocks(ids[1: 1 + head_tokens // 256 * 255], 256, tokenizer_bos(tokenizer))
    d = model.config.hidden_size
    C = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, len(blocks), 4):
        hidden = model.model(input_ids=blocks[start:start + 4]).last_hidden_state.reshape(-1, d).double()
        C += hidden.T @ hidden
    STATS.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"counts": counts, "head": damp(C / blocks.numel(), 0.01)}, STATS)
    return {"count_tokens": int(ids.numel()), "distinct": int((counts > 0).sum()), "head_tokens": int(blocks.numel())}


def init_cell(model, cell: str, validation: torch.Tensor, sweeps: int) -> dict:
    init, _, layout = cell.partition("@")
    a_shape, b_shape = LAYOUTS[layout or "1x2"]
    row: dict = {}
    if init != "teacher":
        saved = torch.load(STATS)
        embedding = model.get_input_embeddings()
        E = embedding.weight.detach().clone()
        start = time.perf_counter()
        if init == "nkp":
            stats = TokenStatistics(saved["counts"])
            result = weighted_kronecker_als(E, stats, a_shape, b_shape, start="nkp", max_sweeps=0)
        else:
            stats = TokenStatistics(saved["counts"], saved["head"] if init == "als-freq+head" else None)
            result = weighted_kronecker_als(E, stats, a_shape, b_shape, max_sweeps=sweeps)
        E_hat = kron_sum(result.a, result.b)
        val_counts = torch.bincount(validation.reshape(-1), minlength=E.shape[0]).double()
        _, Ch = embedding_weights(E, saved["counts"], saved["head"])
        zero = torch.zeros(E.shape[0], dtype=torch.float64)
        row = {"fit_seconds": round(time.perf_counter() - start, 1), "sweeps": result.sweeps,
               "werr": float((E - E_hat).norm() / E.norm()),
               "ferr_calibration": weighted_row_error(E, E_hat, saved["counts"]),
               "ferr_validation": weighted_row_error(E, E_hat, val_counts),
               "head_err": weighted_objective(E, E_hat, zero, Ch) ** 0.5}
        with torch.no_grad():
            embedding.weight.copy_(E_hat.to(E.dtype))
    start = time.perf_counter()
    row["perplexity"] = score(model, validation)
    row["eval_seconds"] = round(time.perf_counter() - start, 1)
    return row


def report(rows: dict, args) -> str:
    stats = rows.get("statistics", {})
    lines = [
        "# Kronecker embedding init on Gemma 3 270M: weight-only vs data-aware (zero-shot)", "",
        f"Generated by `python benchmarks/bench_embedding_gemma.py --sweeps {args.sweeps}` (cells cached in "
        f"`{Path(args.output).with_suffix('.cells.jsonl').name}`, a rerun runs only the missing ones); {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"Only the embedding (262,144 x 640, tied head) is factored 2x: A {A_SHAPE} (x) B {B_SHAPE} (KnGPT2's layout) or, "
        f"`@2x1`, A {LAYOUTS['2x1'][0]} (x) B {LAYOUTS['2x1'][1]} (the library's shape search's pick), 168M -> 84M "
        f"parameters. Token counts: {stats.get('count_tokens', 0):,} tokens of train.jsonl ({stats.get('distinct', 0):,} "
        f"distinct ids of 262,144); head second moment: {stats.get('head_tokens', 0):,} tokens. Perplexity: first "
        f"{args.eval_tokens:,} tokens of validation.jsonl in windows of BOS + 255 tokens (as bench_gemma).", "",
        "werr = ||E - E^|| / ||E||; ferr = token-frequency-weighted relative row error (calibration / validation "
        "counts); head = sqrt(tr(D C D^T) / tr(E C E^T)) on the calibration hidden states.", "",
        "| embedding init | werr | ferr (calib.) | ferr (valid.) | head | perplexity | fit s | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for init in INITS:
        r = rows.get(init)
        if r is None:
            lines.append(f"| {init} | not run | | | | | | |")
            continue
        if init == "teacher":
            lines.append(f"| (teacher, dense) | 0 | 0 | 0 | 0 | {r['perplexity']:.2f} | | {r['eval_seconds']:.0f} |")
            continue
        lines.append(f"| {init} | {r['werr']:.3f} | {r['ferr_calibration']:.3f} | {r['ferr_validation']:.3f} | "
                     f"{r['head_err']:.3f} | {r['perplexity']:.2f} | {r['fit_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/embedding-init-gemma.md")
    parser.add_argument("--count-tokens", type=int, default=300_000)
    parser.add_argument("--head-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--sweeps", type=int, default=6)
    parser.add_argument("--max-cells", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.output).with_suffix(".cells.jsonl")
    rows = {}
    if cache.exists():
        rows = {r["cell"]: r for r in map(json.loads, cache.read_text().splitlines())}
    todo = [c for c in RUN_ORDER if c not in rows or (c == "statistics" and not STATS.exists())]
    print(f"to run: {todo}", flush=True)
    if todo[:args.max_cells]:
        model, tokenizer = load()
        validation = read_blocks(REAL / "english" / "validation.jsonl", tokenizer, args.eval_tokens)
        for cell in todo[:args.max_cells]:
            start = time.perf_counter()
            if cell == "statistics":
                row = statistics_cell(model, tokenizer, args.count_tokens, args.head_tokens)
            else:
                model, _ = load()  # every cell from the pretrained weights (an earlier cell changed them)
                row = init_cell(model, cell, validation, args.sweeps)
            row = {"cell": cell, **row, "seconds": round(time.perf_counter() - start, 1)}
            rows[cell] = row
            cache.parent.mkdir(parents=True, exist_ok=True)
            with cache.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)
    write_atomic(Path(args.output), report(rows, args))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
