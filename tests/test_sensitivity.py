"""The measured module sensitivity (kroncompress/sensitivity.py) against an independent autograd computation."""

from __future__ import annotations

import pytest
import torch

from kroncompress.sensitivity import measure_sensitivity

TARGETS = {
    "gpt2": ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj"],
    "llama": ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"],
    "gemma3": ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"],
}


def _reference(model, blocks, names):
    """sum_t ||dL/dy_t||^2 / (m * tokens), with L the summed LM loss, from retained output gradients."""
    outputs = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda mod, args, out, n=n: outputs.__setitem__(n, out) or out.retain_grad())
               for n in names]
    model.zero_grad()
    logits = model(input_ids=blocks).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                                             reduction="sum")
    loss.backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    return {n: float(outputs[n].grad.double().pow(2).sum()) / (outputs[n].shape[-1] * blocks.numel()) for n in names}


@pytest.mark.parametrize("arch", sorted(TARGETS))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sensitivity_is_the_output_gradient_energy(arch, batch_size, tiny_model):
    model = tiny_model(arch)
    blocks = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    measured = measure_sensitivity(model, blocks, TARGETS[arch], batch_size=batch_size)
    expected = _reference(model, blocks, TARGETS[arch])
    for name in TARGETS[arch]:
        assert measured[name] == pytest.approx(expected[name], rel=1e-4)  # float32 gradients, summed over batches
    # the model is left as it was: trainable, no gradients, in eval mode
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and not model.training


def test_sensitivity_predicts_the_loss_of_a_small_output_perturbation(tiny_model):
    """1/2 s sum ||dy||^2 against the mean loss change of random output noise. On text sampled from the model
    itself the Fisher is the expected Hessian (and the mean gradient vanishes), so the prediction holds up to
    sampling noise and the isotropy assumption (which is not exact): asserted within a factor of 4, and the
    modules' order (their sensitivities differ by about 100x)."""
    model = tiny_model("gpt2")
    torch.manual_seed(1)
    blocks = model.generate(torch.full((16, 1), 5), do_sample=True, max_new_tokens=31, min_new_tokens=31, top_k=0,
                            pad_token_id=0)
    names = ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    s = measure_sensitivity(model, blocks, names)
    modules = dict(model.named_modules())

    def loss_with_noise(name, scale, seed):
        g = torch.Generator().manual_seed(seed)
        h = modules[name].register_forward_hook(lambda mod, args, out: out + scale * torch.randn(out.shape, generator=g))
        try:
            with torch.no_grad():
                logits = model(input_ids=blocks).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), blocks[:, 1:].reshape(-1),
                                                     reduction="sum").item()
        finally:
            h.remove()

    scale, draws = 0.05, 16
    base = loss_with_noise(names[0], 0.0, 0)
    actual, predicted = {}, {}
    for n in names:
        actual[n] = sum(loss_with_noise(n, scale, k) - base for k in range(draws)) / draws
        predicted[n] = 0.5 * s[n] * scale ** 2 * modules[n].nf * blocks.numel()  # E ||dy||^2 = scale^2 m per token
        assert predicted[n] / 4 <= actual[n] <= 4 * predicted[n]
    assert (actual[names[0]] < actual[names[1]]) == (predicted[names[0]] < predicted[names[1]])


def test_unknown_or_unreached_modules_are_named(tiny_model):
    model = tiny_model("gpt2")
    blocks = torch.randint(3, 128, (1, 8))
    with pytest.raises(ValueError, match="transformer.h.9.mlp.c_fc are not in the model"):
        measure_sensitivity(model, blocks, ["transformer.h.9.mlp.c_fc"])
    with pytest.raises(ValueError, match="no token blocks"):
        measure_sensitivity(model, [], ["transformer.h.0.mlp.c_fc"])


@pytest.mark.parametrize("regression", [False, True])
def test_labelled_examples_of_different_lengths_weigh_the_task_loss(regression):
    """A classifier on examples of different lengths, run one at a time: sum over examples of the task loss's
    output-gradient energy, divided by the tokens of all of them."""
    import transformers

    from kroncompress.tasks.loss import summed_task_loss

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_labels=1 if regression else 3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    names = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.attention.self.query"]
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(1, 64, (length,), generator=g).tolist(), "attention_mask": [1] * length,
                 "labels": (0.5 * i if regression else i % 3)} for i, length in enumerate((5, 9, 7))]
    measured = measure_sensitivity(model, examples, names, loss=summed_task_loss(regression))
    modules = dict(model.named_modules())
    energy = dict.fromkeys(names, 0.0)
    for example in examples:
        outputs = {}
        handles = [modules[n].register_forward_hook(lambda mod, args, out, n=n: outputs.__setitem__(n, out) or out.retain_grad())
                   for n in names]
        ids = torch.tensor([example["input_ids"]])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        label = torch.tensor([example["labels"]])
        loss = (torch.nn.functional.mse_loss(logits[:, 0], label.float(), reduction="sum") if regression
                else torch.nn.functional.cross_entropy(logits, label, reduction="sum"))
        loss.backward()
        for h in handles:
            h.remove()
        for n in names:
            energy[n] += float(outputs[n].grad.double().pow(2).sum())
    model.zero_grad()
    tokens = sum(len(e["input_ids"]) for e in examples)
    for n in names:
        assert measured[n] == pytest.approx(energy[n] / (modules[n].out_features * tokens), rel=1e-4)
    with pytest.raises(ValueError, match="no input_ids"):
        measure_sensitivity(model, [{"labels": 0}], names, loss=summed_task_loss(regression))
