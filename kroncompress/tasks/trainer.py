"""The Trainer of task distillation: the task loss (CE on gold labels, or MSE for regression), logit KD
against a frozen teacher, and the intermediate-layer terms of `DistillationLoss`; each term is logged as
`loss_<term>`; and `FinetuneTrainer`, the model's own loss checked finite at every step. At module level (not built inside a function) so it can be subclassed and inspected."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from kroncompress.distill.guards import check_finite_loss


class TaskDistillTrainer(Trainer):
    """A Trainer whose loss is the task distillation loss against a frozen teacher; each term is
    logged as `loss_<term>`."""

    def __init__(self, *args, teacher: nn.Module, head_weights: dict[str, float], temperature: float,
                 regression: bool, inner, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.teacher, self.head_weights, self.temperature = teacher, head_weights, temperature
        self.regression, self.inner = regression, inner
        if teacher is not None:
            teacher.to(self.args.device)
        self._sums: dict[str, float] = {}
        self._count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from kroncompress.distill.losses import logits_kl

        inputs = dict(inputs)
        labels = inputs.pop("labels")
        mask = inputs.get("attention_mask")
        extra = self.inner.model_kwargs() if self.inner is not None else {}
        outputs = model(**inputs, **extra)
        teacher_outputs = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_outputs = self.teacher(**inputs, **extra)
        logits = outputs.logits.float()
        terms: dict[str, torch.Tensor] = {}
        if "ce" in self.head_weights:
            terms["ce"] = (F.mse_loss(logits[:, 0], labels.float()) if self.regression
                           else F.cross_entropy(logits, labels.long()))
        if "logits_kl" in self.head_weights:
            teacher_logits = teacher_outputs.logits.float()
            terms["logits_kl"] = (F.mse_loss(logits, teacher_logits) if self.regression
                                  else logits_kl(logits, teacher_logits, self.temperature))
        total = sum(self.head_weights[name] * value for name, value in terms.items())
        if self.inner is not None:
            inner_total, inner_terms = self.inner(outputs, teacher_outputs, None, mask)
            total = total + inner_total
            terms.update(inner_terms)
        check_finite_loss(terms, step=self.state.global_step + 1, where="task distillation",
                          advice="lower the recipe's distill.train.lr, turn on train.max_grad_norm, or check the data")
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value.detach())
        self._count += 1
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._count:
            for name, value in self._sums.items():
                logs[f"loss_{name}"] = round(value / self._count, 6)
            self._sums, self._count = {}, 0
        super().log(logs, start_time)


class FinetuneTrainer(Trainer):
    """The Trainer of `finetune`: the model's own task loss, checked finite at every step."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        check_finite_loss({"loss": loss}, step=self.state.global_step + 1, where="finetune",
                          advice="lower the learning rate (--lr / lr=), or check the data")
        return (loss, outputs) if return_outputs else loss
