"""Code paths of the issue-16 benchmark additions on tiny sizes (no assertion depends on a timing)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import kroncompress as kc

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def layers():
    return _load("bench_layers")


@pytest.fixture(scope="module")
def distill():
    return _load("bench_distill")


def test_decomposition_groups_and_verdict(layers):
    result = layers.bench_decomposition(blocks=1, repeats=1, shapes=[("h.0.mlp.c_fc", (24, 8)), ("wte", (30, 8))])
    assert set(result.groups) == {"block matrices", "embedding"}
    assert result.max_residual_gap < 1e-4
    text = "\n".join(layers.decomposition_section(result))
    assert "| embedding |" in text and "| block matrices |" in text and "Target: >= 10x" in text


def test_multi_term_fit_is_optimal(layers):
    rows = layers.bench_multi_term_fit(shape=(24, 16), fits=(((6, 4), (4, 4), 3), ((24, 8), (1, 2), 1)), repeats=1)
    assert len(rows) == 2
    for _, ours, lowrank, full, excess in rows:
        assert ours > 0 and lowrank > 0 and full > 0
        assert abs(excess) < 1e-5  # Eckart-Young optimal up to float32 rounding
    assert "svd_lowrank" in "\n".join(layers.multi_term_fit_section(rows))


def test_recipes_section_marks_the_target(layers):
    text = "\n".join(layers.recipes_section({"kn-gpt2": [1.0, 2.0, 3.0], "tt-gpt2": [12.0]}))
    assert "| `kn-gpt2` | 2.00 | 1.00 | 3 | yes |" in text
    assert "| `tt-gpt2` | 12.00 | 12.00 | 1 | **no** |" in text


def test_distillation_step_breakdown(distill):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kroncompress.distill.losses import use_eager_attention

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)).eval()
    student = GPT2LMHeadModel(teacher.config)
    student.load_state_dict(teacher.state_dict())
    recipe = kc.load_recipe("kn-gpt2").to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kc.compress(student, recipe)
    for model in (teacher, student):
        use_eager_attention(model)
    times = distill.measure(teacher, student.train(), batch=2, seq_len=8, rounds=1)
    assert {"plain CE step", "ILKD step", "loss term attention_kl (forward)",
            "loss term attention_kl (forward + backward to the student's outputs)"} <= set(times)
    args = Namespace(argv=[], model="tiny", recipe="kn-gpt2", batch=2, seq_len=8, rounds=1)
    text = distill.report(times, args, 1.0)
    assert "ILKD tokens/s / (plain step + teacher forward) tokens/s" in text
    assert "ILKD - plain - teacher as run - loss terms (forward + backward)" in text
