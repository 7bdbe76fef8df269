"""Calibration statistics files: round trip, atomic writes, damaged and hostile files, statistics of another model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kroncompress as kc
from kroncompress.calibration import CalibrationStats, calibration_targets, collect_statistics
from kroncompress.recipe import Recipe

BLOCKS = torch.randint(0, 257, (5, 16), generator=torch.Generator().manual_seed(0))


def tiny(n_embd: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=n_embd, n_head=4, vocab_size=257, n_positions=64, bos_token_id=256,
                        eos_token_id=256)
    return GPT2LMHeadModel(config).eval()


RECIPE = Recipe.from_dict({"version": 1, "name": "t", "compress": [
    {"targets": ["role:mlp"], "strategy": "svd", "options": {"ratio": 2}},
    {"targets": ["transformer.wte"], "strategy": "kronecker", "options": {"b_shape": [1, 2]}}]})


def stats_of(model) -> CalibrationStats:
    return collect_statistics(model, BLOCKS, calibration_targets(model, RECIPE), damping=0.02)


@pytest.fixture
def saved(tmp_path):
    stats = stats_of(tiny())
    return stats, stats.save(tmp_path / "stats.safetensors")


def test_round_trip_keeps_every_statistic_bit_for_bit(saved):
    stats, path = saved
    loaded = CalibrationStats.load(path)
    assert loaded.groups == stats.groups and loaded.damping == stats.damping
    assert loaded.modules == stats.modules and len(stats.token_counts) == 1 and len(stats.inputs) >= 3
    for name in stats.modules:
        assert loaded.tokens(name) == stats.tokens(name)
        if name in stats._by_module:
            assert torch.equal(loaded.raw(name), stats.raw(name))
            assert torch.equal(loaded.matrix(name), stats.matrix(name))
        else:
            assert torch.equal(loaded.counts(name), stats.counts(name))
    assert loaded.token_counts[0].padding_idx == stats.token_counts[0].padding_idx


def test_compressing_with_loaded_statistics_gives_the_same_model(saved):
    stats, path = saved
    fresh, reloaded = tiny(), tiny()
    kc.compress(fresh, RECIPE, calibration=stats)
    kc.compress(reloaded, RECIPE, calibration=CalibrationStats.load(path))
    for (name, a), (_, b) in zip(fresh.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_failed_save_leaves_the_old_file_and_no_temporary(saved, monkeypatch):
    stats, path = saved
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        stats.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors: no such calibration file.*kc\.calibrate"):
        CalibrationStats.load(tmp_path / "nowhere.safetensors")


def _rewrite(path, edit):
    """Re-save the file with `edit(tensors, metadata)` applied (a hand-edited or hostile file)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _groups(edit):
    def apply(tensors, metadata):
        groups = json.loads(metadata["groups"])
        edit(groups)
        metadata["groups"] = json.dumps(groups)
    return apply


def _nan(tensors, metadata):
    tensors["inputs.0.sum_xxt"][1, 2] = float("nan")


DAMAGED = [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-100]), ValueError, "truncated or not a safetensors"),
    ("not safetensors", lambda p: p.write_bytes(b"PK\x03\x04" + os.urandom(64)), ValueError, "truncated or not a safetensors"),
    ("another format", lambda p: _rewrite(p, lambda t, m: m.update(format="something-else")), ValueError,
     "not kroncompress calibration statistics"),
    ("newer version", lambda p: _rewrite(p, lambda t, m: m.update(version="99")), ValueError, "newer kroncompress"),
    ("version not a number", lambda p: _rewrite(p, lambda t, m: m.update(version="one")), ValueError, "version"),
    ("groups not JSON", lambda p: _rewrite(p, lambda t, m: m.update(groups="{oops")), ValueError, "metadata"),
    ("negative damping", lambda p: _rewrite(p, lambda t, m: m.update(damping="-1")), ValueError, "damping"),
    ("NaN statistic", lambda p: _rewrite(p, _nan), ValueError, r"inputs\.0\.sum_xxt: 1 of \d+ values are NaN"),
    ("non-square", lambda p: _rewrite(p, lambda t, m: t.update({"inputs.0.sum_xxt": t["inputs.0.sum_xxt"][:3]})),
     ValueError, "square"),
    ("missing tensor", lambda p: _rewrite(p, lambda t, m: t.pop("inputs.1.sum_xxt")), ValueError,
     r"groups\.inputs\[1\]: its tensor 'inputs\.1\.sum_xxt' is missing"),
    ("stray tensor", lambda p: _rewrite(p, lambda t, m: t.update(extra=torch.zeros(2))), ValueError,
     "tensor 'extra': no group refers to it"),
    ("module twice", lambda p: _rewrite(p, _groups(lambda g: g["inputs"][1]["modules"].extend(g["inputs"][0]["modules"]))),
     ValueError, r"groups\.inputs\[1\]\.modules.*listed twice"),
    ("negative tokens", lambda p: _rewrite(p, _groups(lambda g: g["inputs"][0].update(tokens=-5))), ValueError,
     r"groups\.inputs\[0\]\.tokens"),
    ("bad padding id", lambda p: _rewrite(p, _groups(lambda g: g["token_counts"][0].update(padding_idx=10**6))),
     ValueError, r"padding_idx"),
]


@pytest.mark.parametrize("damage, error, message", [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
def test_a_damaged_file_is_refused_with_its_name_and_field(saved, damage, error, message):
    _, path = saved
    damage(path)
    with pytest.raises(error, match=message) as caught:
        CalibrationStats.load(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("use", ["plan", "compress"])
def test_statistics_of_another_model_are_refused_naming_the_module(use):
    other = stats_of(tiny(n_embd=48))  # same module names, other widths
    model = tiny()
    with pytest.raises(ValueError, match=r"module 'transformer\.h\.0\.mlp\.c_fc'.*size 48.*reads 32 features.*"
                                         r"calibrate this model"):
        (kc.plan if use == "plan" else kc.compress)(model, RECIPE, calibration=other)
