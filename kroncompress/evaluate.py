"""Evaluation: sliding-window perplexity (the protocol of the Hugging Face perplexity guide) and speed.

    result = kc.perplexity(model, ids, block_size=1024, stride=512)
    print(result)          # perplexity 29.41 (block 1024, stride 512, 287,643 tokens scored)
    result.to_dict()       # {"perplexity": 29.41, "nll": 3.38, "tokens": 287643, "block_size": 1024, ...}

Protocol: windows of at most `block_size` tokens start every `stride` tokens; each window scores
only the tokens that no earlier window scored (its last `trg_len` tokens, the rest is context with
label -100), and a token is scored only with at least one token of context in its window.
nll = sum of the token negative log-likelihoods / tokens scored; perplexity = exp(nll).

- stride < block_size: every token but the first is scored exactly once, so n ids give n - 1 scored
  tokens, each predicted from at least `block_size - stride` tokens of context (fewer at the start);
- stride == block_size: disjoint windows (fastest, pessimistic); the first token of each window has
  no context and is not scored, so n ids give n - ceil(n / block_size) scored tokens.

With `bos_token_id` (models that expect BOS first, such as Llama and Gemma; see kroncompress.distill.bos)
every window is that BOS followed by at most `block_size - 1` ids, advanced by at most `block_size - 1`:
the BOS is context only, and every id is scored, the first of the stream with the BOS alone as context
(n ids give n scored tokens).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class PerplexityResult:
    """A perplexity with its protocol: window `block_size`, `stride`, and the number of `tokens` scored."""

    perplexity: float
    nll: float
    tokens: int
    block_size: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data for report.json."""
        return asdict(self)

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.2f} (block {self.block_size}, stride {self.stride}, "
                f"{self.tokens:,} tokens scored)")


def max_positions(model) -> int | None:
    """The longest sequence the model accepts (`n_positions` / `max_position_embeddings`), or None."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device_of(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=input_ids)
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    return logits


def _sequences(data) -> list[torch.Tensor]:
    """1-D LongTensors from a 1-D tensor or id list (one sequence), a 2-D tensor or a list of tensors
    (one sequence each)."""
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            return [data.long()]
        if data.dim() == 2:
            return [row.long() for row in data]
        raise ValueError(f"perplexity: data must be 1-D ids or 2-D rows of ids, got shape {tuple(data.shape)}")
    data = list(data)
    if data and all(isinstance(x, torch.Tensor) for x in data):
        return [x.reshape(-1).long() for x in data]
    return [torch.as_tensor(data, dtype=torch.long)]


def windows(length: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """The (begin, end, trg_len) windows of the HF sliding-window protocol over `length` ids."""
    spans, previous_end = [], 0
    for begin in range(0, max(length, 1), stride):
        end = min(begin + block_size, length)
        spans.append((begin, end, end - previous_end))
        previous_end = end
        if end == length:
            break
    return spans


@torch.no_grad()
def perplexity(model, data, *, block_size: int = 1024, stride: int = 512, max_tokens: int | None = None,
               batch_size: int = 1, device: str | torch.device | None = None,
               progress: Callable[[int, int], None] | None = None, bos_token_id: int | None = None) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM on token ids (see the module docs for the protocol).

    `data`: a 1-D LongTensor or list of ids (one stream), or a 2-D tensor / list of 1-D tensors (several
    sequences, scored separately, totals pooled). `max_tokens` keeps the first that many ids of each
    sequence. `batch_size` windows run per forward pass. The model runs in eval mode without gradients
    (its mode is restored) on `device` (default: where its parameters are); any model returning `logits`
    (or a tuple/tensor of them) works. `progress(windows done, windows in all)` is called after each
    forward pass (the CLI draws its bar with it). `bos_token_id` opens every window with BOS (see the
    module docs). ValueError when `block_size` exceeds the model's positions or `stride` is not in
    [1, block_size].
    """
    if block_size < 2:
        raise ValueError(f"perplexity: block_size must be >= 2, got {block_size}")
    if not 1 <= stride <= block_size:
        raise ValueError(f"perplexity: stride must be in [1, block_size={block_size}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"perplexity: max_tokens must be >= 2 (one token and its context), got {max_tokens}")
    limit = max_positions(model)
    if limit is not None and block_size > limit:
        raise ValueError(f"perplexity: block_size {block_size} exceeds the model's {limit} positions "
                         f"(config n_positions / max_position_embeddings); use block_size <= {limit}")
    sequences = [s[:max_tokens] if max_tokens is not None else s for s in _sequences(data)]
    unscored = 1 if bos_token_id is None else 0  # the first id has no context, unless a BOS precedes it
    if sum(max(len(s) - unscored, 0) for s in sequences) == 0:
        raise ValueError(f"perplexity: data has no token to score; give at least {unscored + 1} token ids")
    # with BOS, a window holds the BOS and block_size - 1 ids
    span, step = (block_size, stride) if bos_token_id is None else (block_size - 1, min(stride, block_size - 1))
    target = _device_of(model, device)
    was_training = model.training
    model.eval()
    try:
        total_nll, scored, done = 0.0, 0, 0
        spans_of = [windows(len(s), span, step) if len(s) > unscored else [] for s in sequences]
        total = sum(len(spans) for spans in spans_of)
        for sequence, spans in zip(sequences, spans_of):
            for start in range(0, len(spans), batch_size):
                batch = spans[start:start + batch_size]
                nll, count = _score_windows(model, sequence, batch, target, bos_token_id)
                total_nll += nll
                scored += count
                done += len(batch)
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)
    mean = total_nll / scored
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=scored, block_size=block_size, stride=step)


def _score_windows(model, sequence: torch.Tensor, spans, device, bos_token_id: int | None = None) -> tuple[float, int]:
    """Summed NLL and count of the scored tokens of windows run together (equal lengths share a batch),
    each window led by `bos_token_id` when given."""
    nll, count = 0.0, 0
    lead = sequence.new_full((0 if bos_token_id is None else 1,), bos_token_id if bos_token_id is not None else 0)
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        by_length.setdefault(span[1] - span[0], []).append(span)
    for group in by_length.values():
        input_ids = torch.stack([torch.cat([lead, sequence[begin:end]]) for begin, end, _ in group]).to(device)
        labels = input_ids.clone()
        for row, (begin, end, trg_len) in enumerate(group):
            labels[row, : len(lead) + (end - begin) - trg_len] = IGNORE_INDEX
        logits = _logits(model, input_ids)[:, :-1].float()
        targets = labels[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return nll, count


def _first_given(*values):
    return next(value for value in values if value is not None)


def evaluate_perplexity(model, tokenizer, spec: Any, *, split: str | None = None, block_size: int | None = None,
                        stride: int | None = None, max_tokens: int | None = None, batch_size: int = 1,
                        device: str | torch.device | None = None, cache_dir=None,
                        progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity on text described by a spec (a recipe's `PerplexityConfig`, a dict or a `--data` string).

    This is the one protocol of `kroncompress eval` and of every perplexity stage of `kroncompress compress
    --data` (teacher, compressed, distilled): the same model on the same data scores the same in both.
    Tokenises `split` (default: the spec's own split, else the text's held-out split: "test" where it has
    one, else "validation", see `held_out_split`; text with a single split is scored whole) with
    `tokenizer` (cached, see `kroncompress.distill.data.token_stream`) and runs `perplexity`. Arguments
    given here override the spec's `block_size`, `stride` and `max_tokens`. Given neither, the block size
    is 1024 clipped to the model's positions (a tiny or short-context model is scored at its full length).
    `progress` is passed to `perplexity`; windows open with BOS when the tokenizer adds one (the spec's
    `bos`, see kroncompress.distill.bos).
    """
    from kroncompress.distill.data import held_out_split, parse_data_arg, spec_bos, text_spec, token_stream

    values = parse_data_arg(spec) if isinstance(spec, str) else spec
    get = values.get if isinstance(values, dict) else (lambda key, default=None: getattr(values, key, default))
    # an explicit 0 is refused by `perplexity`, not read as "default"
    limit = max_positions(model)
    block_size = int(_first_given(block_size, get("block_size"), min(1024, limit) if limit else 1024))
    stride = int(_first_given(stride, get("stride"), max(1, block_size // 2)))
    max_tokens = max_tokens if max_tokens is not None else get("max_tokens")
    s = text_spec(values)
    split = split or get("split") or held_out_split(s) or "test"  # "test": ignored by single-split files
    ids = token_stream(s, tokenizer, split, max_tokens=max_tokens, cache_dir=cache_dir)
    return perplexity(model, ids, block_size=block_size, stride=stride, batch_size=batch_size, device=device,
                      progress=progress, bos_token_id=spec_bos(s, tokenizer))


# -- speed ---------------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vocab_size(model) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not size:
        raise ValueError("throughput: the model's config has no vocab_size; give a model with a config")
    return int(size)


def _median_seconds(run, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        run()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def throughput(model, *, batch_size: int = 8, seq_len: int = 128, repeats: int = 10, warmup: int = 2,
               device: str | torch.device | None = None, seed: int = 0) -> float:
    """Forward-pass tokens per second: `batch_size` x `seq_len` random ids, `warmup` untimed passes, then
    the median of `repeats` timed passes (CUDA synchronised). Eval mode, no gradients."""
    target = _device_of(model, device)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, _vocab_size(model), (batch_size, seq_len), generator=generator).to(target)
    was_training = model.training
    model.eval()
    try:
        seconds = _median_seconds(lambda: model(input_ids=input_ids), repeats, warmup, target)
    finally:
        model.train(was_training)
    return batch_size * seq_len / seconds


@torch.no_grad()
def generation_throughput(model, *, new_tokens: int = 32, prompt_len: int = 8, repeats: int = 3, warmup: int = 1,
                          device: str | torch.device | None = None, seed: int = 0) -> float:
    """Greedy generation tokens per second at batch size 1: exactly `new_tokens` generated after a random
    prompt of `prompt_len` ids (KV cache on), median of `repeats` runs after `warmup` runs."""
    if not hasattr(model, "generate"):
        raise ValueError(f"generation_throughput: {type(model).__name__} has no generate(); give a causal LM")
    target = _device_of(model, device)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, _vocab_size(model), (1, prompt_len), generator=generator).to(target)
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else getattr(model.config, "eos_token_id", None)
    options = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
                   attention_mask=torch.ones_like(prompt))
    was_training = model.training
    model.eval()
    try:
        seconds = _median_seconds(lambda: model.generate(prompt, **options), repeats, warmup, target)
    finally:
        model.train(was_training)
    return new_tokens / seconds


__all__: Sequence[str] = ("PerplexityResult", "evaluate_perplexity", "generation_throughput", "max_positions",
                          "perplexity", "throughput", "windows")
