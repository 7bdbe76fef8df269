"""What distillation sets on the student and the teacher: causal attention or not, eager attention (the only
implementation returning attention maps) without attention dropout, and their inference settings given back
afterwards."""

from __future__ import annotations

import contextlib

from torch import nn


def is_causal(model: nn.Module) -> bool:
    """Decoder-only LMs attend causally; encoders (BERT-like, no is_decoder) do not."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = model.config
    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return False
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))


@contextlib.contextmanager
def keep_inference_settings(*models: nn.Module | None):
    """Give each model back its `use_cache` and attention implementation on exit: training switches them
    (attention maps need eager attention, the Trainer turns the KV cache off), and a saved or returned model
    should generate as fast as the original."""
    saved = [(m, getattr(m.config, "use_cache", None), getattr(m.config, "_attn_implementation", None))
             for m in models if m is not None and hasattr(m, "config")]
    try:
        yield
    finally:
        for model, use_cache, implementation in saved:
            if use_cache is not None:
                model.config.use_cache = use_cache
            if implementation and getattr(model.config, "_attn_implementation", None) != implementation:
                if hasattr(model, "set_attn_implementation"):
                    model.set_attn_implementation(implementation)
                else:
                    model.config._attn_implementation = implementation


def use_eager_attention(model: nn.Module) -> None:
    """Switch `model` to the eager attention implementation, the only one returning attention maps."""
    if getattr(model.config, "_attn_implementation", None) == "eager":
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"


def disable_attention_dropout(model: nn.Module) -> int:
    """Zero the dropout on attention probabilities (returned maps would otherwise be dropped-out samples,
    whose zeros make the attention KL explode). Returns how many dropouts were changed."""
    changed = 0
    for module in model.modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for name, child in module.named_children():
            if isinstance(child, nn.Dropout) and ("attn" in name or "attention" in name or name == "dropout") and child.p > 0:
                child.p = 0.0
                changed += 1
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed
