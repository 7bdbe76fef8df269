"""What the benchmark scripts share: atomic report writing, the cell caches, the GPT-2 quality grid (its
cells, recipes and training budget) and the Gemma text, statistics and scoring.

A sibling module of the scripts: `python benchmarks/bench_x.py` puts benchmarks/ on sys.path, so each script
says `from common import ...`; no script imports another.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kroncompress as kc
from kroncompress.errors import CheckpointError, RecipeError
from kroncompress.distill import pack_blocks
from kroncompress.distill.bos import tokenizer_bos


# -- reports and caches ------------------------------------------------------------------------------

def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

def source_fingerprint() -> str:
    """A hash of the code and recipes that decide a cell's numbers (kroncompress/ and recipes/)."""
    import hashlib

    root = Path(kc.__file__).resolve().parent
    files = sorted([*root.rglob("*.py"), *root.rglob("*.safetensors"), *(root.parent / "recipes").glob("*.yaml")])
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]

def cached_rows(cache: Path) -> dict[str, dict[str, Any]]:
    """Every row in the cache file, by cell key (the last one wins)."""
    rows = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            rows[row["key"]] = row
    return rows


# -- the GPT-2 quality grid (bench_quality, bench_speed, bench_budget, bench_embedding_init) -----------

# One optimisation budget for every cell (the kn-gpt2 recipe's schedule); only the loss terms differ by family.
TRAIN = {"lr": 2.5e-4, "warmup_ratio": 0.05, "schedule": "cosine", "batch_size": 8, "grad_accum": 4,
         "max_grad_norm": 1.0, "weight_decay": 0.01, "bf16": False}
# "mlp only": the MLP matrices (c_fc, c_proj) of every block, embedding dense - kn-gpt2-mlp's layout and budget,
# so those cells join the main table; for kronecker it is the kn-gpt2-mlp recipe itself (a main-table row).
MLP_ONLY = "mlp only"
CURVE_LAYOUTS = ("no embedding", "all blocks, no embedding", "all blocks", MLP_ONLY)
MLP_TARGETS = [r"re:transformer\.h\.\d+\.mlp\.(c_fc|c_proj)"]
ODD_BLOCKS = "(1|3|5|7|9|11)"
LINE_NAMES = {"kn-gpt2": "kronecker", "kn-gpt2-mlp": "kronecker, MLP only", "svd-gpt2": "svd",
              "tucker-gpt2": "tucker", "tt-gpt2": "tt", "distilgpt2": "layer drop (DistilGPT2)"}


@dataclass(frozen=True)
class Cell:
    """One run: a bundled recipe, a layout of it ("recipe", "no embedding", "all blocks", "keep K"), an init, a seed."""

    recipe: str
    layout: str
    init: str
    seed: int
    main: bool = False  # a row of the main table (the kn-gpt2 budget)

    @property
    def key(self) -> str:
        return f"{self.recipe}|{self.layout}|{self.init}|{self.seed}"

    @property
    def line(self) -> str:
        name = LINE_NAMES.get(self.recipe, self.recipe)
        return f"{name}, data-aware" if self.init == "data-aware" else name


def evenly_spaced(num_layers: int, keep: int) -> list[int]:
    """`keep` block indices spread over `num_layers`, first and last included (12 -> 6 gives DistilGPT2's)."""
    if not 1 <= keep <= num_layers:
        raise RecipeError(f"cannot keep {keep} of {num_layers} blocks", fix=f"give a count in 1..{num_layers}")
    if keep == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def main_keep(num_layers: int) -> int:
    """Blocks layer dropping keeps at the main table's budget: 6 -> 4 (the kn-gpt2 budget on the demo), 12 -> 8."""
    return max(1, num_layers - num_layers // 3)


def cell_recipe(cell: Cell, num_layers: int) -> dict[str, Any]:
    """The recipe dict a cell runs: the bundled recipe with its layout, init and the common training budget."""
    recipe = kc.load_recipe(cell.recipe).to_dict()
    rules = recipe["compress"]
    if cell.layout.startswith("keep "):
        keep = evenly_spaced(num_layers, int(cell.layout.split()[1]))
        rules[0]["options"] = {"keep": keep}
        recipe["distill"]["layer_map"] = keep
    elif cell.layout not in ("recipe", *CURVE_LAYOUTS):
        raise RecipeError(f"unknown layout {cell.layout!r}", fix=f"use recipe, keep K or one of {', '.join(CURVE_LAYOUTS)}")
    if cell.layout == MLP_ONLY:
        blocks = [r for r in rules if not any(t.endswith(".wte") for t in r["targets"])]
        if len(blocks) != 1:
            raise RecipeError(f"layout {MLP_ONLY!r} needs exactly one block rule, found {len(blocks)}", where=cell.recipe)
        recipe["compress"] = rules = [{**blocks[0], "targets": list(MLP_TARGETS)}]
    if "no embedding" in cell.layout:
        recipe["compress"] = rules = [r for r in rules if not any(t.endswith(".wte") for t in r["targets"])]
    if "all blocks" in cell.layout:
        for rule in rules:
            rule["targets"] = [t.replace(ODD_BLOCKS, r"\d+") for t in rule["targets"]]
    if cell.init != "data-aware":
        recipe.pop("calibration", None)
    recipe["distill"]["train"] = {**TRAIN, "seed": cell.seed}
    recipe["name"] = f"{cell.recipe} ({cell.layout}, {cell.init})"
    return recipe


def num_layers_of(model: str) -> int:
    config = kc.load_model(model, load_tokenizer=False)[0].config
    for name in ("n_layer", "num_hidden_layers", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise CheckpointError("the config names no layer count", where=model)


# -- Gemma 3 270M (bench_gemma, bench_init_gemma, bench_embedding_gemma) --------------------------------

CACHE = Path(os.environ.get("KRONCOMPRESS_CACHE") or Path.home() / ".cache" / "kroncompress") / "real"
BLOCK_LINEARS = r"re:model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
EMBEDDING = "model.embed_tokens"
# The Gemma ILKD of bench_gemma and bench_allocation: recipes/kron-gemma.yaml's losses (Gemma's residual stream
# makes a summed hidden MSE ~1e6, hence 1e-5) and a short, small-batch run.
GEMMA_ILKD = {"embedding_mse": 0.0, "attention_kl": 1.0, "hidden_mse": 1.0e-5, "ce": 1.0,
              "logits_kl": {"weight": 1.0, "temperature": 2.0}}
GEMMA_TRAIN = {"lr": 1e-4, "warmup_ratio": 0.1, "schedule": "cosine", "batch_size": 2, "grad_accum": 4,
               "max_grad_norm": 1.0, "weight_decay": 0.0, "bf16": False, "seed": 0}


def read_blocks(path: Path, tokenizer, count: int) -> torch.Tensor:
    """(N, 256) blocks of the documents in a jsonl file (each followed by EOS), every block opening with BOS
    as Gemma expects (without it the teacher scores 223.5 instead of 56.0 on the same targets), as the library
    packs them (kroncompress.distill.bos): BOS is context, never a target. N covers `count` tokens."""
    bos = tokenizer_bos(tokenizer)
    if bos is None:
        raise SystemExit(f"{path}: the tokenizer adds no BOS; this benchmark's protocol is BOS + 255 tokens")
    return pack_blocks(read_tokens(path, tokenizer, -(-count // 255) * 255), 256, bos)


def read_tokens(path: Path, tokenizer, count: int) -> torch.Tensor:
    """The first `count` token ids of the documents in a jsonl file, each followed by EOS."""
    ids: list[int] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            ids.extend(tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"])
            ids.append(tokenizer.eos_token_id)
            if len(ids) >= count:
                break
    if len(ids) < count:
        raise SystemExit(f"{path}: only {len(ids):,} tokens, need {count:,}")
    return torch.tensor(ids[:count])


def calibration(model, texts: dict, args) -> tuple:
    """The statistics of every block linear and the embedding (each cell reads the modules it compresses), computed
    once per calibration size and cached beside the cells (`CalibrationStats.save`, + a .json with the seconds
    the pass took): the teacher is the same in every cell. Returns them with those seconds."""
    from kroncompress.calibration import CalibrationStats

    path = args.output.with_name(f"{args.output.stem}.calibration-{Path(args.model).name}-{args.calibration_tokens}"
                                 ".safetensors")
    seconds_file = path.with_suffix(".json")
    if path.exists() and seconds_file.exists():
        return CalibrationStats.load(path), json.loads(seconds_file.read_text())["seconds"]
    plan = kc.plan(model, kc.load_recipe({"version": 1, "name": "gemma-calibration", "ignore": ["lm_head"], "compress": [
        {"targets": [EMBEDDING], "strategy": "kronecker", "options": {"ratio": 2.0, "init": "auto"}},
        {"targets": [BLOCK_LINEARS], "strategy": "svd", "options": {"ratio": 2.0, "init": "auto"}}]}))
    start = time.perf_counter()
    stats = kc.calibrate(model, plan, texts["tokenizer"], data=texts["calibration"], tokens=args.calibration_tokens,
                         block_size=256)
    seconds = time.perf_counter() - start
    stats.save(path)
    write_atomic(seconds_file, json.dumps({"seconds": seconds}))
    return stats, seconds


def score(model, ids: torch.Tensor) -> float:
    return kc.perplexity(model, ids, block_size=256, stride=256, batch_size=4).perplexity


# -- a teacher and its text: the demo or Gemma (bench_allocation, bench_recovery) ------------------------

class LMProtocol:
    """A teacher, its calibration blocks, its ILKD data and settings, and its perplexity."""

    def __init__(self, which: str, eval_tokens: int, calibration_tokens: int):
        self.which = which
        if which == "gemma":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = CACHE / "gemma3-270m"
            if not (path / "config.json").is_file():
                raise SystemExit(f"{path}: no model; run python scripts/fetch_gemma.py first")
            self.name, self.tokenizer = "Gemma 3 270M", AutoTokenizer.from_pretrained(path)
            self.teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            text = CACHE / "english"
            self.eval_ids = read_blocks(text / "validation.jsonl", self.tokenizer, eval_tokens)
            self.train = read_blocks(text / "train.jsonl", self.tokenizer, max(calibration_tokens, 1 << 17))
            self.blocks = self.train[: -(-calibration_tokens // 256)]
            self.distill_config = {"teacher": "original", "losses": GEMMA_ILKD, "data": {"block_size": 256},
                                   "train": GEMMA_TRAIN}
            self.ignore = ["lm_head"]
            self.text = (f"the first {eval_tokens:,} tokens of the held-out documents (english/validation.jsonl) in "
                         f"windows of BOS + 255 tokens; calibration, sensitivity and ILKD data: the training documents")
        else:
            from kroncompress.distill.data import pack_blocks, spec_bos
            from kroncompress.distill.spec import text_spec
            from kroncompress.distill.tokens import token_stream

            self.name = "shakespeare-gpt2 (the demo teacher)"
            self.teacher, info = kc.load_model("shakespeare-gpt2")
            self.teacher.eval()
            self.tokenizer = info.tokenizer
            spec = text_spec("shakespeare")
            bos = spec_bos(spec, self.tokenizer)
            ids = token_stream(spec, self.tokenizer, "train", max_tokens=max(calibration_tokens, 1 << 16))
            self.train = pack_blocks(ids, 128, bos)
            self.blocks = self.train[: -(-calibration_tokens // 128)]
            self.eval_tokens = eval_tokens
            distill = kc.load_recipe("kn-gpt2").distill
            self.distill_config = {"teacher": "original", "losses": _plain(distill.losses),
                                   "data": {"block_size": 128}, "train": _plain(distill.train)}
            self.ignore = []
            self.text = (f"the first {eval_tokens:,} tokens of the Shakespeare test split (kroncompress eval's "
                         "protocol); calibration, sensitivity and ILKD data: its train split, blocks of 128")

    def perplexity(self, model) -> float:
        if self.which == "gemma":
            return score(model, self.eval_ids)
        from kroncompress.evaluate import evaluate_perplexity

        return evaluate_perplexity(model, self.tokenizer, "shakespeare", split="test",
                                   max_tokens=self.eval_tokens).perplexity


def _plain(section) -> dict:
    from dataclasses import fields, is_dataclass

    if is_dataclass(section):
        return {f.name: _plain(getattr(section, f.name)) for f in fields(section)}
    return section
