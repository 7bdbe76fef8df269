"""LoRA (PEFT) on compressed models: adapters attach to every factorised layer, train, save and reload onto a
`from_pretrained` compressed model with the same logits, and merge exactly into low-rank layers."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import kroncompress as kc

from conftest import build_inputs, build_tiny, logits, recipe_of

peft = pytest.importorskip("peft")

RULES = {
    "kronecker": [(["role:attention", "role:mlp"], "kronecker", {"ratio": 2})],
    "svd": [(["role:attention", "role:mlp"], "svd", {"rank": 8})],
    "mixed": [(["role:attn.qkv"], "kronecker", {"ratio": 2}), (["role:mlp"], "svd", {"rank": 8}),
              (["role:attn.o"], "tucker", {"ratio": 2, "n_iter_max": 3})],
}


def compressed(case: str, arch: str = "gpt2") -> torch.nn.Module:
    model = build_tiny(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight-only initialisation
        kc.compress(model, recipe_of(*RULES[case]))
    return model


def with_adapter(model, seed: int = 0):
    torch.manual_seed(seed)
    return peft.get_peft_model(model, kc.lora.lora_config(r=4, lora_alpha=8, target_modules=kc.lora.lora_targets(model)))


def train(model, steps: int = 8) -> list[float]:
    batch = build_inputs("gpt2", batch=4, length=16)["input_ids"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make_config", [peft.LoraConfig, kc.lora.lora_config])
def test_plain_lora_config_and_ours_both_accept(make_config):
    # a plain LoraConfig works because importing kroncompress taught PEFT our layers (kroncompress.peft_compat)
    model = compressed("kronecker")
    wrapped = peft.get_peft_model(model, make_config(r=4, target_modules=["c_attn"]))
    adapted = [n for n, m in wrapped.named_modules() if isinstance(m, kc.lora.FactorizedLoraLinear)]
    assert len(adapted) == 2  # one per block


def test_lora_targets_names_every_factorised_layer_and_refuses_a_dense_model():
    model = compressed("mixed")
    targets = kc.lora.lora_targets(model)
    assert targets == [n for n, m in model.named_modules() if isinstance(m, kc.FactorizedLinear)] and targets
    with pytest.raises(ValueError, match="no factorised layer"):
        kc.lora.lora_targets(build_tiny("gpt2"))


@pytest.mark.parametrize("case", sorted(RULES))
def test_lora_trains_only_the_adapter_then_saves_and_reloads(tmp_path, case):
    model = compressed(case)
    folder = kc.save_compressed(model, tmp_path / "compressed")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = with_adapter(model)
    # fresh adapters are a no-op (B = 0)
    inputs = build_inputs("gpt2")
    assert torch.equal(logits(wrapped, inputs), logits(kc.load_compressed(folder), inputs))

    losses = train(wrapped)
    assert losses[-1] < losses[0] - 0.05, losses
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = wrapped.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" not in name:  # the compressed factors did not move
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), name

    wrapped.eval()
    expected = logits(wrapped, inputs)
    wrapped.save_pretrained(tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    reloaded = kc.lora.load_adapter(base, tmp_path / "adapter")
    assert torch.equal(logits(reloaded, inputs), expected)


def test_merge_into_low_rank_layers_is_exact_and_saves(tmp_path):
    wrapped = with_adapter(compressed("svd"))
    train(wrapped, steps=3)
    wrapped.eval()
    inputs = build_inputs("gpt2")
    expected = logits(wrapped, inputs)
    merged = kc.lora.merge(wrapped)
    assert not any("lora" in type(m).__name__.lower() for m in merged.modules())
    ranks = {m.rank for m in merged.modules() if isinstance(m, kc.LowRankLinear)}
    assert ranks == {8 + 4}
    got = logits(merged, inputs)
    # the merge reassociates (x V^T U^T + x A^T B^T) into one pair of GEMMs: float32 rounding of the sum
    tol = 4 * 64 * torch.finfo(torch.float32).eps * expected.abs().max()
    assert (got - expected).abs().max() <= tol
    folder = kc.save_compressed(merged, tmp_path / "merged")
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(folder), inputs), got)
    assert torch.equal(logits(kc.load_compressed(folder), inputs), got)


def test_unmerge_restores_the_low_rank_layer():
    wrapped = with_adapter(compressed("svd"))
    train(wrapped, steps=2)
    layer = next(m for m in wrapped.modules() if isinstance(m, kc.lora.FactorizedLoraLinear))
    before = layer.get_base_layer().dense_weight().detach().clone()
    layer.merge()
    assert layer.get_base_layer().rank == 12
    layer.unmerge()
    assert layer.get_base_layer().rank == 8 and torch.equal(layer.get_base_layer().dense_weight(), before)


def test_merge_into_a_kronecker_layer_is_refused_with_the_reason():
    wrapped = with_adapter(compressed("kronecker"))
    with pytest.raises(ValueError, match="KroneckerLinear.*lose its compression"):
        kc.lora.merge(wrapped)
