"""Downstream tasks end to end on tiny models: fine-tune -> compress -> distil -> evaluate, for an encoder
(BERT) and decoders (GPT-2, Llama), single sentences, sentence pairs and a regression."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import kroncompress as kc
from kroncompress.tasks import distill_task, evaluate_task, finetune, load_task, load_task_model, run_task_pipeline
from kroncompress.tasks.modeling import is_decoder, predict
from kroncompress.tokenizers import byte_tokenizer

VOCAB = 260  # the byte tokenizer's 257 ids, rounded up
POSITIVE = ["a good film", "great fun", "lovely and warm", "superb acting", "really nice", "i loved it", "pure joy",
            "so good"]
NEGATIVE = ["a bad film", "dull stuff", "awful and cold", "poor acting", "really dire", "i hated it", "pure pain",
            "so bad"]
SENTIMENT = {
    "train": [{"sentence": s, "label": "pos"} for s in POSITIVE * 2] + [{"sentence": s, "label": "neg"} for s in NEGATIVE * 2],
    "validation": [{"sentence": s, "label": "pos"} for s in POSITIVE] + [{"sentence": s, "label": "neg"} for s in NEGATIVE],
}
SENTIMENT_TASK = {"name": "sentiment", "labels": ["neg", "pos"], "metrics": ["accuracy", "f1"], "max_length": 24}


def _config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if arch == "bert":
        config = transformers.BertConfig(**common, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, pad_token_id=256, **overrides)
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         bos_token_id=256, eos_token_id=256, **overrides)
    else:
        config = transformers.LlamaConfig(**common, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, bos_token_id=256,
                                          eos_token_id=256, **overrides)
    config._attn_implementation = "eager"
    return config


def pretrained(tmp_path, arch: str, **overrides):
    """A folder holding a tiny bare pretrained model (no task head) and the byte tokenizer."""
    torch.manual_seed(0)
    base = {"bert": transformers.BertModel, "gpt2": transformers.GPT2Model, "llama": transformers.LlamaModel}[arch]
    folder = tmp_path / f"{arch}-pretrained"
    base(_config(arch, **overrides)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory):
    """A tiny BERT fine-tuned on the sentiment toy task (dropout off, so a copy of it is the same function)."""
    tmp = tmp_path_factory.mktemp("teacher")
    folder = pretrained(tmp, "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    result = finetune(folder, SENTIMENT_TASK, SENTIMENT, tmp / "teacher", lr=3e-3, epochs=20, batch_size=8)
    return result


def test_finetune_makes_a_teacher_that_learns_the_task(bert_teacher):
    scores = bert_teacher.scores
    # 16 separable validation sentences, all seen in training: a trained head classifies all but a few
    assert scores["validation"]["accuracy"] >= 0.9, scores
    assert scores["score"] == pytest.approx((scores["validation"]["accuracy"] + scores["validation"]["f1"]) / 2)
    folder = bert_teacher.output_dir
    saved = json.loads((kc.tasks.training.Path(folder) / "task.json").read_text())
    assert saved["labels"] == ["neg", "pos"]
    model, tokenizer = load_task_model(folder, bert_teacher.data, require_head=True)
    assert evaluate_task(model, tokenizer, bert_teacher.data)["score"] == scores["score"]  # reloads as it was
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_encoder_kronecker_pipeline_scores_saves_and_reloads(bert_teacher, tmp_path):
    out = tmp_path / "kron"
    report = run_task_pipeline(bert_teacher.output_dir, "kron-task", out, task=SENTIMENT_TASK, data=SENTIMENT,
                               max_steps=6, eval_every=3)
    assert set(report["scores"]) == {"teacher", "compressed", "distilled"}
    assert report["scores"]["teacher"]["score"] == bert_teacher.scores["score"]
    assert report["params_after"] < report["params_before"]
    names = [row["name"] for row in report["compression"]["modules"]]
    assert names and all(".attention." in n or "intermediate" in n or n.endswith("output.dense") for n in names)
    assert not any("classifier" in n or "pooler" in n for n in names)  # the head stays dense
    assert [p["step"] for p in report["distill"]["history"]] == [0, 3, 6]
    assert set(report["distill"]["terms"]) == {"ce", "logits_kl", "hidden_mse", "attention_kl", "embedding_mse"}
    assert (out / "score.png").is_file() and (out / "task.json").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["scores"]["distilled"]["score"] == report["scores"]["distilled"]["score"]
    assert "calibrate" in saved["timings"]
    student = kc.load_compressed(out)  # the saved student is the distilled one
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    data = load_task(SENTIMENT_TASK, SENTIMENT)
    assert evaluate_task(student, tokenizer, data)["score"] == report["scores"]["distilled"]["score"]


def test_encoder_global_budget_measures_the_task_loss_sensitivity(bert_teacher, tmp_path):
    """budget-task: half the block matrices' weights together, ranks allocated by the sensitivity of the task's
    own loss (gold labels of the calibration examples), not the LM loss a classifier does not have."""
    report = run_task_pipeline(bert_teacher.output_dir, "budget-task", tmp_path / "budget", task=SENTIMENT_TASK,
                               data=SENTIMENT, max_steps=2)
    allocation = report["compression"]["allocation"]
    assert allocation["sensitivity"] == "measured" and allocation["basis"].startswith("output error")
    assert all(entry["sensitivity"] > 0 for entry in allocation["modules"].values())
    dense = sum(entry["dense_params"] for entry in allocation["modules"].values())
    assert allocation["params"] <= 0.5 * dense
    student = kc.load_compressed(tmp_path / "budget")
    assert type(student).__name__ == "BertForSequenceClassification"


def test_identical_student_has_zero_distillation_terms(bert_teacher, tmp_path):
    teacher = bert_teacher.model
    student = copy.deepcopy(teacher)
    config = kc.tasks.default_task_distill()
    config.train.lr = 1e-12  # one step that changes nothing measurable: the first logged terms are at the start
    summary = distill_task(student, teacher, bert_teacher.tokenizer, bert_teacher.data, config, max_steps=1)
    first = summary["losses"][0]
    for term in ("logits_kl", "hidden_mse", "attention_kl", "embedding_mse"):
        # the same float32 function on the same batch: equal outputs, so each term is zero up to rounding
        assert abs(first[term]) < 1e-6, (term, first)
    assert first["ce"] > 0


def test_distillation_pulls_a_fresh_student_towards_the_teacher(bert_teacher):
    from kroncompress.recipe import DistillConfig, LogitsKL, LossWeights, TrainConfig

    torch.manual_seed(1)
    student = type(bert_teacher.model)(copy.deepcopy(bert_teacher.model.config))  # same shape, random weights
    config = DistillConfig(losses=LossWeights(ce=0.0, logits_kl=LogitsKL(1.0, 2.0), hidden_mse=0.0, attention_kl=0.0,
                                              embedding_mse=0.0),
                           train=TrainConfig(lr=3e-3, batch_size=8, warmup_ratio=0.0, schedule="constant", epochs=1))
    from kroncompress.distill.losses import logits_kl

    train = bert_teacher.data.train
    teacher_logits = predict(bert_teacher.model, bert_teacher.tokenizer, train, max_length=24)
    before = logits_kl(predict(student, bert_teacher.tokenizer, train, max_length=24), teacher_logits, 2.0)
    summary = distill_task(student, bert_teacher.model, bert_teacher.tokenizer, bert_teacher.data, config, max_steps=40)
    after = logits_kl(predict(student, bert_teacher.tokenizer, train, max_length=24), teacher_logits, 2.0)
    assert summary["terms"] == ["logits_kl"] and summary["steps"] == 40
    # the KD term is what the optimizer minimises: over the whole training split it ends well below where it began
    assert after < 0.5 * before, (float(before), float(after))


def test_decoder_pair_task_layer_dropping(tmp_path):
    rows = [{"premise": f"the cat sat {i}", "hypothesis": ("yes it did" if i % 2 else "no never"), "label": i % 2}
            for i in range(24)]
    task = {"name": "pairs", "text": "premise", "text_pair": "hypothesis", "max_length": 32}
    data = {"train": rows, "validation": rows[:8]}
    teacher = finetune(pretrained(tmp_path, "gpt2"), task, data, tmp_path / "teacher", lr=2e-3, max_steps=12, batch_size=8)
    model, tokenizer = teacher.model, teacher.tokenizer
    assert is_decoder(model) and tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id == 256
    # last-token pooling: an example's logits do not depend on how far its batch pads it
    split = teacher.data.split("validation").subset(4)
    batched = predict(model, tokenizer, split, max_length=32)
    alone = torch.cat([predict(model, tokenizer, split.subset(i + 1).__class__(
        [split.texts[i]], [split.pairs[i]], [split.labels[i]]), max_length=32) for i in range(4)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)  # float32 rounding of differently-sized matmuls
    report = run_task_pipeline(tmp_path / "teacher", "layerdrop-task", tmp_path / "drop", task=task, data=data, max_steps=4)
    assert report["distill"]["layer_map"] == [0]  # the kept block learns from the teacher block it came from
    student = kc.load_compressed(tmp_path / "drop")
    assert student.config.n_layer == 1 and type(student).__name__ == "GPT2ForSequenceClassification"
    assert set(report["distill"]["terms"]) == {"ce", "logits_kl", "hidden_mse"}


def test_llama_regression_with_whitened_svd(tmp_path):
    rows = [{"sentence": "very " * (i % 4) + "good", "score": float(i % 4)} for i in range(24)]
    task = {"name": "sts", "kind": "regression", "label": "score"}
    data = {"train": rows, "validation": rows[:8]}
    teacher = finetune(pretrained(tmp_path, "llama"), task, data, tmp_path / "teacher", lr=2e-3, max_steps=12, batch_size=8)
    assert teacher.model.config.num_labels == 1 and teacher.model.config.problem_type == "regression"
    assert set(teacher.scores["validation"]) == {"pearson", "spearman", "score"}
    report = run_task_pipeline(tmp_path / "teacher", "svd-task", tmp_path / "svd", task=task, data=data, max_steps=3)
    assert report["compression"]["modules"][0]["strategy"] == "svd"
    for stage in ("teacher", "compressed", "distilled"):
        assert -1.0 <= report["scores"][stage]["score"] <= 1.0


def test_task_section_of_a_recipe_file(bert_teacher, tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SENTIMENT["train"]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SENTIMENT["validation"]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""version: 1
name: kron-sentiment
compress:
  - targets: ["role:attention"]
    strategy: kronecker
    options: {{ratio: 2, init: nkp}}
task:
  name: sentiment
  labels: [neg, pos]
  max_length: 24
  data: {tmp_path}
""")
    report = run_task_pipeline(bert_teacher.output_dir, recipe, tmp_path / "out", distill=False)
    assert report["task"]["name"] == "sentiment" and report["examples"] == {"train": 32, "validation": 16}
    assert "distilled" not in report["scores"]
    recipe.write_text(recipe.read_text().replace("max_length: 24", "max_lenght: 24"))
    with pytest.raises(ValueError, match=r"recipe.yaml: task: unknown field\(s\) 'max_lenght'"):
        run_task_pipeline(bert_teacher.output_dir, recipe, tmp_path / "out2")


def test_a_model_without_a_task_head_is_refused_with_the_fix(tmp_path):
    folder = pretrained(tmp_path, "bert")
    with pytest.raises(ValueError, match=r"not a model fine-tuned on the task; fine-tune it first"):
        run_task_pipeline(folder, "kron-task", tmp_path / "out", task=SENTIMENT_TASK, data=SENTIMENT)


def test_a_head_of_the_wrong_size_is_refused(bert_teacher, tmp_path):
    three = {"train": SENTIMENT["train"] + [{"sentence": "so so", "label": "mid"}], "validation": SENTIMENT["validation"]}
    with pytest.raises(ValueError, match=r"head has 2 output\(s\) but task sentiment needs 3 \(labels mid, neg, pos\)"):
        run_task_pipeline(bert_teacher.output_dir, "kron-task", tmp_path / "out", task={"name": "sentiment"}, data=three)
