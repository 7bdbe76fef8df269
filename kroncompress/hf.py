"""Compressed folders as Hugging Face checkpoints: `from_pretrained` loads them once kroncompress is imported.

    import kroncompress                     # registers the "kroncompress" format with transformers
    model = AutoModelForCausalLM.from_pretrained("runs/demo")   # the same model as kc.load_compressed
    model.save_pretrained("copy/")          # a folder that reloads the same way (and push_to_hub publishes it)

How it plugs in. transformers loads non-dense formats through "quantizers": a config.json with
`quantization_config: {quant_method: ...}` makes `from_pretrained` look the method up in a registry
(`transformers.quantizers.auto.register_quantizer`), and the quantizer may rebuild modules on the empty model
before the weights are read. Ours (`KronCompressQuantizer`) rebuilds every factorized module from the saved
plan (the `kroncompress` section, the same routine as `kc.load_compressed`), re-ties the tied head, then
checks that the file held every weight. We chose this over `auto_map` custom code because it needs no
`trust_remote_code=True`, copies no code into each folder (the code is the installed, versioned package),
and keeps the model's own class (GPT2LMHeadModel, LlamaForCausalLM, ...), so pipelines and generation
behave as for the original.

Refusal without kroncompress. Plain transformers only *warns* on an unknown quant_method and then loads the
architecture with random weights. So a marked folder also names, in `transformers_weights`, a weights file
that is no safetensors name: plain transformers stops with "The transformers file in the config seems to be
incorrect: ...: <REFUSAL>" before building anything. Our quantizer clears that field before the file lookup.
transformers' own `config.save_pretrained` drops `transformers_weights`, so `kc.save_compressed` and the
`save_pretrained` of every compressed model (see `mark`) write it back into config.json.

`compress` (kc.compress) is `kroncompress.surgery.compress` followed by `mark`: the compressed model then
saves (save_pretrained, push_to_hub) as a kroncompress checkpoint. The marks themselves (config.json's
`quantization_config`, the refusal marker, the saved section) live in kroncompress.io.config, below this module.

Registration happens on `import kroncompress.hf` (kc.compress loads it), and, after a bare `import kroncompress`, as soon as transformers loads its
quantizer registry (`from_pretrained` does; a tokenizer-only use of transformers does not pay for it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from kroncompress.io.config import (  # noqa: F401  (re-exported: the format's marks, documented there)
    QUANT_METHOD, REFUSAL, KronCompressConfig, is_factorized, mark, mark_config,
)

class KronCompressQuantizer(HfQuantizer):
    """Rebuilds the factorized modules of a compressed folder on the empty model `from_pretrained` builds."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_files: list[str] = []

    def update_attn_implementation(self, config):
        # called before the weights file is looked up: drop the marker so model.safetensors is read
        if getattr(config, "transformers_weights", None) == REFUSAL:
            delattr(config, "transformers_weights")
        # the attention implementation the model was saved with, unless the caller asked for one
        saved = (getattr(config, "kroncompress", None) or {}).get("attn_implementation")
        if saved and getattr(config, "_attn_implementation_internal", None) is None:
            config._attn_implementation = saved
        return config

    def update_tp_plan(self, config):
        # transformers before 5.2x calls this hook, not update_attn_implementation, before the weights lookup
        config = super().update_tp_plan(config) if hasattr(HfQuantizer, "update_tp_plan") else config
        return self.update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, **kwargs):
        from kroncompress.io.checks import check_section, config_error, rebuild_module
        from kroncompress.io.load import tie_groups
        from kroncompress.surgery import CONFIG_KEY, install

        self._checkpoint_files = list(kwargs.get("checkpoint_files") or [])
        folder = Path(str(getattr(model.config, "name_or_path", "") or "."))
        section = getattr(model.config, CONFIG_KEY, None) or {}
        modules = check_section(section, folder)
        dtype = next(model.parameters()).dtype
        ancestors: set[int] = set()
        for name, entry in modules.items():
            new = rebuild_module(model, name, entry, folder, dtype)
            if "padding_idx" in entry:
                new.padding_idx = entry["padding_idx"]
            install(model, name, new, entry.get("tied", []))
            parts = name.split(".")
            ancestors.update(id(model.get_submodule(".".join(parts[:depth]))) for depth in range(len(parts)))
        from kroncompress.quantization import apply_saved_quantization

        apply_saved_quantization(model, section, lambda field, problem: config_error(folder, field, problem))
        _guard_init_weights(model, ancestors)
        shared = section.get("shared_parameters", []) or []
        tie_groups(model, shared, folder)
        # a shared tensor is stored once: its other names are re-tied after loading, not "missing"
        stored = _stored_keys(self._checkpoint_files, model)
        aliases = [f"^{re.escape(n)}$" for names in shared for n in names if stored and n not in stored]
        if aliases:
            model._keys_to_ignore_on_load_missing = [*(model._keys_to_ignore_on_load_missing or []), *aliases]
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from kroncompress.io.load import tie_groups
        from kroncompress.surgery import CONFIG_KEY

        for module in model.modules():
            module.__dict__.pop("_init_weights", None)  # the guard of _process_model_before_weight_loading
        section = getattr(model.config, CONFIG_KEY, None) or {}
        tie_groups(model, section.get("shared_parameters", []) or [], Path(str(model.config.name_or_path)))
        self._check_all_weights_loaded(model)
        # a factorized model casts and trains like any other: not "quantized" in transformers' sense
        model.is_quantized = False
        mark(model)
        return model

    def _check_all_weights_loaded(self, model) -> None:
        """Every tensor of the rebuilt model came from the file (transformers would leave a missing one random)."""
        stored = _stored_keys(self._checkpoint_files, model)
        if not stored:
            return
        groups: dict[int, list[str]] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            groups.setdefault(id(tensor), []).append(name)
        missing = [names[0] for names in groups.values() if not any(n in stored for n in names)]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"{model.config.name_or_path}: the weights file lacks {shown}, which the compressed model "
                             "rebuilt from config.json needs; the folder is damaged or was written by another version")

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: the factors multiplied back into dense modules (kc.to_dense)."""
        from kroncompress.io import to_dense

        return to_dense(model)

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _stored_keys(files: list[str], model=None) -> set[str]:
    """Names of the tensors in the safetensors files (headers only), as the model names them: transformers
    saves some architectures (ViT, GPT-NeoX ...) under their legacy checkpoint names and renames them on load,
    so with `model` the names go through the same renaming."""
    from safetensors import safe_open

    stored: set[str] = set()
    for path in files:
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as handle:
                stored.update(handle.keys())
    if model is None or not stored:
        return stored
    from kroncompress.io import model_key_names

    return set(model_key_names(model, stored).values())


def _guard_init_weights(model, ancestors: set[int]) -> None:
    """transformers initialises the modules whose tensors were not all in the file, through each model's
    `_init_weights`; for a block holding a factorized module that may reach into a weight that no longer
    exists (GPT-2's re-inits `c_proj.weight`). For those blocks (`ancestors`, by id) an AttributeError ends
    their init early: whatever it was initialising comes from the file, which is checked after loading."""
    from transformers import PreTrainedModel

    for owner in model.modules():
        if not isinstance(owner, PreTrainedModel):
            continue
        original = owner._init_weights

        def guarded(module, _original=original):
            try:
                _original(module)
            except AttributeError:
                if id(module) not in ancestors:
                    raise

        owner.__dict__["_init_weights"] = guarded


def register() -> None:
    """Register the kroncompress format with transformers' from_pretrained (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(KronCompressConfig)
        register_quantizer(QUANT_METHOD)(KronCompressQuantizer)



def compress(model, recipe, progress: Callable[[int, int, str], None] | None = None, calibration=None,
             refit: bool | None = None, sequential=None):
    """kc.compress: `kroncompress.surgery.compress` (see there), then the model is marked as a kroncompress
    checkpoint, so its save_pretrained / push_to_hub write a folder that from_pretrained loads back."""
    from kroncompress.surgery import compress as compress_modules

    report = compress_modules(model, recipe, progress=progress, calibration=calibration, refit=refit,
                              sequential=sequential)
    if hasattr(model, "config"):
        mark(model)
    return report


register()
