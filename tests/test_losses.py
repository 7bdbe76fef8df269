"""Distillation loss terms on hand-computable cases, the layer map, and the model checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import kroncompress as kc
from kroncompress.distill.losses import (
    LOSS_TERMS, DistillationLoss, attention_kl, causal_lm_loss, check_same_vocabulary, disable_attention_dropout,
    embedding_mse, hidden_mse, logits_kl, resolve_layer_map, spread_layer_map, use_eager_attention,
)
from kroncompress.recipe import LogitsKL, LossWeights

ALL_ON = LossWeights(ce=1.0, logits_kl=LogitsKL(1.0, 2.0), hidden_mse=1.0, attention_kl=1.0, embedding_mse=1.0)


def run(model, ids, labels=True):
    return model(input_ids=ids, labels=ids if labels else None, output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_identical_teacher_and_student_give_zero_distillation_terms(arch, tiny_model, tiny_inputs):
    model = tiny_model(arch)
    ids = tiny_inputs(arch)["input_ids"]
    with torch.no_grad():
        out = run(model, ids)
    total, terms = DistillationLoss(ALL_ON)(out, out)
    assert list(terms) == list(LOSS_TERMS)
    for name in ("logits_kl", "hidden_mse", "attention_kl", "embedding_mse"):
        assert abs(float(terms[name])) < 1e-6, name
    assert float(total) == pytest.approx(float(out.loss), abs=1e-5)


def test_ce_is_the_students_next_token_loss(tiny_model, tiny_inputs):
    model = tiny_model("gpt2")
    ids = tiny_inputs("gpt2")["input_ids"]
    with torch.no_grad():
        out = run(model, ids)
        no_loss = run(model, ids, labels=False)
    assert float(causal_lm_loss(out.logits, ids)) == pytest.approx(float(out.loss), rel=1e-5)
    _, terms = DistillationLoss(LossWeights(ce=1.0, hidden_mse=0, attention_kl=0, embedding_mse=0))(no_loss, labels=ids)
    assert float(terms["ce"]) == pytest.approx(float(out.loss), rel=1e-5)


@pytest.mark.parametrize("student, teacher, temperature", [
    ([0.0, 0.0], [math.log(3.0), 0.0], 1.0),      # teacher (3/4, 1/4), student (1/2, 1/2)
    ([1.0, -1.0], [0.0, 2.0], 2.0),
    ([2.0, 0.0], [2.0, 0.0], 4.0),                # equal: 0
])
def test_logits_kl_is_temperature_scaled_kl_teacher_to_student(student, teacher, temperature):
    s, t = torch.tensor(student), torch.tensor(teacher)
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    expected = temperature ** 2 * float((p * (p / q).log()).sum())
    got = logits_kl(s.view(1, 1, 2), t.view(1, 1, 2), temperature)
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_logits_kl_by_hand():
    got = logits_kl(torch.zeros(1, 1, 2), torch.tensor([[[math.log(3.0), 0.0]]]), temperature=1.0)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(got) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("tokens", [1, 128, 129, 300])  # around the chunk size (losses.KL_CHUNK_TOKENS = 128)
def test_logits_kl_in_checkpointed_chunks_matches_the_whole_batch(tokens):
    from kroncompress.distill import losses

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(1, tokens, 50, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, tokens, 50, generator=generator, dtype=torch.float64)
    mask = (torch.arange(tokens) % 3 != 0).long().view(1, -1)
    got = logits_kl(student, teacher, 2.0, mask)
    (grad,) = torch.autograd.grad(got, student)
    per_token = losses._kl_rows(student.view(-1, 50), teacher.view(-1, 50), 2.0).view(1, tokens)
    expected = (per_token * mask).sum() / mask.sum().clamp_min(1) * 4.0
    (expected_grad,) = torch.autograd.grad(expected, student)
    tolerance = 64 * tokens * torch.finfo(torch.float64).eps
    assert abs(float(got - expected)) <= tolerance * max(1.0, abs(float(expected)))
    assert torch.allclose(grad, expected_grad, atol=tolerance, rtol=0)


def test_logits_kl_ignores_padding_tokens():
    student, teacher = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)
    teacher[0, 1] = torch.tensor([5.0, 0.0, 0.0])  # differs only at the padded position
    assert float(logits_kl(student, teacher, 1.0, torch.tensor([[1, 0]]))) == 0.0
    assert float(logits_kl(student, teacher, 1.0)) > 0


def test_embedding_mse_by_hand():
    student, teacher = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    teacher[..., 0] = 3.0  # per element: (1-3)^2 = 4 on one of 4 features, 1 on the other three -> mean 7/4
    assert float(embedding_mse(student, teacher)) == pytest.approx(7 / 4)


@pytest.mark.parametrize("layer_map, expected", [
    ([0, 1, 2], (0 - 0) ** 2 + (1 - 10) ** 2 + (2 - 20) ** 2),
    ([0, 2, 2], (0 - 0) ** 2 + (1 - 20) ** 2 + (2 - 20) ** 2),
    ([2, 1, 0], (0 - 20) ** 2 + (1 - 10) ** 2 + (2 - 0) ** 2),
])
def test_hidden_mse_sums_block_mses_following_the_layer_map(layer_map, expected):
    # entry 0 is the embedding output; block i's output is entry i + 1 (student value i, teacher value 10 i)
    student = [torch.full((1, 2, 4), -99.0)] + [torch.full((1, 2, 4), float(i)) for i in range(3)]
    teacher = [torch.full((1, 2, 4), 99.0)] + [torch.full((1, 2, 4), 10.0 * i) for i in range(3)]
    assert float(hidden_mse(student, teacher, layer_map)) == pytest.approx(expected)


def causal_uniform(length: int) -> torch.Tensor:
    rows = torch.tril(torch.ones(length, length))
    return (rows / rows.sum(-1, keepdim=True))[None, None]


def test_attention_kl_by_hand():
    # teacher attends only to key 0; a uniform causal student gives KL = log(q + 1) on query row q
    length = 4
    teacher = torch.zeros(1, 1, length, length)
    teacher[..., 0] = 1.0
    expected = sum(math.log(q + 1) for q in range(length)) / length
    assert float(attention_kl([causal_uniform(length)], [teacher], [0])) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_attention_kl_ignores_masked_future_positions(which):
    generator = torch.Generator().manual_seed(0)
    length, heads = 5, 2

    def random_causal():
        scores = torch.randn(1, heads, length, length, generator=generator)
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
        return scores.softmax(-1)

    student, teacher = random_causal(), random_causal()
    base = float(attention_kl([student], [teacher], [0]))
    future = torch.ones(length, length).triu(1).bool()
    noise = torch.rand(1, heads, length, length, generator=generator) * future
    s2 = student + noise if which in ("student", "both") else student
    t2 = teacher + noise if which in ("teacher", "both") else teacher
    assert float(attention_kl([s2], [t2], [0])) == pytest.approx(base, abs=1e-7)
    # a change at an allowed position does change it
    s3 = student.clone()
    s3[0, 0, 3, 1] += 0.3
    assert float(attention_kl([s3], [teacher], [0])) != pytest.approx(base, abs=1e-4)


def test_attention_kl_ignores_padded_keys_and_queries():
    length = 4
    student = causal_uniform(length)
    teacher = causal_uniform(length).clone()
    teacher[0, 0, 3] = torch.tensor([0.7, 0.1, 0.1, 0.1])  # differs only on the padded query row 3
    mask = torch.tensor([[1, 1, 1, 0]])
    assert float(attention_kl([student], [teacher], [0], attention_mask=mask)) == pytest.approx(0.0, abs=1e-7)


def test_attention_kl_on_an_encoder_uses_every_key():
    uniform = torch.full((1, 1, 3, 3), 1 / 3)
    teacher = torch.tensor([1.0, 0.0, 0.0]).expand(1, 1, 3, 3)
    assert float(attention_kl([uniform], [teacher], [0], causal=False)) == pytest.approx(math.log(3), abs=1e-6)


def test_weighted_total_and_disabled_terms():
    weights = LossWeights(ce=0.5, logits_kl=LogitsKL(0.0), hidden_mse=2.0, attention_kl=0.0, embedding_mse=0.0)
    loss = DistillationLoss(weights)
    assert loss.enabled == {"ce": 0.5, "hidden_mse": 2.0}
    assert loss.model_kwargs() == {"output_hidden_states": True, "output_attentions": False}
    student = {"loss": torch.tensor(3.0), "hidden_states": [torch.zeros(1, 1, 2), torch.ones(1, 1, 2)]}
    teacher = {"hidden_states": [torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)]}
    total, terms = loss(student, teacher)
    assert set(terms) == {"ce", "hidden_mse"}
    assert float(total) == pytest.approx(0.5 * 3.0 + 2.0 * 1.0)


def test_missing_attention_maps_explain_eager_attention(tiny_model, tiny_inputs):
    model = tiny_model("gpt2")
    ids = tiny_inputs("gpt2")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)  # no output_attentions
    with pytest.raises(ValueError, match="eager"):
        DistillationLoss(LossWeights(ce=0, hidden_mse=0, embedding_mse=0, attention_kl=1.0))(out, out)


# -- layer map and model checks --------------------------------------------------------------------

def test_spread_layer_map_reproduces_distilgpt2():
    assert spread_layer_map(6, 12) == [0, 2, 4, 7, 9, 11]
    assert spread_layer_map(1, 4) == [3]


@pytest.mark.parametrize("student_layers, teacher_layers, layer_map, expected, error", [
    (2, 2, None, [0, 1], None),
    (2, 4, [1, 3], [1, 3], None),
    (2, 4, None, None, "give distill.layer_map"),
    (2, 4, [0, 1, 2], None, "has 3 entries"),
    (2, 4, [0, 4], None, r"teacher blocks \[4\] do not exist"),
])
def test_resolve_layer_map(student_layers, teacher_layers, layer_map, expected, error, tiny_model):
    student, teacher = tiny_model("gpt2", n_layer=student_layers), tiny_model("gpt2", n_layer=teacher_layers)
    if error:
        with pytest.raises(ValueError, match=error):
            resolve_layer_map(student, teacher, layer_map)
    else:
        assert resolve_layer_map(student, teacher, layer_map) == expected


def test_layer_map_defaults_to_the_blocks_layerdrop_kept(tiny_model):
    teacher = tiny_model("gpt2", n_layer=4)
    student = copy.deepcopy(teacher)
    recipe = kc.Recipe.from_dict({"version": 1, "name": "drop", "compress": [
        {"targets": ["transformer.h"], "strategy": "layerdrop", "options": {"keep": [0, 3]}}]})
    kc.compress(student, recipe)
    assert resolve_layer_map(student, teacher) == [0, 3]
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        s_out, t_out = run(student, ids), run(teacher, ids)
    loss = DistillationLoss(ALL_ON, layer_map=[0, 3])
    _, terms = loss(s_out, t_out)
    # kept blocks are the teacher's own: block 0 matches exactly; the embedding output too
    assert float(terms["embedding_mse"]) == pytest.approx(0.0, abs=1e-10)
    assert float(attention_kl(s_out.attentions[:1], t_out.attentions[:1], [0])) == pytest.approx(0.0, abs=1e-6)


def test_other_vocabulary_is_refused(tiny_model):
    with pytest.raises(ValueError, match="share one tokenizer"):
        check_same_vocabulary(tiny_model("gpt2"), tiny_model("gpt2", vocab_size=96))
    check_same_vocabulary(tiny_model("gpt2"), tiny_model("gpt2"))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "gpt_neox", "opt"])
def test_attention_dropout_is_turned_off(arch, tiny_config_of):
    import transformers

    # attention dropout on, every other dropout off, so any randomness left would be the attention's
    overrides = {"gpt2": {"attn_pdrop": 0.3, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
                 "llama": {"attention_dropout": 0.3},
                 "bert": {"attention_probs_dropout_prob": 0.3, "hidden_dropout_prob": 0.0},
                 "gpt_neox": {"attention_dropout": 0.3, "hidden_dropout": 0.0},
                 "opt": {"attention_dropout": 0.3, "dropout": 0.0}}[arch]
    config = tiny_config_of(arch, **overrides)
    model = (transformers.BertForMaskedLM(config) if arch == "bert" else transformers.AutoModelForCausalLM.from_config(config)).train()
    assert disable_attention_dropout(model) >= config.num_hidden_layers
    ids = torch.randint(1, 128, (1, 6))
    first = model(input_ids=ids, output_attentions=True).attentions[0]
    second = model(input_ids=ids, output_attentions=True).attentions[0]
    assert torch.equal(first, second)  # no dropout left on the probabilities
    assert torch.allclose(first.sum(-1), torch.ones(()), atol=1e-5)


def test_use_eager_attention_switches_sdpa_models(tiny_config_of):
    import transformers

    config = tiny_config_of("gpt2")
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    use_eager_attention(model)
    assert model.config._attn_implementation == "eager"
    assert model(input_ids=torch.randint(1, 128, (1, 4)), output_attentions=True).attentions[0] is not None
