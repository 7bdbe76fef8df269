"""The loss head of training on a task: what `kroncompress.distill.hf_trainer.DistillTrainer` (the one
trainer of every run) weighs when the batches are labelled examples instead of token blocks.

- `ce`: the student's own task loss on the gold labels (cross entropy; MSE for a regression);
- `logits_kl`: KL between the teacher's and the student's class distributions at temperature T, times
  T^2 (`kroncompress.distill.losses.logits_kl`); for a regression, the MSE to the teacher's prediction;
- `hidden_mse`, `attention_kl`, `embedding_mse`: the intermediate terms of `DistillationLoss`, over the
  non-padding tokens, through its layer map (`inner`).

Fine-tuning is the same head with only `ce` and no teacher.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kroncompress.distill.losses import DistillationLoss, logits_kl


class TaskLoss:
    """The weighted task terms (`head`: {"ce", "logits_kl"} -> weight) plus the intermediate terms of `inner`
    (a DistillationLoss without its own ce / logits terms, or None). Same interface as DistillationLoss."""

    def __init__(self, head: Mapping[str, float], *, temperature: float = 2.0, regression: bool = False,
                 inner: DistillationLoss | None = None):
        self.head = {name: float(weight) for name, weight in head.items() if weight > 0}
        self.temperature, self.regression = temperature, regression
        self.inner = inner if inner is not None and inner.enabled else None

    @property
    def enabled(self) -> dict[str, float]:
        return {**self.head, **(self.inner.enabled if self.inner is not None else {})}

    @property
    def needs_teacher(self) -> bool:
        return "logits_kl" in self.head or self.inner is not None

    def model_kwargs(self) -> dict[str, bool]:
        return self.inner.model_kwargs() if self.inner is not None else {}

    def student_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Every input of the example (input_ids, attention_mask, token_type_ids, ...) but its label."""
        return {k: v for k, v in batch.items() if k != "labels"}

    teacher_inputs = student_inputs

    def teacher_forward(self, teacher: nn.Module, **inputs: Any) -> Any:
        return teacher(**inputs, **self.model_kwargs())

    def __call__(self, student_outputs: Any, teacher_outputs: Any = None, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, {term: unweighted value}) for one batch of labelled examples."""
        logits = student_outputs.logits.float()
        terms: dict[str, torch.Tensor] = {}
        if "ce" in self.head:
            terms["ce"] = (F.mse_loss(logits[:, 0], labels.float()) if self.regression
                           else F.cross_entropy(logits, labels.long()))
        if "logits_kl" in self.head:
            teacher_logits = teacher_outputs.logits.float()
            terms["logits_kl"] = (F.mse_loss(logits, teacher_logits) if self.regression
                                  else logits_kl(logits, teacher_logits, self.temperature))
        total = sum(self.head[name] * value for name, value in terms.items())
        if self.inner is not None:
            inner_total, inner_terms = self.inner(student_outputs, teacher_outputs, None, attention_mask)
            total = total + inner_total
            terms.update(inner_terms)
        return total, terms


def summed_task_loss(regression: bool = False):
    """`loss(model, example)` for `kroncompress.sensitivity.measure_sensitivity` on labelled examples: the
    task loss of one example on its gold label (cross entropy; squared error for a regression), summed."""

    def loss(model: nn.Module, example: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**{k: v for k, v in example.items() if k != "labels"}).logits.float()
        labels = example["labels"].reshape(-1)
        if regression:
            return F.mse_loss(logits[:, 0], labels.float(), reduction="sum")
        return F.cross_entropy(logits, labels.long(), reduction="sum")

    return loss
