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

A config that lost its `quantization_config` (saved before it existed, or edited) but keeps the
`kroncompress` plan is routed here all the same (`route_unmarked`, called from transformers'
`get_hf_quantizer`), so it loads its factors, never random weights. The quantizer runs the loader check
of `kc.load_compressed` (kroncompress.io.verify) on the files' headers before any value is read.

`compress` (kc.compress) is `kroncompress.surgery.compress` followed by `mark`: the compressed model then
saves (save_pretrained, push_to_hub) as a kroncompress checkpoint. The marks themselves (config.json's
`quantization_config`, the refusal marker, the saved section) live in kroncompress.io.config, below this module.

Registration happens on `import kroncompress.hf` (kc.compress loads it), and, after a bare `import kroncompress`, as soon as transformers loads its
quantizer registry (`from_pretrained` does; a tokenizer-only use of transformers does not pay for it).
"""

from __future__ import annotations

import json
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
        section = getattr(config, "kroncompress", None)
        saved = section.get("attn_implementation") if isinstance(section, dict) else None
        if isinstance(saved, str) and getattr(config, "_attn_implementation_internal", None) is None:
            config._attn_implementation = saved
        return config

    def update_tp_plan(self, config):
        # transformers before 5.2x calls this hook, not update_attn_implementation, before the weights lookup
        config = super().update_tp_plan(config) if hasattr(HfQuantizer, "update_tp_plan") else config
        return self.update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, **kwargs):
        """Rebuild the factorized modules on the empty (meta) model, then check the files' headers against it
        (kroncompress.io.verify, the check kc.load_compressed runs): nothing is read before it passes."""
        from kroncompress.io.checks import rebuild_modules
        from kroncompress.io.verify import check_shared, check_stored, read_specs, read_tensor
        from kroncompress.surgery import CONFIG_KEY
        from kroncompress.io.metadata import check_weights_metadata

        self._checkpoint_files = list(kwargs.get("checkpoint_files") or [])
        for path in self._checkpoint_files:  # a folder of a newer kroncompress format: say so before any shape error
            if str(path).endswith(".safetensors"):
                check_weights_metadata(path)
        for path in self._checkpoint_files:  # a folder of a newer kroncompress format: say so before any shape error
            if str(path).endswith(".safetensors"):
                check_weights_metadata(path)
        folder = Path(str(getattr(model.config, "name_or_path", "") or "."))
        section = getattr(model.config, CONFIG_KEY, None) or {}
        dtype = next(model.parameters()).dtype
        saved = getattr(model.config, "architectures", None) or []
        self._rebuilt = rebuild_modules(model, section, folder, dtype, other_class=bool(saved) and type(model).__name__ not in saved)
        ancestors: set[int] = set()
        for name in self._rebuilt.modules:
            parts = name.split(".")
            ancestors.update(id(model.get_submodule(".".join(parts[:depth]))) for depth in range(len(parts)))
        _guard_init_weights(model, ancestors)
        specs = read_specs(self._checkpoint_files)
        where = ", ".join(str(f) for f in self._checkpoint_files) or str(folder)
        # a mismatched dense tensor is transformers' to handle (ignore_mismatched_sizes); a factor never is
        self._names = check_stored(model, specs, where, self._rebuilt.modules, self._rebuilt.optional, strict_shapes=False)
        check_shared(self._rebuilt.shared, specs, self._names, lambda name: read_tensor(specs[name], name), folder)
        # a shared tensor is stored once: its other names are re-tied after loading, not "missing"
        present = set(self._names.values())
        aliases = [f"^{re.escape(n)}$" for names in self._rebuilt.shared for n in names if n not in present]
        if aliases:
            model._keys_to_ignore_on_load_missing = [*(model._keys_to_ignore_on_load_missing or []), *aliases]
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from kroncompress.io.checks import tie_groups
        from kroncompress.io.verify import check_finite

        for module in model.modules():
            module.__dict__.pop("_init_weights", None)  # the guard of _process_model_before_weight_loading
        tie_groups(model, self._rebuilt.shared, Path(str(model.config.name_or_path)))
        state = model.state_dict()
        where = ", ".join(str(f) for f in self._checkpoint_files) or str(model.config.name_or_path)
        check_finite({old: state[new] for old, new in self._names.items() if new in state}, where)
        # a factorized model casts and trains like any other: not "quantized" in transformers' sense
        model.is_quantized = False
        mark(model)
        return model

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: the factors multiplied back into dense modules (kc.to_dense)."""
        from kroncompress.io import to_dense

        return to_dense(model)

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


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
    """Register the kroncompress format with transformers' from_pretrained (idempotent), and route a config
    with a `kroncompress` plan but no `quantization_config` (see `route_unmarked`) to it."""
    import sys

    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(KronCompressConfig)
        register_quantizer(QUANT_METHOD)(KronCompressQuantizer)
    from transformers.quantizers import auto

    # from_pretrained calls the name modeling_utils imported; when it is not loaded yet, it imports ours
    for module in (auto, sys.modules.get("transformers.modeling_utils")):
        original = getattr(module, "get_hf_quantizer", None)
        if original is not None and not getattr(original, "routes_kroncompress", False):
            module.get_hf_quantizer = _routing(original)


def _routing(original):
    def get_hf_quantizer(config, quantization_config, *args, **kwargs):
        if route_unmarked(config):
            _check_local_weights(Path(str(getattr(config, "name_or_path", "") or ".")))
        return original(config, quantization_config, *args, **kwargs)

    get_hf_quantizer.routes_kroncompress = True
    get_hf_quantizer.__wrapped__ = original
    return get_hf_quantizer


def _check_local_weights(folder: Path) -> None:
    """A local folder's safetensors weights are complete files (transformers reads their headers before the
    quantizer runs, and its error names no file)."""
    from kroncompress.io.checks import check_safetensors

    index = folder / "model.safetensors.index.json"
    files = {"model.safetensors"}
    if index.is_file():
        try:
            files |= set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (ValueError, AttributeError, TypeError):
            raise ValueError(f"{index}: not a readable index of weight files; re-save the folder") from None
    for name in sorted(files):
        if isinstance(name, str) and (folder / name).is_file():
            check_safetensors(folder / name)


def route_unmarked(config: Any) -> bool:
    """A config that holds a kroncompress plan is a kroncompress checkpoint, marker or not: a folder saved
    before the marker existed, or whose config.json went through `AutoConfig.from_pretrained(f)
    .save_pretrained(f)` (transformers drops `transformers_weights`), gets its `quantization_config` back,
    instead of loading the bare architecture with random weights. One naming another format is refused."""
    from kroncompress.plans import CONFIG_KEY

    section = getattr(config, CONFIG_KEY, None)
    if not isinstance(section, dict) or not section.get("modules"):
        return False
    current = getattr(config, "quantization_config", None)
    if current is None:
        config.quantization_config = KronCompressConfig().to_dict()
        return True
    method = current.get("quant_method") if isinstance(current, dict) else getattr(current, "quant_method", None)
    if method != QUANT_METHOD:
        where = Path(str(getattr(config, "name_or_path", "") or ".")) / "config.json"
        raise ValueError(f"{where}: quantization_config is {current!r}, but the folder is a kroncompress checkpoint "
                         f"(it has a `{CONFIG_KEY}` plan); set quantization_config to {{\"quant_method\": "
                         f"\"{QUANT_METHOD}\"}} or re-save the model with kc.save_compressed")
    return True



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
