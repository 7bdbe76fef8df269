"""Sliding-window perplexity (checked against hand computations and HF's own loss) and speed measurements."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kroncompress as kc
from kroncompress.distill import data
from kroncompress.evaluate import (
    PerplexityResult, evaluate_perplexity, generation_throughput, perplexity, throughput, windows,
)
from kroncompress.recipe import PerplexityConfig
from kroncompress.tokenizers import byte_tokenizer

VOCAB = 128


@pytest.fixture(scope="module")
def gpt2():
    from conftest import build_tiny

    return build_tiny("gpt2")  # n_positions 64, vocab 128


def stream(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


class Uniform(nn.Module):
    """A causal LM that predicts every token with probability 1 / vocab_size."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, n_positions=64)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.config.vocab_size) + self.anchor)


@pytest.mark.parametrize("length, block_size, stride, expected", [
    (10, 4, 4, [(0, 4, 4), (4, 8, 4), (8, 10, 2)]),
    (10, 4, 2, [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]),
    (10, 8, 3, [(0, 8, 8), (3, 10, 2)]),
    (3, 8, 4, [(0, 3, 3)]),
])
def test_windows(length, block_size, stride, expected):
    assert windows(length, block_size, stride) == expected


@pytest.mark.parametrize("length, block_size", [(64, 16), (50, 16), (17, 16), (40, 64)])
def test_disjoint_windows_equal_mean_cross_entropy_by_hand(gpt2, length, block_size):
    ids = stream(length)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(block_size):
            if len(chunk) > 1:
                logits = gpt2(chunk[None]).logits[0, :-1]
                nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
                count += len(chunk) - 1
    result = perplexity(gpt2, ids, block_size=block_size, stride=block_size)
    assert result.tokens == count == length - math.ceil(length / block_size)
    assert result.nll == pytest.approx(nll / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def reference_sliding_window(model, ids: torch.Tensor, block_size: int, stride: int) -> tuple[float, int]:
    """The HF perplexity guide's loop, with HF's own loss (labels=), counting the labels that loss uses."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + block_size, len(ids))
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("length, block_size, stride, batch_size", [
    (100, 32, 16, 1), (100, 32, 16, 3), (77, 64, 5, 4), (33, 16, 15, 2), (20, 64, 32, 1),
])
def test_overlapping_windows_score_each_token_once(gpt2, length, block_size, stride, batch_size):
    ids = stream(length, seed=length)
    result = perplexity(gpt2, ids, block_size=block_size, stride=stride, batch_size=batch_size)
    nll, count = reference_sliding_window(gpt2, ids, block_size, stride)
    assert result.tokens == count == length - 1  # every token but the first, once
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert (result.block_size, result.stride) == (block_size, stride)


@pytest.mark.parametrize("vocab_size, block_size, stride", [(128, 16, 16), (50, 16, 4), (1000, 64, 31)])
def test_uniform_prediction_gives_the_vocabulary_size(vocab_size, block_size, stride):
    ids = torch.randint(0, vocab_size, (150,), generator=torch.Generator().manual_seed(1))
    result = perplexity(Uniform(vocab_size), ids, block_size=block_size, stride=stride)
    assert result.perplexity == pytest.approx(vocab_size, rel=1e-5)
    assert result.nll == pytest.approx(math.log(vocab_size), rel=1e-6)


def test_data_forms_and_max_tokens(gpt2):
    ids = stream(60)
    as_tensor = perplexity(gpt2, ids, block_size=16, stride=8)
    assert perplexity(gpt2, ids.tolist(), block_size=16, stride=8) == as_tensor
    rows = ids[:48].reshape(3, 16)
    pooled = perplexity(gpt2, rows, block_size=16, stride=16)
    assert pooled == perplexity(gpt2, list(rows), block_size=16, stride=16)
    assert pooled.tokens == 3 * 15
    assert perplexity(gpt2, ids, block_size=16, stride=8, max_tokens=30).tokens == 29


@pytest.mark.parametrize("data, block_size, stride, batch_size, calls", [
    (stream(100), 32, 16, 1, [(i, 6) for i in range(1, 7)]),     # windows start at 0, 16, ..., 80 (the last ends at 100)
    (stream(100), 32, 16, 4, [(4, 6), (6, 6)]),
    (stream(64).reshape(2, 32), 16, 16, 1, [(i, 4) for i in range(1, 5)]),  # two sequences, windows pooled
])
def test_progress_counts_windows_done_of_all(gpt2, data, block_size, stride, batch_size, calls):
    seen = []
    perplexity(gpt2, data, block_size=block_size, stride=stride, batch_size=batch_size,
               progress=lambda done, total: seen.append((done, total)))
    assert seen == calls


@pytest.mark.parametrize("kwargs, words", [
    ({"block_size": 65, "stride": 32}, ["block_size 65", "64 positions"]),
    ({"block_size": 16, "stride": 17}, ["stride", "[1, block_size=16]"]),
    ({"block_size": 16, "stride": 0}, ["stride"]),
    ({"block_size": 1, "stride": 1}, ["block_size must be >= 2"]),
])
def test_bad_protocols_are_refused(gpt2, kwargs, words):
    with pytest.raises(ValueError) as error:
        perplexity(gpt2, stream(100), **kwargs)
    for word in words:
        assert word in str(error.value)


def test_too_little_data_is_refused(gpt2):
    with pytest.raises(ValueError, match="no token to score"):
        perplexity(gpt2, torch.tensor([5]), block_size=16, stride=8)


def test_result_carries_its_protocol(gpt2):
    result = perplexity(gpt2, stream(40), block_size=32, stride=16)
    assert isinstance(result, PerplexityResult)
    assert result.to_dict() == {"perplexity": result.perplexity, "nll": result.nll, "tokens": 39, "block_size": 32,
                                "stride": 16}
    text = str(result)
    assert f"{result.perplexity:.2f}" in text and "block 32" in text and "stride 16" in text and "39 tokens" in text
    assert kc.perplexity is perplexity


def test_evaluate_perplexity_reads_a_spec(tmp_path, monkeypatch):
    from conftest import build_tiny

    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "eval.txt").write_text("To be, or not to be, that is the question.\n" * 4, encoding="utf-8")
    tokenizer = byte_tokenizer()
    model = build_tiny("gpt2", vocab_size=257)
    spec = PerplexityConfig(files=[str(tmp_path / "eval.txt")], block_size=32, stride=16)
    result = evaluate_perplexity(model, tokenizer, spec)
    ids = data.token_stream(spec, tokenizer)
    assert result == perplexity(model, ids, block_size=32, stride=16)
    assert result.tokens == len(ids) - 1 == 4 * 43  # 43 bytes a line, plus EOS, minus the first
    assert evaluate_perplexity(model, tokenizer, str(tmp_path / "eval.txt"), block_size=64, stride=64).block_size == 64
    assert evaluate_perplexity(model, tokenizer, {"files": [str(tmp_path / "eval.txt")], "max_tokens": 20},
                               block_size=16).tokens == 19
    # no block size given: 1024 clipped to the model's 64 positions (stride half of it); explicit ones are checked
    clipped = evaluate_perplexity(model, tokenizer, str(tmp_path / "eval.txt"))
    assert (clipped.block_size, clipped.stride) == (64, 32)
    assert clipped == perplexity(model, data.token_stream(str(tmp_path / "eval.txt"), tokenizer), block_size=64, stride=32)
    with pytest.raises(ValueError, match="block_size 128 exceeds the model's 64 positions"):
        evaluate_perplexity(model, tokenizer, str(tmp_path / "eval.txt"), block_size=128)


@pytest.mark.parametrize("measure, kwargs", [
    (throughput, dict(batch_size=2, seq_len=16, repeats=2, warmup=1)),
    (generation_throughput, dict(new_tokens=4, prompt_len=3, repeats=2, warmup=1)),
])
def test_speed_measurements_return_tokens_per_second(gpt2, measure, kwargs):
    gpt2.train()
    rate = measure(gpt2, **kwargs)
    assert isinstance(rate, float) and 0 < rate < math.inf
    assert gpt2.training
    gpt2.eval()


def test_generation_needs_a_generate_method():
    with pytest.raises(ValueError, match="no generate"):
        generation_throughput(Uniform(10))
