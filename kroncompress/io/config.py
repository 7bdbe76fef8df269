"""What makes a folder's config.json (and a model's config) a kroncompress checkpoint: the `kroncompress`
section as a folder stores it, the `quantization_config` entry that routes transformers' `from_pretrained` to
kroncompress, and the marker that makes plain transformers refuse the folder (see kroncompress.hf for how the
format plugs into transformers). `mark(model)` gives a compressed model that identity in memory, so its own
`save_pretrained` (and push_to_hub) writes a marked folder.
"""

from __future__ import annotations

import copy
import json
import os
import types
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from kroncompress.surgery import CONFIG_KEY, count_params

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



def shared_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are the same Parameter object (tied), groups of 2 or more."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def saved_section(model: nn.Module) -> dict[str, Any]:
    """The `kroncompress` config section as a folder stores it: the recorded plan plus what only the model
    object knows (tied parameter groups, attention implementation, parameter count)."""
    section = copy.deepcopy(getattr(model.config, CONFIG_KEY, None) or {})
    if section:
        section["shared_parameters"] = shared_groups(model)
        section["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        section["params_after"] = count_params(model)
    return section


def mark_config(config_path: str | os.PathLike, model: Any = None) -> None:
    """Make a written config.json of a compressed model a kroncompress checkpoint: the `quantization_config`
    entry that routes from_pretrained here, and the marker that makes plain transformers refuse it. With
    `model`, the `kroncompress` section is also written as kc.save_compressed writes it."""
    path = Path(config_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if model is not None:
        data[CONFIG_KEY] = saved_section(model)
    data["quantization_config"] = KronCompressConfig().to_dict()
    data["transformers_weights"] = REFUSAL
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_factorized(config: Any) -> bool:
    """Whether a config describes factorized or kc.quantize'd modules (a model plain transformers cannot load)."""
    section = getattr(config, CONFIG_KEY, None) or {}
    return bool(section.get("modules") or (section.get("quantization") or {}).get("modules"))


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
