"""How much the model's loss cares about each module's output: the measured weight that turns a module's output
error into a predicted loss increase, for the global budget allocation.

For a module with output y_t at token t, a small change dy_t moves the summed loss by about
g_t . dy_t + 1/2 dy_t^T H_t dy_t, g_t = dL/dy_t. Near a trained optimum the first term averages out and the
Fisher approximation H_t ~ g_t g_t^T, taken isotropically over the module's m outputs, gives

    dL ~ 1/2 * s * sum_t ||dy_t||^2,   s = sum_t ||g_t||^2 / (m * tokens),

so s times the module's squared output error (summed over the same calibration tokens, as the statistics
measure it) predicts the loss a truncation costs; modules are compared by it. L is the causal LM's
cross-entropy summed over the calibration tokens, so g_t is every later token's loss's gradient too.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn


def _lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy of a causal LM on `input_ids` (B, T)."""
    out = model(input_ids=input_ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       input_ids[:, 1:].reshape(-1), reduction="sum")


def measure_sensitivity(model: nn.Module, blocks, module_names: Iterable[str], *, batch_size: int = 1,
                        loss: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _lm_loss,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """s per module (see the module docs) from one forward and backward pass over `blocks`: (N, T) token ids,
    or examples, each a mapping of one sequence's model inputs (`input_ids`, `attention_mask`, `labels`, ...),
    run one at a time (their lengths differ) with `loss(model, {name: (1, ...) tensor})`.

    The model's parameters get no gradients and are left as they were; `loss(model, input_ids)` must return
    a summed (not averaged) scalar loss. `progress(done_tokens, total_tokens)` is called after each batch.
    """
    names = list(dict.fromkeys(module_names))
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"sensitivity: module(s) {', '.join(unknown[:3])} are not in the model; "
                         "pass names from model.named_modules()")
    if batch_size < 1:
        raise ValueError(f"sensitivity: batch_size must be >= 1, got {batch_size}")
    sequences = [_example(b) if isinstance(b, Mapping) else torch.as_tensor(b, dtype=torch.long) for b in blocks]
    if not sequences:
        raise ValueError("sensitivity: no token blocks to run; give calibration data with at least one block")
    energy = {n: 0.0 for n in names}
    width = {n: 0 for n in names}

    def hook(name):
        def record(module, grad_input, grad_output):
            g = grad_output[0]
            if g is not None:
                energy[name] += float(g.detach().double().pow(2).sum())
                width[name] = g.shape[-1]
        return record

    handles = [modules[n].register_full_backward_hook(hook(n)) for n in names]
    requires = {p: p.requires_grad for p in model.parameters()}
    target = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    examples = isinstance(sequences[0], dict)
    step = 1 if examples else batch_size
    total, done, tokens = sum(_tokens(s) for s in sequences), 0, 0
    try:
        model.eval()
        for p in requires:
            p.requires_grad_(False)
        for start in range(0, len(sequences), step):
            if examples:
                batch = {k: v.unsqueeze(0).to(target) for k, v in sequences[start].items()}
            else:
                batch = torch.stack(sequences[start:start + step]).to(target)
            embeds_need_grad = _input_grad_hook(model)
            try:
                loss(model, batch).backward()
            finally:
                embeds_need_grad.remove()
            done += _tokens(batch)
            tokens += _tokens(batch)
            if progress is not None:
                progress(done, total)
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(was_training)
    missing = [n for n in names if width[n] == 0]
    if missing:
        raise ValueError(f"sensitivity: module(s) {', '.join(missing[:3])} got no gradient (never ran, or their "
                         "output does not reach the loss); drop them from the budget's targets")
    return {n: energy[n] / (width[n] * tokens) for n in names}


def _example(example: Mapping) -> dict[str, torch.Tensor]:
    if "input_ids" not in example:
        raise ValueError(f"sensitivity: an example has no input_ids (it has {sorted(example)}); give each "
                         "example's model inputs as the tokenizer returns them")
    return {k: torch.as_tensor(v) for k, v in example.items()}


def _tokens(batch) -> int:
    return (batch["input_ids"] if isinstance(batch, dict) else batch).numel()


def _input_grad_hook(model: nn.Module):
    """With every parameter frozen nothing would need a gradient: make the input embeddings' output require
    one, so the backward pass reaches every module after them (what `enable_input_require_grads` does)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ValueError("sensitivity: the model has no input embeddings (get_input_embeddings); "
                         "measure it with uniform sensitivity instead")
    return embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
