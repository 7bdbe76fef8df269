"""The README.md model card of a saved folder: Hugging Face front matter, parameter counts, modules by
strategy, metrics and how to load it; and the source model's licence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from kroncompress.io.checks import CONFIG_NAME
from kroncompress.surgery import count_params


def _front_matter(model: nn.Module, section: dict[str, Any], recipe_dict: dict | None, metrics: dict | None,
                  card: dict | None) -> str:
    """The model card's YAML metadata (Hugging Face model card fields): library, tags (the strategies and the
    model type), pipeline_tag, base model (only a hub id), licence, datasets and metrics; values not known
    are left out, never guessed."""
    import yaml

    card = dict(card or {})
    strategies = sorted({e["strategy"] for e in section.get("modules", {}).values()}
                        | {e["strategy"] for e in section.get("structural", [])})
    model_type = getattr(model.config, "model_type", None)
    tags = ["kroncompress", "compressed", *strategies, *([model_type] if model_type else [])]
    meta: dict[str, Any] = {"library_name": "kroncompress", "tags": list(dict.fromkeys(tags))}
    task = pipeline_tag(model)
    if task:
        meta["pipeline_tag"] = task
    source = card.get("base_model") or getattr(model.config, "_name_or_path", "") or None
    base = hub_model_id(source) if source else None
    if base:
        meta["base_model"] = base
    licence = card.get("license") or (source_license(source) if source else None)
    if licence:
        meta["license"] = licence
    if card.get("datasets"):
        meta["datasets"] = list(dict.fromkeys(card["datasets"]))
    metrics = metrics or {}
    before = metrics.get("perplexity teacher")
    after = metrics.get("perplexity distilled", metrics.get("perplexity compressed"))
    if before is not None or after is not None or "perplexity" in metrics:
        meta["metrics"] = ["perplexity"]
    extra: dict[str, Any] = {"recipe": (recipe_dict or {}).get("name")}
    if before is not None:
        extra["perplexity_before"] = float(before)
    if after is not None:
        extra["perplexity_after"] = float(after)
    meta["kroncompress"] = {k: v for k, v in extra.items() if v is not None}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


# the model class's suffix -> the hub's pipeline_tag (the task widget and the search filter)
_PIPELINE_TAGS = (
    ("ForCausalLM", "text-generation"), ("LMHeadModel", "text-generation"), ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"), ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"), ("ForImageClassification", "image-classification"),
    ("ForConditionalGeneration", "text2text-generation"),
)


def pipeline_tag(model: nn.Module) -> str | None:
    """The Hugging Face `pipeline_tag` of a model, from its class (GPT2LMHeadModel: text-generation,
    BertForMaskedLM: fill-mask, ...); a bare encoder gives feature-extraction; None when unknown."""
    name = type(model).__name__
    for suffix, tag in _PIPELINE_TAGS:
        if name.endswith(suffix):
            return tag
    if name.endswith("Model") and getattr(model, "base_model", None) is model:
        vision = getattr(model.config, "model_type", "") in {"vit", "deit", "beit", "dinov2", "convnext", "swin"}
        return "image-feature-extraction" if vision else "feature-extraction"
    return None


def hub_model_id(source: Any) -> str | None:
    """`source` as a Hugging Face model id, or None when it is not one: an existing local folder (unless it
    is a snapshot in the hub cache, `.../models--org--name/snapshots/<hash>`, which gives `org/name`), a
    name of a model packaged with kroncompress (the demo), or a string outside the hub's id grammar."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from kroncompress.demo import is_demo_name

    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        parts = path.resolve().parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3].removeprefix("models--").replace("--", "/", 1)
        return None
    if is_demo_name(text):
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def source_license(source: Any) -> str | None:
    """The licence of a source model, from its README.md front matter (`license:`) or its config
    (`license`), read from a local folder or the local hub cache; None when not found (never downloads)."""
    import yaml

    folder = Path(str(source)).expanduser()
    readme, config = folder / "README.md", folder / CONFIG_NAME
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = [try_to_load_from_cache(str(source), name) for name in ("README.md", CONFIG_NAME)]
        except Exception:  # not a valid repo id
            return None
        readme, config = (Path(c) if isinstance(c, str) else Path("/nonexistent") for c in cached)
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            head = text.split("---", 2)[1] if text.count("---") >= 2 else ""
            try:
                meta = yaml.safe_load(head) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and meta.get("license"):
                return str(meta["license"])
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("license")
        except (ValueError, OSError):
            value = None
        if value:
            return str(value)
    return None


def model_card(model: nn.Module, section: dict[str, Any], recipe_dict: dict | None, report: Any, metrics: dict | None,
                card: dict | None = None) -> str:
    config = model.config
    before = section.get("params_before") or (report.params_before if report is not None else None)
    after = count_params(model)
    recipe_name = (recipe_dict or {}).get("name", "none")
    lines = [
        _front_matter(model, section, recipe_dict, metrics, card),
        f"# {type(model).__name__} compressed with kroncompress", "",
        f"- architecture: `{type(model).__name__}` (model type `{getattr(config, 'model_type', '?')}`)",
        f"- recipe: `{recipe_name}`" + (f": {recipe_dict.get('description')}" if recipe_dict and recipe_dict.get("description") else ""),
    ]
    if before:
        lines.append(f"- parameters: {before:,} before, {after:,} after ({before / max(after, 1):.2f}x smaller)")
    else:
        lines.append(f"- parameters: {after:,}")
    if section.get("modules"):
        from kroncompress.plans import describe_modules
        from kroncompress.surgery import block_list_sizes

        names = list(section["modules"])
        lines.append(f"- compressed: {describe_modules(names, block_list_sizes(model, names))}")
    lines += [f"- note: {note}" for note in (getattr(report, "notes", None) or [])]
    if section.get("tied_head"):
        lines.append(f"- `{section['tied_head']['head']}` stays tied to `{section['tied_head']['embedding']}` (logits through the same factors)")
    by_strategy: dict[str, list[int]] = {}
    for entry in section.get("modules", {}).values():
        counts = by_strategy.setdefault(entry["strategy"], [0, 0, 0])
        counts[0] += 1
        counts[1] += entry["plan"]["params_before"]
        counts[2] += entry["plan"]["params_after"]
    for entry in section.get("structural", []):
        spec = entry["spec"]
        lines.append(f"- `{entry['name']}`: {entry['strategy']} kept blocks {spec.get('keep')} of {spec.get('num_layers')}")
    if by_strategy:
        lines += ["", "## Compressed modules", "", "| strategy | modules | params before | params after |", "|---|---:|---:|---:|"]
        lines += [f"| {s} | {c[0]} | {c[1]:,} | {c[2]:,} |" for s, c in sorted(by_strategy.items())]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Loading", "", "```python", "import kroncompress  # pip install kroncompress; registers this format",
              "from transformers import AutoModel", "",
              'model = AutoModel.from_pretrained("path/to/this/folder")  # or the AutoModelFor* class of the architecture',
              '# the same: model = kroncompress.load_compressed("path/to/this/folder")', "```", ""]
    if section.get("modules"):
        lines += ["Without `import kroncompress`, transformers refuses this folder instead of loading random weights.", ""]
    else:
        lines[-1:-1] = ["", "No module is factorized: `transformers.AutoModel*.from_pretrained` loads this folder as is.", ""]
    return "\n".join(lines)
