"""Load-time checks of a model folder: config.json, its weight files (complete safetensors, never pickles),
transformers' loading report (no tensor left at random) and finiteness (see kroncompress.models)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from kroncompress.models.info import ModelInfo



def read_config_dict(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"model folder {str(path)!r} has no config.json; pass a folder written by save_pretrained() "
            "(config.json plus weights), or one holding just config.json to plan on shapes only"
        )
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({first_line(exc)}); fix or regenerate it with "
                         "save_pretrained()") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(config_file)!r} holds a JSON {type(data).__name__}, not an object; fix or regenerate it "
                         "with save_pretrained()")
    return data


# -- load-time checks: weight files, loading report, finiteness ---------------------------------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(path: Path, name: str) -> None:
    """Every safetensors file of the folder is complete (headers only, fast); pickle-only weights are refused.

    A sharded checkpoint's index must name shards that exist. Raises ValueError naming the file.
    """
    from kroncompress.io import check_safetensors

    safetensors = sorted(path.glob("*.safetensors"))
    if not safetensors:
        pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
        shown = ", ".join(pickles[:3]) or "pytorch_model.bin"
        classes = read_config_dict(path).get("architectures") or ["AutoModelForCausalLM"]
        cls = classes[0] if isinstance(classes, list) and classes and isinstance(classes[0], str) else "AutoModel"
        raise ValueError(
            f"model folder {name!r} holds only pickle weights ({shown}); kroncompress never unpickles files (a pickle "
            f"can run arbitrary code): convert it where you trust the file, with `transformers.{cls}.from_pretrained"
            "(folder).save_pretrained(folder)` (which writes model.safetensors), then load the folder again"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{str(index)!r} is not a valid safetensors index ({first_line(exc)}); "
                             "re-download or re-save the model") from exc
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ValueError(f"{str(index)!r} names shards that are not in the folder: {', '.join(missing[:4])}; "
                             "re-download or re-save the model")
    for file in safetensors:
        check_safetensors(file)


class quiet_load_report:
    """Drop transformers' multi-line LOAD REPORT; `check_loading_info` turns its content into one line.

    A filter, not a higher level: transformers 5 runs (and logs) its tensor-parallel plan check only when
    that logger's level is WARNING or above.
    """

    @staticmethod
    def _keep(record) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    def __enter__(self):
        self.logger = logging.getLogger("transformers.modeling_utils")
        self.logger.addFilter(self._keep)

    def __exit__(self, *exc_info):
        self.logger.removeFilter(self._keep)


def _show(names, limit: int = 4) -> str:
    names = sorted(str(n) for n in names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_loading_info(loading: dict, name: str, cls: type, info: ModelInfo) -> None:
    """Missing or mismatched tensors are an error (transformers would initialise them at random); so are
    unexpected ones, except a task head left out on purpose when no `architectures` names the class."""
    missing = loading.get("missing_keys") or ()
    mismatched = loading.get("mismatched_keys") or ()
    unexpected = loading.get("unexpected_keys") or ()
    if missing:
        raise ValueError(
            f"model {name!r}: the checkpoint lacks {len(missing)} tensor(s) the {cls.__name__} needs: {_show(missing)}; "
            "they would be initialised at random: the weights file is incomplete or belongs to another config; "
            "re-download or re-save the model"
        )
    if mismatched:
        rows = [f"{m[0]} ({tuple(m[1])} in the file, {tuple(m[2])} in the model)"
                if isinstance(m, tuple) and len(m) == 3 else str(m) for m in mismatched]
        raise ValueError(f"model {name!r}: {len(rows)} tensor(s) have the wrong shape for config.json: {_show(rows, 2)}; "
                         "the weights and config.json do not belong together: re-download or re-save the model")
    if unexpected:
        if getattr(cls, "__name__", "") == "AutoModel":
            info.notes.append(f"checkpoint tensors not used by {info.model_class}: {_show(unexpected)}")
            return
        raise ValueError(
            f"model {name!r}: the checkpoint has {len(unexpected)} tensor(s) the {cls.__name__} built from config.json "
            f"does not: {_show(unexpected)}; the weights and config.json do not belong together: re-download or "
            "re-save the model"
        )


def check_finite(model: torch.nn.Module, name: str) -> None:
    """ValueError naming the first parameter or buffer holding NaN or inf (a corrupt checkpoint)."""
    from kroncompress.io import first_nonfinite

    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        tensor, count, total = bad
        raise ValueError(
            f"model {name!r}: tensor {tensor!r} holds NaN or inf values ({count:,} of {total:,}) right after loading; "
            "the checkpoint is corrupt (nothing kroncompress did): re-download or re-save it"
        )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
