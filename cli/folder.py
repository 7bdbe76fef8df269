"""Read what `save_compressed` wrote (config.json, report.json, recipe.yaml) for `kroncompress inspect`.

Only reads the folder's JSON/YAML files; no weights are loaded and nothing is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_KEY = "kroncompress"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}); the folder may be damaged: compress again") from exc
    return data if isinstance(data, dict) else {}


def _module_rows(modules: Any) -> list[dict[str, Any]]:
    """Plan rows whether saved as a list of rows or as a mapping module name -> row."""
    if isinstance(modules, Mapping):
        return [{"module": name, **(row if isinstance(row, Mapping) else {"plan": row})} for name, row in modules.items()]
    return [dict(row) for row in modules or [] if isinstance(row, Mapping)]


def read_compressed_folder(directory: Path | str) -> dict[str, Any]:
    """Summary of a compressed folder: model type, recipe name, params before/after, modules, metrics.

    Raises ValueError when the folder is missing or is not a kroncompress folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"folder {str(directory)!r} does not exist; pass a folder written by `kroncompress compress`")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(directory)!r} has no config.json; pass a folder written by `kroncompress compress`")
    config = _read_json(config_file)
    section = config.get(CONFIG_KEY)
    if not isinstance(section, Mapping):
        raise ValueError(
            f"{str(config_file)!r} has no {CONFIG_KEY!r} section: this is a plain Hugging Face model, not a compressed "
            "one; compress it first with `kroncompress compress`"
        )
    report = _read_json(directory / "report.json") if (directory / "report.json").is_file() else {}
    recipe = section.get("recipe")
    recipe_name = recipe.get("name") if isinstance(recipe, Mapping) else recipe if isinstance(recipe, str) else None
    if recipe_name is None and (directory / "recipe.yaml").is_file():
        saved = yaml.safe_load((directory / "recipe.yaml").read_text(encoding="utf-8")) or {}
        recipe_name = saved.get("name") if isinstance(saved, Mapping) else None
    modules = _module_rows(section.get("modules") or section.get("plan") or report.get("modules"))
    outcome = report.get("report") if isinstance(report.get("report"), Mapping) else {}
    measured = {row.get("name"): row for row in _module_rows(outcome.get("modules"))}
    order = {name: i for i, name in enumerate(measured)}
    modules.sort(key=lambda row: order.get(row.get("module"), len(order)))  # config.json sorts keys; keep model order
    for row in modules:  # the reconstruction error and time compress measured, where the report has them
        done = measured.get(row.get("module", row.get("name")), {})
        row.update({k: done[k] for k in ("rel_error", "seconds") if done.get(k) is not None})
    totals = report.get("totals") if isinstance(report.get("totals"), Mapping) else report
    metrics = report.get("metrics") if isinstance(report.get("metrics"), Mapping) else {}
    return {
        "folder": str(directory),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "recipe": recipe_name,
        "params_before": totals.get("params_before", section.get("params_before")),
        "params_after": totals.get("params_after", section.get("params_after")),
        "modules": modules,
        "metrics": dict(metrics),
        "files": sorted(p.name for p in directory.iterdir()),
    }
