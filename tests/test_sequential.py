"""Sequential calibration (kroncompress/sequential.py): moments taken with the earlier modules compressed."""

from __future__ import annotations

import copy

import pytest
import torch

import kroncompress as kc
from conftest import assert_reloads
from kroncompress.linalg.whitening import damp
from kroncompress.sequential import SequentialStatistics

TARGETS = {"gpt2": ["role:attention", "role:mlp"], "llama": ["role:attention", "role:mlp"]}


def _setup(tiny_model, arch):
    model = tiny_model(arch)
    teacher = copy.deepcopy(model)
    recipe = kc.Recipe.from_dict({"version": 1, "name": "seq", "compress": [
        {"targets": TARGETS[arch], "strategy": "svd", "options": {"ratio": 2}}]})
    blocks = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    return model, teacher, recipe, blocks


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_groups_follow_the_forward_and_share_inputs(arch, tiny_model):
    model, teacher, recipe, blocks = _setup(tiny_model, arch)
    names = [row.name for row in kc.plan(model, recipe).rows]
    groups = SequentialStatistics(teacher, blocks).groups(names)
    assert sorted(n for g in groups for n in g) == sorted(names)
    if arch == "llama":  # q, k, v read one input; gate and up another
        assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                "model.layers.0.self_attn.v_proj"] in groups
        assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in groups
    else:
        assert groups[:4] == [["transformer.h.0.attn.c_attn"], ["transformer.h.0.attn.c_proj"],
                              ["transformer.h.0.mlp.c_fc"], ["transformer.h.0.mlp.c_proj"]]


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_each_group_is_measured_on_the_partly_compressed_student(arch, tiny_model, tmp_path):
    model, teacher, recipe, blocks = _setup(tiny_model, arch)
    sequential = SequentialStatistics(teacher, blocks, batch_size=3)
    collected = {}
    collect = sequential.collect
    sequential.collect = lambda student, group: collected.setdefault(tuple(group), collect(student, group))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    report = kc.compress(model, recipe, sequential=sequential)
    assert all("sequential statistics" in row.note for row in report.rows)
    assert all(row.output_error <= row.output_error_before_refit * (1 + 1e-6) for row in report.rows)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert sequential.passes == len(collected)
    # the last group's Css is the second moment of its input in the student as compressed before it
    last = list(collected)[-1]
    seen = []
    handle = model.get_submodule(last[0]).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=blocks)
    handle.remove()
    x = torch.cat(seen)
    expected = damp(x.T @ x / x.shape[0], sequential.damping)
    assert torch.allclose(collected[last][last[0]].ss, expected, rtol=1e-5, atol=1e-7 * expected.abs().max().item())
    # the first group saw nothing compressed upstream: student and teacher inputs agree
    first = collected[list(collected)[0]][list(collected)[0][0]]
    assert torch.allclose(first.ts, first.tt, rtol=1e-6, atol=1e-9 * first.tt.abs().max().item())
    assert_reloads(model, tmp_path / "out")


def test_blocks_are_checked():
    with pytest.raises(ValueError, match="non-empty"):
        SequentialStatistics(torch.nn.Linear(2, 2), torch.zeros(0, 4, dtype=torch.long))


def test_the_pipeline_runs_a_sequential_budgeted_compression(tiny_folder, tmp_path):
    folder, text = tiny_folder
    recipe = kc.Recipe.from_dict({"version": 1, "name": "seq-budget",
                                  "compress": [{"targets": ["role:attention", "role:mlp"], "strategy": "svd",
                                                "options": {"ratio": 2}}],
                                  "budget": {"keep": 0.5},
                                  "calibration": {"tokens": 512, "block_size": 32, "sequential": True}})
    report = kc.run_pipeline(folder, recipe, tmp_path / "out", data=str(text), distill=False, measure_speed=False)
    modules = report["compression"]["modules"]
    assert report["calibration"]["sequential"] is True
    assert modules and all("sequential statistics" in m["note"] and "budget:" in m["note"] for m in modules)
    allocation = report["compression"]["allocation"]
    assert allocation["sensitivity"] == "measured" and allocation["params"] <= allocation["budget"]
    assert kc.load_compressed(tmp_path / "out") is not None


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_keeping_block_inputs_gives_the_moments_of_whole_passes(arch, tiny_model):
    """The layer-by-layer path (each pass runs one block on kept inputs) against whole-model passes: the same
    cross moments for every group, with the student compressed group by group in both."""
    results = {}
    for layerwise in (True, False):
        model = tiny_model(arch)
        teacher = copy.deepcopy(model)
        recipe = kc.Recipe.from_dict({"version": 1, "name": "seq", "compress": [
            {"targets": ["role:attention", "role:mlp"], "strategy": "svd", "options": {"ratio": 2}}]})
        blocks = torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(0))
        sequential = SequentialStatistics(teacher, blocks, batch_size=2, layerwise=layerwise)
        collected = {}
        collect = sequential.collect
        sequential.collect = lambda student, group: collected.setdefault(tuple(group), collect(student, group))
        kc.compress(model, recipe, sequential=sequential)
        assert (sequential._inputs is not None) == layerwise and sequential.layerwise == layerwise
        results[layerwise] = collected
    assert list(results[True]) == list(results[False])
    for group, moments in results[False].items():
        for name, expected in moments.items():
            got = results[True][group][name]
            for part in ("ss", "ts", "tt"):
                a, b = getattr(got, part), getattr(expected, part)
                # float32 activations, the same ops in the same order: equal up to summation-order rounding
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item()), (group, name, part)


class _ShiftedStack(torch.nn.Module):
    """A stack whose forward adds 1 between blocks: block i + 1 does not read block i's output."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h) + 1.0
        return h


def test_a_stack_that_is_not_a_chain_falls_back_to_whole_passes():
    torch.manual_seed(0)
    teacher = _ShiftedStack()
    student = copy.deepcopy(teacher)
    blocks = torch.randint(0, 16, (3, 5), generator=torch.Generator().manual_seed(0))
    sequential = SequentialStatistics(teacher, blocks, batch_size=2)
    moments = sequential.collect(student, ["layers.1"])
    assert sequential.layerwise is False and sequential._inputs is None
    with torch.no_grad():
        x = (teacher.layers[0](teacher.embed(blocks)) + 1.0).reshape(-1, 4).double()
    assert torch.allclose(moments["layers.1"].tt, x.T @ x / x.shape[0], rtol=1e-6)
