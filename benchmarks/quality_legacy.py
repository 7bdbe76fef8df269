"""Cells of an earlier quality report, read back from its markdown when its cells.jsonl is gone.

    rows = rows_from_report(Path("quality.md").read_text(), label="report of 2026-11-26")

The report holds each cell's parameters, zero-shot and distilled perplexity, and, for the rows run with
several seeds, only the mean and the range: two seeds come back as two rows holding the range's ends, with
`seed_order: "unknown"` (which seed gave which end is not in the report; the mean and range are exact).
Every row is marked `earlier_source` with the label, so bench_quality's report can say which numbers were
made by an earlier version of the sources.
"""

from __future__ import annotations

import re
from typing import Any

from kroncompress.errors import DataError

NUMBER = r"([\d,]+(?:\.\d+)?)"


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _table(text: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if start is None:
        raise DataError(f"no table starting {header!r}", where="earlier report")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        # " (e)" marks a cell that was itself kept from earlier sources
        rows.append([cell.strip().removesuffix(" (e)") for cell in line.strip().strip("|").split("|")])
    return rows


def _protocol(text: str) -> dict[str, Any]:
    def find(pattern: str, what: str) -> re.Match:
        match = re.search(pattern, text)
        if match is None:
            raise DataError(f"cannot find {what}", where="earlier report")
        return match

    teacher = find(rf"Teacher: `([^`]+)`, {NUMBER} parameters, perplexity {NUMBER}", "the teacher line")
    scoring = find(rf"held-out text of `([^`]+)`.*?block (\d+), stride (\d+), {NUMBER} scored tokens", "the protocol line")
    steps = find(r"Distillation budget, identical for every cell: (\d+) steps", "the distillation budget")
    calibration = find(rf"from {NUMBER} tokens of the training", "the calibration tokens")
    return {"model": teacher[1], "teacher_params": int(_num(teacher[2])), "teacher": _num(teacher[3]),
            "data": scoring[1], "protocol": {"block_size": int(scoring[2]), "stride": int(scoring[3]),
                                             "tokens": int(_num(scoring[4]))},
            "steps": int(steps[1]), "calibration_tokens": int(_num(calibration[1]))}


def rows_from_report(text: str, label: str, line_names: dict[str, str]) -> list[dict[str, Any]]:
    """Cache rows (as bench_quality.run_cell returns them) for every cell of an earlier report.

    `line_names` is bench_quality.LINE_NAMES (recipe -> plot line), used to map the curve table back to recipes."""
    p = _protocol(text)
    settings = {"model": p["model"], "data": p["data"], "steps": p["steps"], "calibration_tokens": p["calibration_tokens"]}
    recipes = {name: recipe for recipe, name in line_names.items()}
    main: dict[tuple, dict] = {}
    for recipe, init, params, _, zero, after, spread, minutes in _table(text, "| recipe | init |"):
        match = re.fullmatch(r"(\S+)(?: \((.+)\))?", recipe)
        layout = match[2] or "recipe"
        seeds = re.fullmatch(rf"{NUMBER}-{NUMBER} \((\d+) seeds\)", spread)
        runs = [_num(seeds[1]), _num(seeds[2])] if seeds else [_num(after)]
        if seeds and int(seeds[3]) != 2:
            raise DataError(f"{recipe} ran {seeds[3]} seeds; only a two-seed range maps back to runs", where="earlier report")
        main[(match[1], layout, init)] = {"runs": runs, "seconds": _num(minutes) * 60}
    rows = []
    for line, layout, params, _, zero, after in _table(text, "| line | layout |"):
        name, aware, _ = line.partition(", data-aware")
        recipe = recipes.get(name)
        if recipe is None:
            raise DataError(f"unknown line {line!r}", where="earlier report")
        init = "data-aware" if aware else ("-" if recipe == "distilgpt2" else "weight-only")
        key3 = (recipe, layout, init)
        found = main.get(key3)
        runs = found["runs"] if found else [_num(after)]
        for seed, distilled in enumerate(runs):
            rows.append({
                "recipe": recipe, "layout": layout, "init": init, "seed": seed, "main": found is not None,
                "key": f"{recipe}|{layout}|{init}|{seed}",
                "line": line, "embedding_compressed": recipe not in ("kn-gpt2-mlp", "distilgpt2") and "no embedding" not in layout,
                "params": int(_num(params)), "teacher_params": p["teacher_params"], "teacher": p["teacher"],
                "zero_shot": _num(zero), "distilled": distilled, "steps": p["steps"], "protocol": p["protocol"],
                "seconds": found["seconds"] if found else None, "settings": settings,
                "source": f"earlier: {label}", "earlier_source": label,
                **({"seed_order": "unknown"} if len(runs) > 1 else {}),
            })
    missing = set(main) - {(r["recipe"], r["layout"], r["init"]) for r in rows}
    if missing:
        raise DataError(f"main-table rows without a curve-table row: {sorted(missing)}", where="earlier report")
    return rows
