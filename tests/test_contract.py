"""The strategy contract as one matrix: every registered strategy x architecture x operation, then every
factorising strategy x module layout x dtype x module operation (as PEFT's tests/testing_common.py runs each
method through one set of checks).

A strategy joins by an entry in CASES (and, when it factorises modules, MODULE_OPTIONS); a registered strategy
without one fails `test_every_registered_strategy_has_a_case` instead of being skipped. A cell that cannot
apply is listed in NOT_APPLICABLE with its reason (pytest -rs shows it); every other cell runs.

Model operations, on tiny GPT-2 (Conv1D) and Llama (nn.Linear) models of 3 blocks from conftest:
plan (on the meta device and with weights), compress, save (save_compressed), load (load_compressed),
from_pretrained (transformers' Auto class, then save_pretrained and back), distil (one step, then save/load).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from functools import lru_cache

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import kroncompress as kc
from kroncompress.layers.base import FactorizedLinear
from kroncompress.surgery import count_params

from conftest import build_inputs, build_tiny, logits, recipe_of

ARCHS = ("gpt2", "llama")
OPS = ("plan", "compress", "save", "load", "from_pretrained", "distill")
LAYERS = 3  # blocks of every tiny model here: layer dropping keeps the first and the last


def ratio_options(strategy: str) -> dict:
    fields = {f.name for f in dataclasses.fields(kc.get_strategy(strategy).Config)}
    return {"ratio": 2, **({"n_iter_max": 3} if "n_iter_max" in fields else {})}  # iterations: speed only


# strategy -> its recipe rules (targets, options) on a tiny model. The iterative tensor decompositions are
# slow even on tiny matrices: fewer targets for them. A strategy that compresses embeddings takes the
# embedding too (GPT-2's is tied to the head: the tied head follows it).
CASES = {
    "kronecker": [(["role:embedding"], {"ratio": 2}), (["role:attn.o", "role:mlp"], ratio_options("kronecker"))],
    "svd": [(["role:attn.o", "role:mlp"], ratio_options("svd"))],
    "tucker": [(["role:attn.o"], ratio_options("tucker"))],
    "cp": [(["role:attn.o"], ratio_options("cp"))],
    "tt": [(["role:attn.o"], ratio_options("tt"))],
    "layerdrop": [(["role:layers"], {"keep": [0, LAYERS - 1]})],
}
# (strategy, arch, op) -> why that cell does not apply. Empty: every cell runs.
NOT_APPLICABLE: dict[tuple[str, str, str], str] = {}


def cells(op: str) -> list:
    params = []
    for strategy in CASES:
        for arch in ARCHS:
            reason = NOT_APPLICABLE.get((strategy, arch, op))
            marks = [pytest.mark.skip(reason=f"not applicable: {reason}")] if reason else []
            params.append(pytest.param(strategy, arch, marks=marks, id=f"{strategy}-{arch}"))
    return params


def structural(strategy: str) -> bool:
    return issubclass(kc.get_strategy(strategy), kc.StructuralStrategy)


def recipe_for(strategy: str) -> kc.Recipe:
    return recipe_of(*[(targets, strategy, options) for targets, options in CASES[strategy]])


def teacher(arch: str, device: str | None = None) -> nn.Module:
    return build_tiny(arch, device=device, **({"n_layer": LAYERS} if arch == "gpt2" else {"num_hidden_layers": LAYERS}))


@lru_cache(maxsize=None)
def _compressed(strategy: str, arch: str):
    model = teacher(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight-only initialisation (no calibration data)
        report = kc.compress(model, recipe_for(strategy))
    return model, report, logits(model, build_inputs(arch))


def compressed(strategy: str, arch: str):
    """(model, report, its logits) of the cell, compressed once per session; the model must not be changed."""
    return _compressed(strategy, arch)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(strategy, arch) -> the cell's save_compressed folder, written once per module."""
    folders = {}

    def folder_of(strategy: str, arch: str):
        if (strategy, arch) not in folders:
            model, report, _ = compressed(strategy, arch)
            out = tmp_path_factory.mktemp(f"{strategy}-{arch}") / "out"
            folders[strategy, arch] = kc.save_compressed(model, out, recipe=recipe_for(strategy), report=report,
                                                         metrics={"perplexity": 12.5})
        return folders[strategy, arch]

    return folder_of


def test_every_registered_strategy_has_a_case():
    assert set(CASES) == set(kc.list_strategies()), "add the strategy to CASES (and MODULE_OPTIONS if it factorises)"
    assert all(key[:2] in {(s, a) for s in CASES for a in ARCHS} and key[2] in OPS for key in NOT_APPLICABLE)


# -- model operations ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, arch", cells("plan"))
def test_plan(strategy, arch):
    recipe = recipe_for(strategy)
    on_meta, with_weights = kc.plan(teacher(arch, device="meta"), recipe), kc.plan(teacher(arch), recipe)
    assert on_meta.rows and [r.strategy for r in on_meta.rows] == [strategy] * len(on_meta.rows)
    describe = lambda plan: [(r.name, r.plan.kind, tuple(r.plan.shape), r.plan.params_before) for r in plan.rows]  # noqa: E731
    assert describe(on_meta) == describe(with_weights)
    assert on_meta.params_before == with_weights.params_before == count_params(teacher(arch))
    assert all(r.plan.params_after < r.plan.params_before for r in with_weights.rows)
    assert with_weights.params_after == compressed(strategy, arch)[1].params_after
    assert json.loads(json.dumps(with_weights.to_dict()))["modules"]  # plain JSON, what `kroncompress plan --json` prints


@pytest.mark.parametrize("strategy, arch", cells("compress"))
def test_compress(strategy, arch):
    model, report, compressed_logits = compressed(strategy, arch)
    original = teacher(arch)
    assert report.params_after == count_params(model) < report.params_before == count_params(original)
    assert {row.strategy for row in report.rows} == {strategy}
    for row in report.rows:
        if row.kind == "layers":
            assert row.name in ("transformer.h", "model.layers") and row.rel_error is None
            continue
        module = model.get_submodule(row.name)
        assert not isinstance(module, nn.Embedding) if row.kind == "embedding" else isinstance(module, FactorizedLinear)
        assert module.num_params == row.params_after and 0 < row.rel_error < 1
    if structural(strategy):
        assert model.config.num_hidden_layers == 2 and len(model.get_submodule(report.rows[0].name)) == 2
    assert compressed_logits.shape == logits(original, build_inputs(arch)).shape
    assert torch.isfinite(compressed_logits).all()


@pytest.mark.parametrize("strategy, arch", cells("save"))
def test_save(strategy, arch, saved):
    _, report, _ = compressed(strategy, arch)
    out = saved(strategy, arch)
    assert sorted(p.name for p in out.iterdir()) == [".kroncompress", "README.md", "config.json", "generation_config.json",
                                                     "model.safetensors", "recipe.yaml", "report.json"]
    manifest = json.loads((out / ".kroncompress").read_text())  # what a later overwrite may replace
    assert manifest["files"] == sorted(p.name for p in out.iterdir() if p.name != ".kroncompress")
    section = json.loads((out / "config.json").read_text())["kroncompress"]
    assert section["modules"].keys() == {row.name for row in report.rows if row.kind != "layers"}
    assert kc.load_recipe(out / "recipe.yaml") == recipe_for(strategy)
    saved_report = json.loads((out / "report.json").read_text())
    assert saved_report["params_after"] == report.params_after and saved_report["metrics"] == {"perplexity": 12.5}
    card = (out / "README.md").read_text()
    assert f"{report.params_before:,} before, {report.params_after:,} after" in card and "perplexity" in card
    if structural(strategy):
        assert "No module is factorized" in card


@pytest.mark.parametrize("strategy, arch", cells("load"))
def test_load(strategy, arch, saved):
    model, _, expected = compressed(strategy, arch)
    loaded = kc.load_compressed(saved(strategy, arch))
    assert torch.equal(logits(loaded, build_inputs(arch)), expected)
    assert not loaded.training
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("strategy, arch", cells("from_pretrained"))
def test_from_pretrained(strategy, arch, saved, tmp_path):
    model, _, expected = compressed(strategy, arch)
    inputs = build_inputs(arch)
    # a compressed folder records its attention implementation; a layer-dropped model saved by plain
    # save_pretrained is a plain transformers folder, which loads with the default one unless told
    eager = {"attn_implementation": "eager"} if structural(strategy) else {}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(saved(strategy, arch), **eager)
    assert type(loaded) is type(model) and not loaded.training
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    assert torch.equal(logits(loaded, inputs), expected)
    # save_pretrained of the reloaded model (and of the in-memory compressed one) reloads the same way
    for source, name in ((loaded, "resaved"), (model, "saved")):
        source.save_pretrained(tmp_path / name)
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, **eager)
        assert torch.equal(logits(again, inputs), expected), name
        reloaded = kc.load_compressed(tmp_path / name, **eager)
        assert torch.equal(logits(reloaded, inputs), expected), name
    if structural(strategy):  # a plain transformers folder: fewer blocks, nothing factorized, no refusal marker
        assert again.config.num_hidden_layers == 2
        assert "transformers_weights" not in json.loads((tmp_path / "saved" / "config.json").read_text())


@pytest.mark.parametrize("strategy, arch", cells("distill"))
def test_distill_a_step(strategy, arch, tmp_path):
    from kroncompress.distill.trainer import distill
    from kroncompress.recipe import DistillConfig, TrainConfig

    student = copy.deepcopy(compressed(strategy, arch)[0])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    data = torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    config = DistillConfig(train=TrainConfig(batch_size=2, lr=1e-3, warmup_ratio=0.0, max_steps=1, seed=0))
    result = distill(student, teacher(arch), config, data, output_dir=tmp_path / "run", progress=False)
    assert result.steps == 1 and result.final_losses
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final_losses.values())
    changed = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "one optimizer step changed no parameter"
    student.eval()
    folder = kc.save_compressed(student, tmp_path / "out")
    assert torch.equal(logits(kc.load_compressed(folder), build_inputs(arch)), logits(student, build_inputs(arch)))


# -- module operations: factorising strategy x layout x dtype -------------------------------------------------

MODULE_OPTIONS = {"kronecker": {"ratio": 2}, "svd": {"ratio": 2}, "tucker": {"ratio": 2}, "cp": {"ratio": 2},
                  "tt": {"ratio": 2}}
OUT_FEATURES, IN_FEATURES, VOCAB, DIM = 32, 48, 64, 16
DTYPES = [torch.float32, torch.float64]
# layout -> (strategy kind, dense class to_dense() must return)
LAYOUTS = {
    "linear": ("linear", nn.Linear),
    "linear_nobias": ("linear", nn.Linear),
    "conv1d": ("conv1d", Conv1D),
    "embedding": ("embedding", nn.Embedding),
}


def forward_tol(dtype: torch.dtype, n: int) -> float:
    """Relative to the largest output: the factorized and the dense forward differ by rounding only, and a
    length-n dot product in any order is within n eps of the sum of |x_i w_i|, a few times the largest
    |y| for these Gaussian inputs (4x margin; seen: at most 0.11 n eps)."""
    return 4 * n * torch.finfo(dtype).eps


def make_module(layout: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if layout == "linear":
        module = nn.Linear(IN_FEATURES, OUT_FEATURES)
    elif layout == "linear_nobias":
        module = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    elif layout == "conv1d":
        module = Conv1D(OUT_FEATURES, IN_FEATURES)
        nn.init.normal_(module.bias)  # Conv1D starts with a zero bias; make it visible in the output
    else:
        module = nn.Embedding(VOCAB, DIM)
    return module.to(dtype)


def weight_out_by_in(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def sample_input(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if isinstance(module, nn.Embedding):
        return torch.randint(0, module.num_embeddings, (3, 7), generator=generator)
    in_features = module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features
    return torch.randn(2, 5, in_features, generator=generator, dtype=dtype)


def grid():
    """Every factorising strategy x every layout of a kind it compresses x dtype (structural strategies have
    no module to factorise: their cells are the model operations above)."""
    cases = []
    for name in kc.list_strategies():
        if structural(name):
            continue
        for layout, (kind, _) in LAYOUTS.items():
            if kind in kc.get_strategy(name).kinds:
                cases += [pytest.param(name, layout, dtype, id=f"{name}-{layout}-{str(dtype)[6:]}") for dtype in DTYPES]
    return cases


def compress_module(name, layout, dtype):
    module = make_module(layout, dtype)
    strategy = kc.get_strategy(name)(**MODULE_OPTIONS[name])
    new, plan, error = strategy.compress_module(module)
    return module, strategy, new, plan, error


def test_every_factorising_strategy_has_module_options():
    factorising = {n for n in kc.list_strategies() if not structural(n)}
    assert set(MODULE_OPTIONS) == factorising
    covered = {(p.values[0], p.values[1]) for p in grid()}
    assert {("kronecker", "linear"), ("kronecker", "conv1d"), ("kronecker", "embedding"), ("svd", "conv1d")} <= covered


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_module_forward_equals_the_dense_forward(name, layout, dtype):
    module, _, new, _, _ = compress_module(name, layout, dtype)
    x = sample_input(module, dtype)
    dense = new.to_dense()
    assert type(dense) is LAYOUTS[layout][1]
    assert weight_out_by_in(dense).shape == weight_out_by_in(module).shape
    y = new(x)
    assert y.shape == module(x).shape and y.dtype == dtype
    n = DIM if layout == "embedding" else weight_out_by_in(module).shape[1]
    assert (y - dense(x)).abs().max() <= forward_tol(dtype, n) * y.abs().max()


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_module_forward_does_not_build_the_dense_weight(name, layout, dtype, monkeypatch):
    module, _, new, _, _ = compress_module(name, layout, dtype)
    monkeypatch.setattr(new, "dense_weight", lambda: pytest.fail("forward built the dense weight"))
    new(sample_input(module, dtype))


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_module_backward_reaches_every_parameter(name, layout, dtype):
    module, _, new, _, _ = compress_module(name, layout, dtype)
    x = sample_input(module, dtype)
    if layout == "embedding":
        x = torch.arange(module.num_embeddings)  # every row, so every factor entry gets a gradient
    new(x).pow(2).sum().backward()
    for param_name, param in new.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_module_plan_counts_and_reported_error(name, layout, dtype):
    module, strategy, new, plan, error = compress_module(name, layout, dtype)
    assert plan.strategy == name and plan.kind == LAYOUTS[layout][0]
    assert plan.params_before == sum(p.numel() for p in module.parameters())
    assert plan.params_after == new.num_params == sum(p.numel() for p in new.parameters())
    assert plan.params_after < plan.params_before
    W = weight_out_by_in(module).detach().double()
    expected = ((W - new.dense_weight().detach().double()).norm() / W.norm()).item()
    assert error == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert 0 < error < 1
    if layout != "embedding":
        assert plan.flops_after == new.flops_per_token()


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_module_build_without_factors_has_the_same_structure(name, layout, dtype):
    """build(plan) with no factors is what loading a saved model uses: same parameter names and shapes."""
    _, strategy, new, plan, _ = compress_module(name, layout, dtype)
    plan = kc.LayerPlan.from_dict(plan.to_dict())
    empty = strategy.build(plan, device="meta", dtype=dtype)
    shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in empty.state_dict().items()} == shapes
    assert all(v.dtype == dtype for v in empty.state_dict().values())


@pytest.mark.parametrize("name,layout,dtype", grid())
def test_module_plan_needs_no_weights(name, layout, dtype):
    module, strategy, _, plan_with_weight, _ = compress_module(name, layout, dtype)
    shape = tuple(weight_out_by_in(module).shape)
    bias = getattr(module, "bias", None) is not None
    plan = strategy.plan(shape, LAYOUTS[layout][0], bias=bias)
    meta = weight_out_by_in(module).detach().to("meta")
    assert strategy.plan(shape, LAYOUTS[layout][0], weight=meta, bias=bias) == plan
    assert plan.params_before == plan_with_weight.params_before
