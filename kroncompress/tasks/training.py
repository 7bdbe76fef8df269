"""Training on a task: fine-tuning (the teacher) and distillation (the compressed student), both on the
distillation engine (kroncompress.distill: its trainer, TrainingArguments and evaluation schedule) with the
task's loss head (kroncompress.tasks.loss.TaskLoss) and the task's score as the evaluation.

    result = finetune("path/to/bert", "sst2", "glue/sst2", output_dir="runs/bert-sst2")
    history = distill_task(student, teacher, tokenizer, data, config)   # config: a recipe's DistillConfig

Distillation on a task weighs, as the recipe's `distill.losses` say:

- `ce`: the student's own task loss on the gold labels (cross entropy; MSE for a regression);
- `logits_kl`: KL between the teacher's and the student's class distributions at temperature T, times
  T^2 (`kroncompress.distill.losses.logits_kl`); for a regression, the MSE to the teacher's prediction;
- `hidden_mse`, `attention_kl`, `embedding_mse`: the intermediate terms of `DistillationLoss`, over the
  non-padding tokens, through the layer map (a layer-dropped student learns from the blocks it kept).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kroncompress.tasks.data import TaskData, cap_eval_splits, load_task, task_spec
from kroncompress.tasks.loss import TaskLoss
from kroncompress.tasks.modeling import collator, encode, evaluate_task, is_decoder, load_task_model

MAX_TRAINING_EVAL_EXAMPLES = 512  # the periodic scores during training use the first examples of the split


def _train(model: nn.Module, teacher: nn.Module | None, loss: TaskLoss, config: Any, tokenizer: Any, data: TaskData,
           *, max_steps: int | None, eval_every: int | None, scratch_near: Path | None, label: str, where: str,
           advice: str):
    """Train `model` in place with the distillation engine (its TrainingArguments, evaluation schedule and
    trainer) on the task's training examples, scoring it on the evaluation split at the start, every
    `eval_every` steps (default: the engine's schedule) and at the end. A non-finite loss stops it with an
    error naming `where` and the fix (`advice`). Returns (trainer state, score history, seconds)."""
    from kroncompress.distill.hf_trainer import DistillTrainer
    from kroncompress.distill.trainer import eval_every as schedule, training_arguments

    train_set = encode(data.train, tokenizer, data.spec.max_length)
    steps = max_steps or config.train.max_steps
    train = dataclasses.replace(config.train, max_steps=steps, eval_every=eval_every or config.train.eval_every)
    config = dataclasses.replace(config, train=dataclasses.replace(train, eval_every=schedule(train, len(train_set))))
    score = lambda m: evaluate_task(m, tokenizer, data, max_examples=MAX_TRAINING_EVAL_EXAMPLES)["score"]  # noqa: E731
    start = time.perf_counter()
    with _scratch(scratch_near) as scratch:
        args = training_arguments(config, scratch, max_steps=steps, has_eval=True, eval_on_start=True, save=False)
        # the examples stand in as eval_dataset (the Trainer wants one to schedule evaluations); `score` reads the split
        trainer = DistillTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=train_set,
                                 data_collator=collator(tokenizer), teacher=teacher, loss_fn=loss, score=score,
                                 where=where, advice=advice)
        _quiet(trainer, label)
        trainer.train()
    model.eval()
    history = [{"step": int(e["step"]), "score": float(e["eval_score"])} for e in trainer.state.log_history
               if "eval_score" in e]
    return trainer.state, history, time.perf_counter() - start


# -- fine-tuning -----------------------------------------------------------------------------------

@dataclasses.dataclass
class FinetuneResult:
    """A fine-tuned model, its tokenizer and task data, its scores and the training record."""

    model: nn.Module
    tokenizer: Any
    data: TaskData
    scores: dict[str, Any]
    steps: int
    seconds: float
    history: list[dict[str, float]]
    output_dir: str | None = None


def finetune(model: Any, task: Any, data: Any = None, output_dir: str | os.PathLike | None = None, *,
             tokenizer: Any = None, epochs: float = 3.0, max_steps: int | None = None, lr: float = 5e-5,
             batch_size: int = 16, seed: int = 0, warmup_ratio: float = 0.1, weight_decay: float = 0.01,
             max_grad_norm: float | None = 1.0, eval_every: int | None = None, overwrite: bool = False,
             max_examples: int | None = None, max_eval_examples: int | None = None) -> FinetuneResult:
    """Fine-tune `model` (a folder, hub id, the demo name, or a *ForSequenceClassification module with
    `tokenizer`) on the task: the teacher. A model without a classification head gets a new one.

    `task` is a GLUE name, a mapping of TaskSpec fields or a TaskSpec; `data` anything `load_task` reads
    (or a TaskData). With `output_dir`, the model and tokenizer are saved there (save_pretrained, written
    to a temporary folder and renamed into place) with finetune.json holding the task and the scores.
    `tokenizer` (an object, a folder or a hub id) replaces the model folder's and is saved with the model.
    `max_examples` keeps the first examples of every split; `max_eval_examples` scores each evaluation split
    on a seeded sample of that many (`cap_eval_splits`), recorded in finetune.json.
    """
    from kroncompress.distill.guards import check_finite_weights, check_training_settings
    from kroncompress.outputs import check_output_path, check_output_state
    from kroncompress.recipe import DistillConfig, TrainConfig

    check_training_settings(epochs=epochs, lr=lr, seed=seed)
    target = check_output_path(output_dir) if output_dir is not None else None
    if target is not None:
        check_output_state(target, overwrite=overwrite)
    data = data if isinstance(data, TaskData) else load_task(task_spec(task), data, max_examples=max_examples)
    data = cap_eval_splits(data, max_eval_examples)
    torch.manual_seed(seed)  # the new head's initialisation
    model, tokenizer = load_task_model(model, data, tokenizer=tokenizer)
    check_finite_weights(model, "model to fine-tune")
    # fine-tuning: the task head's ce term alone, no teacher
    config = DistillConfig(train=TrainConfig(
        lr=lr, batch_size=batch_size, epochs=epochs, max_steps=max_steps, seed=seed, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, schedule="linear", grad_accum=1, bf16=False))
    loss = TaskLoss({"ce": 1.0}, regression=data.spec.kind == "regression")
    state, history, seconds = _train(model, None, loss, config, tokenizer, data, max_steps=max_steps,
                                     eval_every=eval_every, scratch_near=target, label="finetune", where="finetune",
                                     advice="lower the learning rate (--lr / lr=), or check the data")
    check_finite_weights(model, "fine-tuned model", after_training=True, advice="lower the learning rate (--lr / lr=)")
    scores = evaluate_task(model, tokenizer, data)
    result = FinetuneResult(model=model, tokenizer=tokenizer, data=data, scores=scores, steps=state.global_step,
                            seconds=round(seconds, 3), history=history)
    if target is not None:
        save_task_model(model, tokenizer, data, target, {"scores": scores, "steps": result.steps, "seconds": result.seconds,
                                                         "history": result.history, "max_eval_examples": max_eval_examples}, overwrite=overwrite)
        result.output_dir = str(target)
    return result


def _quiet(trainer, label: str) -> None:
    """No tqdm bar nor printed log dicts; plain progress lines instead (step, ETA, loss, the last score), at
    the rhythm of kroncompress.progress, which a log file or CI output shows too."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from kroncompress.distill.hf_trainer import LogProgress

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LogProgress(label))  # it shows the last score from the logged eval_score


class _scratch:
    """A temporary folder for the Trainer's bookkeeping (nothing is checkpointed), removed afterwards."""

    def __init__(self, near: Path | None):
        self.near = near

    def __enter__(self) -> str:
        import tempfile

        parent = self.near.parent if self.near is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=".kroncompress-train-", dir=parent)
        return self.path

    def __exit__(self, *exc) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


TASK_FILE = "task.json"


def save_task_model(model: nn.Module, tokenizer: Any, data: TaskData, target: Path, record: dict[str, Any],
                    *, overwrite: bool = False) -> Path:
    """save_pretrained of model and tokenizer plus task.json (the task spec) and finetune.json (`record`),
    into a temporary folder renamed into place with its manifest (`kroncompress.outputs.replace_folder`:
    an existing `target` is replaced only with `overwrite`, and only when kroncompress wrote all of it)."""
    import json
    import shutil
    import uuid

    from kroncompress.outputs import replace_folder

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TASK_FILE).write_text(json.dumps(data.spec.to_dict(), indent=2) + "\n", encoding="utf-8")
        (tmp / "finetune.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        replace_folder(tmp, target, overwrite=overwrite, command="finetune")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# -- distillation --------------------------------------------------------------------------------------

def default_task_distill():
    """The distillation a task recipe without a `distill` section gets: ILKD on the task (CE on the gold
    labels, logit KD at T = 2, hidden MSE, attention KL, embedding MSE, all weight 1), 3 epochs, lr 5e-5."""
    from kroncompress.recipe import DistillConfig, LogitsKL, LossWeights, TrainConfig

    return DistillConfig(losses=LossWeights(ce=1.0, logits_kl=LogitsKL(weight=1.0, temperature=2.0), hidden_mse=1.0,
                                            attention_kl=1.0, embedding_mse=1.0),
                         train=TrainConfig(epochs=3.0, lr=5e-5, warmup_ratio=0.1, schedule="linear", batch_size=16))


def distill_task(student: nn.Module, teacher: nn.Module, tokenizer: Any, data: TaskData, config: Any = None, *,
                 max_steps: int | None = None, eval_every: int | None = None, scratch_near: Path | None = None) -> dict[str, Any]:
    """Train `student` in place on the task against the frozen `teacher` with `config` (a DistillConfig:
    its `losses`, `layer_map` and `train` settings; its `data` is not used, the task brings its own).
    Returns {"steps", "seconds", "losses" (logged terms per step), "history" ([{"step", "score"}] on the
    first evaluation split, at step 0, every `eval_every` steps and at the end), "layer_map"}."""
    from kroncompress.distill.losses import DistillationLoss, resolve_layer_map
    from kroncompress.distill.models import disable_attention_dropout, keep_inference_settings, use_eager_attention
    from kroncompress.recipe import LogitsKL, LossWeights

    config = copy.deepcopy(config) if config is not None else default_task_distill()
    weights = config.losses
    inner = DistillationLoss(LossWeights(ce=0.0, logits_kl=LogitsKL(weight=0.0), hidden_mse=weights.hidden_mse,
                                         attention_kl=weights.attention_kl, embedding_mse=weights.embedding_mse),
                             causal=is_decoder(student))
    loss = TaskLoss({"ce": weights.ce, "logits_kl": weights.logits_kl.weight}, temperature=weights.logits_kl.temperature,
                    regression=data.spec.kind == "regression", inner=inner)
    with keep_inference_settings(student, teacher):
        layer_map = None
        if loss.needs_teacher:
            teacher.eval()
            for param in teacher.parameters():
                param.requires_grad_(False)
            layer_map = resolve_layer_map(student, teacher, config.layer_map)
            if loss.inner is not None:
                loss.inner.layer_map = layer_map
                if loss.inner.needs_attentions:
                    use_eager_attention(student)
                    use_eager_attention(teacher)
                    disable_attention_dropout(student)
        state, history, seconds = _train(student, teacher if loss.needs_teacher else None, loss, config, tokenizer, data,
                                         max_steps=max_steps, eval_every=eval_every, scratch_near=scratch_near,
                                         label="task distill", where="task distillation",
                                         advice="lower the recipe's distill.train.lr, turn on train.max_grad_norm, "
                                                "or check the data")
    losses = [{"step": int(e["step"]), **{k[5:]: float(v) for k, v in e.items() if k.startswith("loss_")}}
              for e in state.log_history if any(k.startswith("loss_") for k in e)]
    return {"steps": int(state.global_step), "seconds": round(seconds, 3), "losses": losses, "history": history,
            "layer_map": layer_map, "terms": list(loss.enabled)}
