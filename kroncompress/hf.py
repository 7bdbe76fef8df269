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

Registration happens when kroncompress.io / kroncompress.surgery load (kc.compress, kc.load_compressed, ...),
on `import kroncompress.hf`, and, after a bare `import kroncompress`, as soon as transformers loads its
quantizer registry (`from_pretrained` does; a tokenizer-only use of transformers does not pay for it).
"""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path
from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "kroncompress"
REFUSAL = ("this folder is a kroncompress checkpoint (factorized weights): plain transformers would load random "
           "weights. Run `pip install kroncompress`, then `import kroncompress` before from_pretrained")


class KronCompressConfig(QuantizationConfigMixin):
    """The `quantization_config` entry of a compressed folder's config.json. The plan itself stays in the
    `kroncompress` section; this entry only routes `from_pretrained` to `KronCompressQuantizer`."""

    def __init__(self, quant_method: str = QUANT_METHOD, format_version: int = 1, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.install = "pip install kroncompress; import kroncompress"


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

    def _process_model_before_weight_loading(self, model, **kwargs):
        from kroncompress.io.checks import _check_section, _rebuild_module
        from kroncompress.io.load import _tie_groups
        from kroncompress.io.metadata import check_weights_metadata
        from kroncompress.surgery import CONFIG_KEY, install

        self._checkpoint_files = list(kwargs.get("checkpoint_files") or [])
        for path in self._checkpoint_files:  # a folder of a newer kroncompress format: say so before any shape error
            if str(path).endswith(".safetensors"):
                check_weights_metadata(path)
        folder = Path(str(getattr(model.config, "name_or_path", "") or "."))
        section = getattr(model.config, CONFIG_KEY, None) or {}
        modules = _check_section(section, folder)
        dtype = next(model.parameters()).dtype
        ancestors: set[int] = set()
        for name, entry in modules.items():
            new = _rebuild_module(model, name, entry, folder, dtype)
            if "padding_idx" in entry:
                new.padding_idx = entry["padding_idx"]
            install(model, name, new, entry.get("tied", []))
            parts = name.split(".")
            ancestors.update(id(model.get_submodule(".".join(parts[:depth]))) for depth in range(len(parts)))
        _guard_init_weights(model, ancestors)
        shared = section.get("shared_parameters", []) or []
        _tie_groups(model, shared, folder)
        # a shared tensor is stored once: its other names are re-tied after loading, not "missing"
        stored = _stored_keys(self._checkpoint_files, model)
        aliases = [f"^{re.escape(n)}$" for names in shared for n in names if stored and n not in stored]
        if aliases:
            model._keys_to_ignore_on_load_missing = [*(model._keys_to_ignore_on_load_missing or []), *aliases]
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from kroncompress.io.load import _tie_groups
        from kroncompress.surgery import CONFIG_KEY

        for module in model.modules():
            module.__dict__.pop("_init_weights", None)  # the guard of _process_model_before_weight_loading
        section = getattr(model.config, CONFIG_KEY, None) or {}
        _tie_groups(model, section.get("shared_parameters", []) or [], Path(str(model.config.name_or_path)))
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


def mark_config(config_path: str | os.PathLike, model: Any = None) -> None:
    """Make a written config.json of a compressed model a kroncompress checkpoint: the `quantization_config`
    entry that routes from_pretrained here, and the marker that makes plain transformers refuse it. With
    `model`, the `kroncompress` section is also written as kc.save_compressed writes it."""
    path = Path(config_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if model is not None:
        from kroncompress.io import saved_section
        from kroncompress.plans import CONFIG_KEY

        data[CONFIG_KEY] = saved_section(model)
    data["quantization_config"] = KronCompressConfig().to_dict()
    data["transformers_weights"] = REFUSAL
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_factorized(config: Any) -> bool:
    """Whether a config describes factorized modules (a model that plain transformers cannot load)."""
    from kroncompress.plans import CONFIG_KEY

    return bool((getattr(config, CONFIG_KEY, None) or {}).get("modules"))


def _save_pretrained(self, save_directory, *args, **kwargs):
    """transformers' save_pretrained, then config.json marked as a kroncompress checkpoint."""
    push = kwargs.pop("push_to_hub", False)
    if push:
        raise ValueError("save_pretrained(push_to_hub=True) of a kroncompress model: call model.push_to_hub(repo_id) "
                         "instead (it saves through this method, so the folder is marked as a kroncompress checkpoint)")
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    config_file = Path(save_directory) / "config.json"
    if is_factorized(self.config) and config_file.is_file():
        mark_config(config_file, self)


_save_pretrained.__name__ = "save_pretrained"


def mark(model) -> None:
    """Give a compressed model its checkpoint identity: config.quantization_config (so transformers and its
    integrations see the format) and a save_pretrained (also used by push_to_hub) that marks config.json."""
    if not is_factorized(getattr(model, "config", None)):
        return
    if not isinstance(getattr(model.config, "quantization_config", None), KronCompressConfig):
        model.config.quantization_config = KronCompressConfig()
    if hasattr(type(model), "save_pretrained"):
        model.save_pretrained = types.MethodType(_save_pretrained, model)


register()
