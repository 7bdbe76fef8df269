"""Role names per architecture, so one recipe (`targets: ["role:attention", "role:mlp"]`) fits many families.

`ROLES[model_type][role]` is a list of glob patterns. `{base}` stands for the base model's attribute
(`transformer.` in GPT2LMHeadModel, empty in a bare GPT2Model), so the same table serves heads and bare
models. Roles:

- `attention`: every attention projection; `attn.q`, `attn.k`, `attn.v`, `attn.o` one of them
  (fused architectures such as GPT-2 or GPT-NeoX have `attn.qkv` instead of q/k/v);
- `mlp`: every MLP projection;
- `embedding`: the token embedding; `head`: the output projection (LM head or classifier);
- `layers`: the ModuleList of transformer blocks (what `layerdrop` targets).

Some families list the module names of several transformers releases (e.g. ViT's `encoder.layer`
before 5.x); a pattern that matches nothing is harmless.
"""

from __future__ import annotations

from typing import Any

_LLAMA_LIKE = {
    "attention": ["{base}layers.*.self_attn.q_proj", "{base}layers.*.self_attn.k_proj",
                  "{base}layers.*.self_attn.v_proj", "{base}layers.*.self_attn.o_proj"],
    "attn.q": ["{base}layers.*.self_attn.q_proj"],
    "attn.k": ["{base}layers.*.self_attn.k_proj"],
    "attn.v": ["{base}layers.*.self_attn.v_proj"],
    "attn.o": ["{base}layers.*.self_attn.o_proj"],
    "mlp": ["{base}layers.*.mlp.gate_proj", "{base}layers.*.mlp.up_proj", "{base}layers.*.mlp.down_proj"],
    "embedding": ["{base}embed_tokens"],
    "head": ["lm_head"],
    "layers": ["{base}layers"],
}

_BERT_LIKE = {
    "attention": ["{base}encoder.layer.*.attention.self.query", "{base}encoder.layer.*.attention.self.key",
                  "{base}encoder.layer.*.attention.self.value", "{base}encoder.layer.*.attention.output.dense"],
    "attn.q": ["{base}encoder.layer.*.attention.self.query"],
    "attn.k": ["{base}encoder.layer.*.attention.self.key"],
    "attn.v": ["{base}encoder.layer.*.attention.self.value"],
    "attn.o": ["{base}encoder.layer.*.attention.output.dense"],
    "mlp": ["{base}encoder.layer.*.intermediate.dense", "{base}encoder.layer.*.output.dense"],
    "embedding": ["{base}embeddings.word_embeddings"],
    "head": ["cls.predictions.decoder", "classifier"],
    "layers": ["{base}encoder.layer"],
}

ROLES: dict[str, dict[str, list[str]]] = {
    "gpt2": {
        "attention": ["{base}h.*.attn.c_attn", "{base}h.*.attn.c_proj"],
        "attn.qkv": ["{base}h.*.attn.c_attn"],
        "attn.o": ["{base}h.*.attn.c_proj"],
        "mlp": ["{base}h.*.mlp.c_fc", "{base}h.*.mlp.c_proj"],
        "embedding": ["{base}wte"],
        "head": ["lm_head"],
        "layers": ["{base}h"],
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": {**_LLAMA_LIKE, "mlp": ["{base}layers.*.block_sparse_moe.experts.*.w[123]"]},
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    # Gemma 3: the text-only checkpoints (Gemma3ForCausalLM, e.g. gemma-3-270m) are `gemma3_text`; the
    # multimodal Gemma3ForConditionalGeneration (`gemma3`) keeps its decoder under `language_model`.
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": {role: [p.replace("{base}", "{base}language_model.") for p in patterns] for role, patterns in _LLAMA_LIKE.items()
               if role != "head"} | {"head": ["lm_head"]},
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "opt": {
        "attention": ["{base}decoder.layers.*.self_attn.q_proj", "{base}decoder.layers.*.self_attn.k_proj",
                      "{base}decoder.layers.*.self_attn.v_proj", "{base}decoder.layers.*.self_attn.out_proj"],
        "attn.q": ["{base}decoder.layers.*.self_attn.q_proj"],
        "attn.k": ["{base}decoder.layers.*.self_attn.k_proj"],
        "attn.v": ["{base}decoder.layers.*.self_attn.v_proj"],
        "attn.o": ["{base}decoder.layers.*.self_attn.out_proj"],
        "mlp": ["{base}decoder.layers.*.fc1", "{base}decoder.layers.*.fc2"],
        "embedding": ["{base}decoder.embed_tokens"],
        "head": ["lm_head"],
        "layers": ["{base}decoder.layers"],
    },
    "gpt_neox": {
        "attention": ["{base}layers.*.attention.query_key_value", "{base}layers.*.attention.dense"],
        "attn.qkv": ["{base}layers.*.attention.query_key_value"],
        "attn.o": ["{base}layers.*.attention.dense"],
        "mlp": ["{base}layers.*.mlp.dense_h_to_4h", "{base}layers.*.mlp.dense_4h_to_h"],
        "embedding": ["{base}embed_in"],
        "head": ["embed_out", "lm_head"],
        "layers": ["{base}layers"],
    },
    "vit": {
        "attention": ["{base}layers.*.attention.[qkvo]_proj",
                      "{base}encoder.layer.*.attention.attention.query", "{base}encoder.layer.*.attention.attention.key",
                      "{base}encoder.layer.*.attention.attention.value", "{base}encoder.layer.*.attention.output.dense"],
        "attn.q": ["{base}layers.*.attention.q_proj", "{base}encoder.layer.*.attention.attention.query"],
        "attn.k": ["{base}layers.*.attention.k_proj", "{base}encoder.layer.*.attention.attention.key"],
        "attn.v": ["{base}layers.*.attention.v_proj", "{base}encoder.layer.*.attention.attention.value"],
        "attn.o": ["{base}layers.*.attention.o_proj", "{base}encoder.layer.*.attention.output.dense"],
        "mlp": ["{base}layers.*.mlp.fc1", "{base}layers.*.mlp.fc2",
                "{base}encoder.layer.*.intermediate.dense", "{base}encoder.layer.*.output.dense"],
        "head": ["classifier"],
        "layers": ["{base}layers", "{base}encoder.layer"],
    },
}


def _base_prefix(model: Any) -> str:
    """'transformer.' for a model wrapping its base model under `base_model_prefix`, '' for a bare base model."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    child = getattr(model, prefix, None) if prefix else None
    return f"{prefix}." if child is not None and child is not model and hasattr(child, "named_modules") else ""


def aliases_for(model: Any) -> dict[str, list[str]]:
    """{role: [glob patterns]} for the model's architecture (`model.config.model_type`); {} when unknown."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    roles = ROLES.get(model_type, {})
    base = _base_prefix(model)
    return {role: [p.format(base=base) for p in patterns] for role, patterns in roles.items()}


def known_roles(model: Any) -> list[str]:
    """The role names `aliases_for(model)` resolves (for error messages)."""
    return sorted(aliases_for(model))
