"""The adapter between the distillation engine and transformers' `Trainer`: everything that touches the
Trainer's API lives here, so a transformers upgrade is checked in one place.

    trainer = DistillTrainer(model=student, args=args, train_dataset=..., teacher=teacher, loss_fn=loss_fn)

One trainer for every run: the loss head (`loss_fn`) says what the student and the teacher are fed and how
their outputs are weighed: `DistillationLoss` for token blocks (kc.distill), `kroncompress.tasks.heads.TaskLoss`
for a labelled task (task distillation, and fine-tuning: the same head with only its `ce` term and no
teacher). What an evaluation measures is the run's: the validation perplexity of the blocks by default,
or `score(model)` (a task's metrics) when one is given; when it runs is the TrainingArguments'
(`training_arguments` and `eval_every` in kroncompress.distill.trainer: at the start, every `eval_every`
steps and at the end).

The public hooks it overrides (`compute_loss`, `log`, `evaluate`, `evaluation_loop`) and class attributes it sets
(`loss_is_scaled_for_ga`, `model_accepts_loss_kwargs`) are documented extension points. One private
method is overridden because no public hook does its job; `PRIVATE_OVERRIDES` lists it with the reason,
and tests/test_trainer.py fails when the installed transformers no longer has it with the same
signature (the supported range is `transformers` in pyproject.toml).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from kroncompress.distill.checkpoints import last_checkpoint
from kroncompress.distill.guards import NonFiniteLossError, check_finite_loss
from kroncompress.distill.losses import DistillationLoss

# name -> why no public hook can replace it
PRIVATE_OVERRIDES: dict[str, str] = {
    "_save": "the Trainer writes weights with save_pretrained, which refuses a compressed student (shared "
             "Kronecker factors, modules transformers does not know); save_model's other branches (FSDP, "
             "DeepSpeed, SageMaker) all end in _save, so it is the one place every checkpoint's weights pass",
}


def version_arguments(*, warmup_ratio: float, activation_checkpointing: bool = False) -> dict[str, Any]:
    """TrainingArguments keywords for warmup and activation checkpointing that mean the same on every supported
    transformers: from 5.0 a warmup fraction goes in `warmup_steps` (a float below 1; 5.x drops `warmup_ratio`),
    before it in `warmup_ratio` (4.x's `warmup_steps` counts steps: 0.05 would mean no warmup); checkpointing is
    `activation_checkpointing` from 5.23, `gradient_checkpointing` before it."""
    from dataclasses import fields

    from transformers import TrainingArguments

    known = {field.name: field for field in fields(TrainingArguments)}
    out: dict[str, Any] = {}
    if not warmup_ratio:
        out["warmup_steps"] = 0
    elif "float" in str(known["warmup_steps"].type):
        out["warmup_steps"] = float(warmup_ratio)
    else:
        out["warmup_ratio"] = float(warmup_ratio)
    key = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    out[key] = bool(activation_checkpointing)
    return out


class DistillTrainer(Trainer):
    """A Trainer computing the distillation loss against a frozen teacher.

    In training mode the loss is `loss_fn`'s weighted sum and every term is accumulated and logged as
    `loss_<term>`; in evaluation it is the student's plain LM loss, so `eval_loss` gives the validation
    perplexity (`eval_perplexity`, non-overlapping blocks). With `score`, an evaluation is instead
    `score(model)`, logged as `eval_score`.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; the Trainer divides by grad_accum

    def __init__(self, *args, teacher: nn.Module | None, loss_fn: DistillationLoss,
                 score: Callable[[nn.Module], float] | None = None, where: str | None = None,
                 advice: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_fn = loss_fn
        self.score = score
        self.where, self.advice = where, advice  # a run without checkpoints: its name and fix in the error
        self.teacher = teacher
        if teacher is not None:
            teacher.to(self.args.device)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, attention_mask = inputs.get("labels"), inputs.get("attention_mask")
        if not model.training:  # evaluation: the student's own LM loss
            outputs = model(input_ids=inputs["input_ids"], attention_mask=attention_mask, labels=labels)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        outputs = model(**self.loss_fn.student_inputs(inputs), **self.loss_fn.model_kwargs())
        teacher_outputs = None
        if self.loss_fn.needs_teacher:
            with torch.no_grad(), self.accelerator.autocast():
                teacher_outputs = self.loss_fn.teacher_forward(self.teacher, **self.loss_fn.teacher_inputs(inputs))
        total, terms = self.loss_fn(outputs, teacher_outputs, labels, attention_mask)
        self._check_finite(terms)
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach()
        self._term_count += 1
        return (total, outputs) if return_outputs else total

    def _check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        values = torch.stack([v.detach().float() for v in terms.values()])
        if bool(torch.isfinite(values).all()):
            return
        step = self.state.global_step + 1
        if self.where is not None:  # nothing to resume from (task runs keep no checkpoints)
            check_finite_loss(dict(zip(terms, values.tolist())), step=step, where=self.where, advice=self.advice or "")
        bad = ", ".join(f"{name}={float(v):g}" for name, v in zip(terms, values.tolist()) if not math.isfinite(v))
        last = last_checkpoint(self.args.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"non-finite loss at step {step} of {self.state.max_steps}: loss term {bad}; training stopped and {kept}. "
            "Lower the learning rate, check the data, or turn on gradient clipping (train.max_grad_norm), "
            "then resume from the checkpoint (resume=True / --resume)")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:
            names = list(self._term_sums)
            means = torch.stack([torch.as_tensor(self._term_sums[n], device=self.args.device, dtype=torch.float32)
                                 for n in names]) / self._term_count
            means = self.accelerator.reduce(means, reduction="mean")
            for name, value in zip(names, means.tolist()):
                logs[f"loss_{name}"] = round(value, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if self.score is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = {f"{metric_key_prefix}_score": float(self.score(self.model))}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        for key, loss in list(output.metrics.items()):  # "<prefix>_loss" -> "<prefix>_perplexity"
            if key.endswith("_loss") and isinstance(loss, float):
                output.metrics[key[: -len("loss")] + "perplexity"] = math.exp(min(loss, 700.0))
        return output

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # See PRIVATE_OVERRIDES. kroncompress.io's de-duplicated state dict is what safetensors accepts; the
        # Trainer's resume path reads it back with a non-strict load_state_dict, which matches these keys.
        from safetensors.torch import save_file

        from kroncompress.io.save import unique_state

        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        save_file(unique_state(model), os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model, "config"):
            model.config.save_pretrained(output_dir)


class RichProgress(TrainerCallback):
    """A rich progress bar on the main process: step, each loss term, tokens/s and ETA."""

    def __init__(self):
        self.progress = None
        self.task = None
        self.terms = ""
        self.start = None
        self.start_tokens = 0
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("distill"), BarColumn(bar_width=20), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[rate]}"),
                                 TextColumn("{task.fields[terms]}"), console=Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("distill", total=state.max_steps, completed=state.global_step,
                                           rate="", terms="")
        self.start, self.start_tokens, self.start_step = time.perf_counter(), state.num_input_tokens_seen, state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens = state.num_input_tokens_seen - self.start_tokens
        rate = f"{tokens / elapsed:,.0f} tok/s" if tokens else f"{(state.global_step - self.start_step) / elapsed:.2f} it/s"
        self.progress.update(self.task, completed=state.global_step, rate=rate, terms=self.terms)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        parts = [f"{k[5:]} {v:.4g}" for k, v in logs.items() if k.startswith("loss_")]
        if "eval_perplexity" in logs:
            parts.append(f"val ppl {logs['eval_perplexity']:.4g}")
        if parts:
            self.terms = " | ".join(parts)
            self.progress.update(self.task, terms=self.terms)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class LogProgress(TrainerCallback):
    """Plain progress lines on the main process for logs that are not a terminal (CI, nohup, a cluster job):
    `label: step/max steps (pct%), elapsed, ETA`, the loss terms and the rate, at the rhythm of
    `kroncompress.progress.ProgressLog` ($KRONCOMPRESS_PROGRESS_INTERVAL seconds, default 30)."""

    def __init__(self, label: str = "distill", interval: float | None = None, stream=None, status=None):
        from kroncompress.progress import ProgressLog

        self.log = ProgressLog(label, unit="steps", interval=interval, stream=stream)
        self.status = status  # a callable giving more to show (e.g. the last task score), or None
        self.terms = ""
        self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_tokens = state.num_input_tokens_seen
        if state.is_world_process_zero:
            self.log.update(state.global_step, state.max_steps, "started")

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        elapsed = max(self.log.timer() - (self.log.start or self.log.timer()), 1e-9)
        tokens = state.num_input_tokens_seen - self.start_tokens
        rate = f"{tokens / elapsed:,.0f} tok/s" if tokens else f"{(state.global_step - self.log.start_done) / elapsed:.2f} it/s"
        extra = self.status() if self.status is not None else ""
        self.log.update(state.global_step, state.max_steps, " | ".join(p for p in (self.terms, extra, rate) if p))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        parts = [f"{k[5:]} {v:.4g}" for k, v in logs.items() if k.startswith("loss_")]
        if not parts and isinstance(logs.get("loss"), (int, float)):
            parts.append(f"loss {logs['loss']:.4g}")
        for key in ("eval_perplexity", "eval_score"):
            if key in logs:
                parts.append(f"{'val ppl' if key == 'eval_perplexity' else 'score'} {logs[key]:.4g}")
        if parts:
            self.terms = " | ".join(parts)
