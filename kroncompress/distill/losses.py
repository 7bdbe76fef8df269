"""Distillation losses: each term on its own, weighted and summed by `DistillationLoss`.

    loss_fn = DistillationLoss(LossWeights(), num_student_layers=12, num_teacher_layers=12)
    total, terms = loss_fn(student_outputs, teacher_outputs, attention_mask=mask)
    terms   # {"ce": ..., "hidden_mse": ..., "attention_kl": ..., "embedding_mse": ...}

The default weights are KnGPT2's ILKD: embedding MSE + attention KL + hidden-state MSE + CE.
Conventions (the paper leaves them open; docs/distillation.md explains them):

- KL direction: KL(teacher || student), the usual distillation direction (mode-covering);
- MSE: mean over elements within a block, summed over the mapped blocks (the paper's sum over l);
- attention KL: per block, averaged over batch, heads and the valid query rows, summed over blocks;
  only the key positions a query may attend to (causal + padding mask) enter the sum;
- logits KL: on softmax(logits / T), times T^2 (Hinton et al.) so gradients keep their scale;
  averaged over the non-padding token positions.

The hidden states and attention maps come from the models themselves (`output_hidden_states`,
`output_attentions`); attention maps need the eager attention implementation (`use_eager_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kroncompress.distill.models import (  # noqa: F401  (re-exported: used with the losses)
    disable_attention_dropout, is_causal, keep_inference_settings, use_eager_attention,
)
from kroncompress.recipe import LossWeights

LOSS_TERMS = ("ce", "logits_kl", "hidden_mse", "attention_kl", "embedding_mse")
# Clamp for log(probabilities): only reached by a student assigning ~0 mass where the teacher does not.
_LOG_FLOOR = 1e-30


# -- the terms -------------------------------------------------------------------------------------

def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, mean over the predicted tokens; labels -100 are ignored."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)


def logits_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over the vocabulary, mean over the (non-padding) tokens."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logits_kl: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; teacher and student must share the tokenizer/vocabulary")
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if student.requires_grad and student.shape[0] > KL_CHUNK_TOKENS:
        # A 262k vocabulary (Gemma) makes each float32 (tokens x vocab) temporary 1 GiB per 1k tokens: chunks
        # of tokens, each recomputed in backward, keep a handful of them alive instead of the whole batch's.
        per_token = torch.cat([checkpoint(_kl_rows, student[i:i + KL_CHUNK_TOKENS], teacher[i:i + KL_CHUNK_TOKENS],
                                          temperature, use_reentrant=False)
                               for i in range(0, student.shape[0], KL_CHUNK_TOKENS)])
    else:
        per_token = _kl_rows(student, teacher, temperature)
    return _masked_mean(per_token.view(student_logits.shape[:-1]), attention_mask) * temperature ** 2


KL_CHUNK_TOKENS = 128  # rows of logits per checkpointed chunk of logits_kl


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)


def embedding_mse(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the embedding outputs (hidden_states[0]), mean over elements of the non-padding tokens."""
    return _mse(student_embeddings, teacher_embeddings, attention_mask)


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               layer_map: Sequence[int], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over student blocks i of MSE(student block i output, teacher block layer_map[i] output).

    `student_hidden` / `teacher_hidden` are the models' `hidden_states` tuples (embedding output first,
    then one entry per block), so block i's output is entry i + 1.
    """
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for i, j in enumerate(layer_map):
        total = total + _mse(student_hidden[i + 1], teacher_hidden[j + 1], attention_mask)
    return total


def attention_kl(student_attentions: Sequence[torch.Tensor], teacher_attentions: Sequence[torch.Tensor],
                 layer_map: Sequence[int], attention_mask: torch.Tensor | None = None,
                 causal: bool = True) -> torch.Tensor:
    """Sum over student blocks i of KL(teacher attention of block layer_map[i] || student attention of block i).

    Each attention map is (batch, heads, queries, keys) of probabilities. Only the keys a query may attend
    to enter the sum (k <= q when `causal`, and non-padding keys of `attention_mask`); the KL of each row is
    averaged over batch, heads and the valid (non-padding) query rows.
    """
    total = student_attentions[0].new_zeros((), dtype=torch.float32)
    allowed = row_weight = None
    for i, j in enumerate(layer_map):
        student, teacher = student_attentions[i], teacher_attentions[j]
        if student.shape != teacher.shape:
            raise ValueError(f"attention_kl: student block {i} attention {tuple(student.shape)} and teacher block {j} "
                             f"attention {tuple(teacher.shape)} differ (heads or length); set attention_kl: 0 for models "
                             "with different head counts")
        if allowed is None or allowed.shape[-2:] != student.shape[-2:]:
            allowed = _allowed_keys(student, attention_mask, causal)
            rows = _query_rows(student, attention_mask)
            row_weight = (rows / (rows.sum() * student.shape[1]).clamp_min(1))[..., None]  # the mean over rows and heads
        # KL = sum w p_t log p_t - sum w p_t log p_s: the first sum needs no gradient, the second is one fused op
        with torch.no_grad():
            weight = teacher.float().masked_fill(~allowed, 0.0)
            log_teacher = weight.clamp_min(_LOG_FLOOR).log_()
            weight.mul_(row_weight)
            entropy = torch.dot(weight.reshape(-1), log_teacher.reshape(-1))
        total = total + (entropy - _WeightedLog.apply(student.float(), weight))
    return total


class _WeightedLog(torch.autograd.Function):
    """sum(weight * log(max(student, floor))) with a gradient for `student` only: two elementwise passes
    forward and backward, where autograd over clamp, log, mul and sum would keep and walk four."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        clamped = student.clamp_min(_LOG_FLOOR)
        ctx.save_for_backward(clamped, weight)
        return torch.dot(weight.reshape(-1), clamped.log().reshape(-1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        clamped, weight = ctx.saved_tensors
        # clamp_min passes no gradient below the floor
        return (weight / clamped).masked_fill_(clamped <= _LOG_FLOOR, 0.0).mul_(grad), None


def _allowed_keys(attention: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    queries, keys = attention.shape[-2:]
    allowed = torch.ones(queries, keys, dtype=torch.bool, device=attention.device)
    if causal:
        allowed = torch.ones_like(allowed).tril(diagonal=keys - queries)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -keys:].bool()
    return allowed


def _query_rows(attention: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, 1, queries) float weights: 1 for a real query token, 0 for padding."""
    batch, _, queries, _ = attention.shape
    if attention_mask is None:
        return attention.new_ones(batch, 1, queries, dtype=torch.float32)
    return attention_mask[:, None, -queries:].float()


def _mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if student.shape != teacher.shape:
        raise ValueError(f"hidden/embedding MSE: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; "
                         "the student must keep the teacher's hidden size")
    per_token = (student.float() - teacher.float()).pow(2).mean(-1)
    return _masked_mean(per_token, attention_mask)


def _masked_mean(per_token: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return per_token.mean()
    mask = attention_mask[:, -per_token.shape[1]:].to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


# -- the weighted sum ------------------------------------------------------------------------------

def _get(outputs: Any, name: str):
    return outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)


@dataclass
class DistillationLoss:
    """The weighted sum of the enabled terms (weight > 0) and each term on its own, for logging.

    `layer_map[i]` is the teacher block that student block i learns from (None: identity, which needs
    equal depths). `causal` says whether attention maps are causal (decoders; False for BERT-like encoders).
    """

    weights: LossWeights
    layer_map: list[int] | None = None
    causal: bool = True

    @property
    def enabled(self) -> dict[str, float]:
        """{term: weight} of the terms with a positive weight, in LOSS_TERMS order."""
        w = self.weights
        all_weights = {"ce": w.ce, "logits_kl": w.logits_kl.weight, "hidden_mse": w.hidden_mse,
                       "attention_kl": w.attention_kl, "embedding_mse": w.embedding_mse}
        return {name: float(all_weights[name]) for name in LOSS_TERMS if all_weights[name] > 0}

    @property
    def needs_teacher(self) -> bool:
        return any(name != "ce" for name in self.enabled)

    @property
    def needs_hidden_states(self) -> bool:
        return "hidden_mse" in self.enabled or "embedding_mse" in self.enabled

    @property
    def needs_attentions(self) -> bool:
        return "attention_kl" in self.enabled

    def student_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The student's forward arguments for a batch of token blocks: the labels only when `ce` is on (the
        model then computes its own next-token loss)."""
        labels = batch.get("labels") if "ce" in self.enabled else None
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "labels": labels}

    def teacher_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The teacher's forward arguments for a batch (`teacher_forward` adds the extra outputs)."""
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}

    def teacher_forward(self, teacher: nn.Module, **inputs: Any) -> Any:
        """The teacher's outputs for the enabled terms (call it under no_grad). Without a logits term only its
        base model runs: the hidden states and attention maps are the same, and the LM head's
        (tokens x hidden x vocab) product, the largest single matmul of a small model, is skipped."""
        model = teacher if "logits_kl" in self.enabled else getattr(teacher, "base_model", teacher)
        return model(**inputs, **self.model_kwargs())

    def model_kwargs(self) -> dict[str, bool]:
        """Keyword arguments for the forward passes: which extra outputs the enabled terms read."""
        return {"output_hidden_states": self.needs_hidden_states, "output_attentions": self.needs_attentions}

    def __call__(self, student_outputs: Any, teacher_outputs: Any = None, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, {term: unweighted value}) for one batch.

        `ce` is the student's own loss (`outputs.loss`, computed by the model from `labels`) or, when the
        model returned none, the next-token cross entropy of its logits against `labels`.
        """
        enabled = self.enabled
        terms: dict[str, torch.Tensor] = {}
        if "ce" in enabled:
            loss = _get(student_outputs, "loss")
            if loss is None:
                if labels is None:
                    raise ValueError("the ce loss needs labels: pass batches with 'labels' (or set ce: 0)")
                loss = causal_lm_loss(_get(student_outputs, "logits"), labels)
            terms["ce"] = loss.float()
        if self.needs_teacher and teacher_outputs is None:
            raise ValueError(f"loss terms {', '.join(n for n in enabled if n != 'ce')} need the teacher's outputs")
        layer_map = self.layer_map
        if "logits_kl" in enabled:
            terms["logits_kl"] = logits_kl(_get(student_outputs, "logits"), _get(teacher_outputs, "logits"),
                                           self.weights.logits_kl.temperature, attention_mask)
        if self.needs_hidden_states:
            s_hidden, t_hidden = _get(student_outputs, "hidden_states"), _get(teacher_outputs, "hidden_states")
            if s_hidden is None or t_hidden is None:
                raise ValueError("hidden_mse / embedding_mse need hidden states: run both models with output_hidden_states=True")
            if layer_map is None:
                layer_map = _identity_map(len(s_hidden) - 1, len(t_hidden) - 1)
            if "hidden_mse" in enabled:
                terms["hidden_mse"] = hidden_mse(s_hidden, t_hidden, layer_map, attention_mask)
            if "embedding_mse" in enabled:
                terms["embedding_mse"] = embedding_mse(s_hidden[0], t_hidden[0], attention_mask)
        if "attention_kl" in enabled:
            s_att, t_att = _get(student_outputs, "attentions"), _get(teacher_outputs, "attentions")
            if not s_att or not t_att or any(a is None for a in (*s_att, *t_att)):
                raise ValueError("attention_kl needs attention maps: load both models with attn_implementation='eager' "
                                 "(kroncompress.distill.use_eager_attention) and run them with output_attentions=True")
            if layer_map is None:
                layer_map = _identity_map(len(s_att), len(t_att))
            terms["attention_kl"] = attention_kl(s_att, t_att, layer_map, attention_mask, self.causal)
        ordered = {name: terms[name] for name in LOSS_TERMS if name in terms}
        total = sum(enabled[name] * value for name, value in ordered.items())
        return total, ordered


def _identity_map(student_layers: int, teacher_layers: int) -> list[int]:
    if student_layers != teacher_layers:
        raise ValueError(f"the student has {student_layers} blocks and the teacher {teacher_layers}: give distill.layer_map "
                         f"(one teacher block per student block, e.g. {spread_layer_map(student_layers, teacher_layers)})")
    return list(range(student_layers))


# -- model checks ----------------------------------------------------------------------------------

def num_layers(model: nn.Module) -> int:
    """The number of transformer blocks, from the config (num_hidden_layers / n_layer)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell how many blocks {type(model).__name__} has (no num_hidden_layers in its config); "
                     "give distill.layer_map explicitly")


def spread_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Evenly spread teacher blocks, first and last included: spread_layer_map(6, 12) == [0, 2, 4, 7, 9, 11]."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def resolve_layer_map(student: nn.Module, teacher: nn.Module, layer_map: Sequence[int] | None = None) -> list[int]:
    """The student-to-teacher block map: `layer_map` if given (validated); else the blocks a layer-dropping
    compression kept (recorded in the student's config); else the identity (equal depths only)."""
    s_layers, t_layers = num_layers(student), num_layers(teacher)
    if layer_map is None:
        section = getattr(student.config, "kroncompress", None) or {}
        kept = [entry["spec"]["keep"] for entry in section.get("structural", []) if "keep" in entry.get("spec", {})]
        if len(kept) == 1 and len(kept[0]) == s_layers:
            layer_map = kept[0]
        else:
            layer_map = _identity_map(s_layers, t_layers)
    layer_map = list(layer_map)
    if len(layer_map) != s_layers:
        raise ValueError(f"distill.layer_map has {len(layer_map)} entries but the student has {s_layers} blocks; "
                         "give one teacher block index per student block")
    bad = [j for j in layer_map if not 0 <= j < t_layers]
    if bad:
        raise ValueError(f"distill.layer_map: teacher blocks {bad} do not exist (the teacher has {t_layers} blocks, "
                         f"0..{t_layers - 1}); fix the indices")
    return layer_map


def check_same_vocabulary(student: nn.Module, teacher: nn.Module, student_tokenizer: Any = None,
                          teacher_tokenizer: Any = None) -> None:
    """Raise ValueError unless teacher and student share the vocabulary (and the tokenizer, when both are given)."""
    def vocab(model):
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "vocab_size", None)

    s_vocab, t_vocab = vocab(student), vocab(teacher)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ValueError(f"teacher vocabulary ({t_vocab} tokens) differs from the student's ({s_vocab}); teacher and "
                         "student must share one tokenizer: distil from the model the student was compressed from")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ValueError("the teacher's tokenizer differs from the student's; teacher and student must share one "
                             "tokenizer: distil from the model the student was compressed from")
