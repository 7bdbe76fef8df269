"""Stock PEFT loads LoRA adapters of compressed models: after `import kroncompress`,

    model = PeftModel.from_pretrained(compressed, "adapter")   # no kc.lora.load_adapter needed
    model = get_peft_model(compressed, LoraConfig(r=8, target_modules=["c_attn"]))

PEFT picks the LoRA layer for a target in `LoraModel._create_new_module` from a list of dispatchers; a
config's own mapping (`LoraConfig._register_custom_module`, PEFT's "custom models" extension) comes first.
A saved adapter_config.json cannot carry that mapping, so a stock `from_pretrained` used to end in "Target
module KroneckerLinear is not supported". PEFT has no global registry for custom layers, so `install`
wraps `_create_new_module`: a target whose base layer is one of our FactorizedLinear layers, and that the
config does not map itself, gets kc.lora.FactorizedLoraLinear; every other target goes to PEFT unchanged.

`install` is idempotent and checks what it relies on (the static method and its parameters, the
config's mapping attribute, PEFT >= 0.17); when a PEFT release changes them it warns once and leaves PEFT
alone, and `kc.lora.load_adapter(model, folder)` (which registers the mapping on the config) still works.
kroncompress/__init__.py calls it as soon as `peft` is imported (or at once if it already is).
"""

from __future__ import annotations

import inspect
import warnings

MIN_PEFT = (0, 17)
_MARK = "__kroncompress_dispatch__"


def _version(text: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text).release
    except InvalidVersion:
        return ()


def unsupported_reason() -> str | None:
    """Why `install` cannot patch the installed PEFT (None: it can)."""
    import peft
    from peft.tuners.lora.config import LoraConfig
    from peft.tuners.lora.model import LoraModel

    if _version(peft.__version__) < MIN_PEFT:
        return f"peft {peft.__version__} is older than {'.'.join(map(str, MIN_PEFT))}"
    create = inspect.getattr_static(LoraModel, "_create_new_module", None)
    if not isinstance(create, staticmethod):
        return "LoraModel._create_new_module is no longer a static method"
    if getattr(create.__func__, _MARK, False):
        return None
    parameters = list(inspect.signature(create.__func__).parameters)
    if parameters[:3] != ["lora_config", "adapter_name", "target"]:
        return f"LoraModel._create_new_module takes {parameters}, not (lora_config, adapter_name, target, ...)"
    if not hasattr(LoraConfig, "_register_custom_module"):
        return "LoraConfig has no _register_custom_module"
    return None


def install() -> bool:
    """Teach the installed PEFT our factorised layers (idempotent). Returns whether PEFT now knows them."""
    from peft.tuners.lora.model import LoraModel

    reason = unsupported_reason()
    if reason is not None:
        warnings.warn(f"kroncompress: stock PeftModel.from_pretrained cannot load adapters of compressed models "
                      f"({reason}); use kc.lora.load_adapter(model, folder) instead", stacklevel=2)
        return False
    original = inspect.getattr_static(LoraModel, "_create_new_module").__func__
    if getattr(original, _MARK, False):
        return True

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        from peft.tuners.tuners_utils import BaseTunerLayer

        from kroncompress.layers.base import FactorizedLinear

        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        custom = getattr(lora_config, "_custom_modules", None) or {}
        if isinstance(base, FactorizedLinear) and not any(isinstance(base, key) for key in custom):
            from kroncompress.lora import FactorizedLoraLinear

            return FactorizedLoraLinear(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    setattr(_create_new_module, _MARK, True)
    _create_new_module.__wrapped__ = original
    _create_new_module.__doc__ = original.__doc__
    LoraModel._create_new_module = staticmethod(_create_new_module)
    return True
