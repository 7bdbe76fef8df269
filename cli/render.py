"""Rich rendering for the CLI: tables built from the library's plain `to_dict()` data, nothing computed."""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Mapping

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr); 160 columns when piped (unless COLUMNS says otherwise) so tables
    written to a file don't wrap module names."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


def count(n: Any) -> str:
    """12,345,678 for ints; anything else as given."""
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else ("" if n is None else str(n))


def megabytes(n: int) -> str:
    """12.35 MB (10^6 bytes) from a byte count."""
    return f"{n / 1e6:,.2f} MB"


def ratio(before: Any, after: Any) -> str:
    if not isinstance(before, int) or not isinstance(after, int) or after <= 0:
        return ""
    return f"{before / after:.2f}x"


def _dims(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join("?" if v is None else str(v) for v in value)
    return str(value)


def format_spec(spec: Mapping[str, Any] | None) -> str:
    """A factor spec in a few characters: `A 384x384 (x) B 2x2`, `rank 64`, else `key=value` pairs."""
    if not spec:
        return ""
    spec = dict(spec)
    parts = []
    if "a_shape" in spec and "b_shape" in spec:
        parts.append(f"A {_dims(spec.pop('a_shape'))} (x) B {_dims(spec.pop('b_shape'))}")
        rank = spec.pop("rank", 1)
        if rank != 1:
            parts.append(f"rank {rank}")
    elif set(spec) == {"rank"}:
        parts.append(f"rank {spec.pop('rank')}")
    parts += [f"{k}={_dims(v)}" for k, v in spec.items()]
    return ", ".join(parts)


def field(row: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of `keys` found in a row, or in its nested `plan` / `layer_plan` mapping."""
    scopes = [row] + [row[k] for k in ("plan", "layer_plan") if isinstance(row.get(k), Mapping)]
    for key in keys:
        for scope in scopes:
            if scope.get(key) is not None:
                return scope[key]
    return default


def module_table(title: str, rows: Iterable[Mapping[str, Any]], *, with_error: bool = False) -> Group:
    """One line per module (name, strategy, kind, shape, factor spec, params before -> after), notes below.

    Notes become footnote markers ([1], [2], ...; identical notes share one) so the table stays narrow.
    Columns that are empty for every row (e.g. shape in a report that does not record it) are left out.
    """
    columns = ["module", "strategy", "kind", "shape", "factors", "before", "after", "ratio"]
    columns += ["rel. error", "sec"] if with_error else []
    columns.append("note")
    notes: dict[str, int] = {}
    cells = []
    for row in rows:
        before, after = field(row, "params_before"), field(row, "params_after")
        line = [
            str(field(row, "module", "name", default="?")), str(field(row, "strategy", default="")),
            str(field(row, "kind", default="")), _dims(field(row, "shape", default="")),
            format_spec(field(row, "spec")), count(before), count(after), ratio(before, after),
        ]
        if with_error:
            error, seconds = field(row, "rel_error", "error"), field(row, "seconds", "time")
            line += [f"{error:.4f}" if isinstance(error, float) else str(error or ""),
                     f"{seconds:.2f}" if isinstance(seconds, float) else str(seconds or "")]
        note = str(field(row, "note", default="")).strip()
        line.append(f"[{notes.setdefault(note, len(notes) + 1)}]" if note else "")
        cells.append(line)
    keep = [i for i, name in enumerate(columns) if name == "module" or any(line[i] for line in cells)]
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for i in keep:
        name = columns[i]
        numeric = name in ("shape", "before", "after", "ratio", "rel. error", "sec")
        table.add_column(name, justify="right" if numeric else "left", no_wrap=True)
    for line in cells:
        table.add_row(*(escape(line[i]) for i in keep))
    footnotes = [Text(f"[{n}] {note}", style="dim") for note, n in notes.items()]
    return Group(table, *footnotes)


def totals_line(data: Mapping[str, Any]) -> str:
    """`params 124,439,808 -> 83,907,506 (1.48x smaller); weights 497.76 MB -> ...` from a plan/report dict."""
    before, after = data.get("params_before"), data.get("params_after")
    line = f"[bold]params[/bold] {count(before)} -> {count(after)}"
    if ratio(before, after):
        line += f" ({ratio(before, after)} smaller)"
    bytes_before, bytes_after = data.get("bytes_before"), data.get("bytes_after")
    if isinstance(bytes_before, int) and isinstance(bytes_after, int):
        line += f"; [bold]weights[/bold] {megabytes(bytes_before)} -> {megabytes(bytes_after)}"
        line += f" ({ratio(bytes_before, bytes_after)} smaller)" if ratio(bytes_before, bytes_after) else ""
    flops_before, flops_after = data.get("flops_before"), data.get("flops_after")
    if isinstance(flops_before, int) and isinstance(flops_after, int) and flops_before:
        line += f"; [bold]FLOPs/token[/bold] (compressed modules) {count(flops_before)} -> {count(flops_after)}"
    return line


def allocation_table(record: Mapping[str, Any]) -> Group:
    """A recipe budget's allocation: each module's choice, the fraction of its weights it keeps, its share of the
    budget, its predicted cost (sensitivity x squared output error) and sensitivity; then the totals and why."""
    table = Table(title="budget", title_justify="left")
    for column in ("module", "choice", "kept", "share", "cost", "sensitivity"):
        table.add_column(column, justify="left" if column in ("module", "choice") else "right")
    for name, entry in record.get("modules", {}).items():
        cost, s = entry.get("cost"), entry.get("sensitivity")
        table.add_row(escape(name), escape(str(entry.get("choice"))), f"{100 * entry.get('kept', 0):.1f}%",
                      f"{100 * entry.get('share', 0):.1f}%", "-" if cost is None else f"{cost:.3g}",
                      "-" if s is None else f"{s:.3g}")
    predicted, uniform = record.get("predicted_cost"), record.get("uniform_cost")
    why = f"{count(record.get('params'))} of {count(record.get('dense_params'))} weight parameters " \
          f"({100 * record.get('keep', 0):.1f}%, budget {count(record.get('budget'))}) over " \
          f"{len(record.get('modules', {}))} modules; {record.get('basis')}; sensitivity {record.get('sensitivity')}"
    if isinstance(predicted, (int, float)) and isinstance(uniform, (int, float)) and uniform > 0:
        why += f"; predicted cost {predicted:.3g} vs {uniform:.3g} for one uniform svd ratio ({100 * (predicted / uniform - 1):+.0f}%)"
    return Group(table, Text(why, style="dim"))


def compressed_lines(data: Mapping[str, Any]) -> Text:
    """`compressed: <modules, blocks grouped>` and a `note:` line for each thing the recipe names that the model
    has not got (a plan's or report's `compressed` and `notes`)."""
    text = Text()
    if data.get("compressed"):
        text.append("compressed: ", style="bold").append(str(data["compressed"]))
    for note in data.get("notes") or []:
        text.append("\n" if text else "").append("note: ", style="bold yellow").append(str(note))
    return text


def key_value_table(title: str, items: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in items:
        table.add_row(key, count(value) if isinstance(value, int) else str(value))
    return table


class LazyProgress:
    """One rich progress bar per stage, started on the stage's first callback (two live displays at once
    would fight, and the distillation engine shows its own). When the console is not a terminal (a log
    file, CI, nohup), plain lines instead at a steady rhythm, with elapsed time and ETA
    (kroncompress.progress: every $KRONCOMPRESS_PROGRESS_INTERVAL seconds, default 30)."""

    def __init__(self, console: Console):
        self.console, self.bars, self.logs = console, {}, {}

    def callback(self, label: str, unit: str = ""):
        if not self.console.is_terminal:
            from kroncompress.progress import progress_interval

            progress_interval()  # a bad $KRONCOMPRESS_PROGRESS_INTERVAL stops the command here, before any work
            return lambda done, total, description="": self._log(label, unit, done, total, description)

        def update(done: int, total: int, description: Any = "") -> None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            if label not in self.bars:
                self.stop()
                bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                               TextColumn("{task.description}"), console=self.console)
                bar.start()
                self.bars[label] = (bar, bar.add_task("", total=total))
            bar, task = self.bars[label]
            bar.update(task, completed=done, total=total, description=str(description))
            if total and done >= total:
                bar.stop()

        return update

    def _log(self, label: str, unit: str, done, total, description: Any = "") -> None:
        from kroncompress.progress import ProgressLog

        if label not in self.logs:
            self.logs[label] = ProgressLog(label, unit=unit, stream=self.console.file)
        self.logs[label].update(done, total, description)

    def stop(self) -> None:
        for bar, _ in self.bars.values():
            bar.stop()


def _ppl(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "not run"
    return (f"{entry['perplexity']:.2f}  (block {entry['block_size']}, stride {entry['stride']}, "
            f"{count(entry['tokens'])} tokens)")


def summary_table(report: Mapping[str, Any]) -> Table:
    """The end-of-run table: parameters, perplexity at each stage, speed, where the model was saved."""
    before, after = report.get("params_before"), report.get("params_after")
    perplexity = report.get("perplexity") or {}
    items = [("model", report.get("model", "")), ("recipe", report.get("recipe", "")),
             ("parameters", f"{count(before)} -> {count(after)} ({ratio(before, after)} smaller)"),
             ("perplexity, original model", _ppl(perplexity.get("teacher"))),
             ("perplexity, right after decomposition", _ppl(perplexity.get("compressed"))),
             ("perplexity, after distillation", _ppl(perplexity.get("distilled")))]
    bytes_before, bytes_after = report.get("bytes_before"), report.get("bytes_after")
    if isinstance(bytes_before, int) and isinstance(bytes_after, int):
        quantization = report.get("quantization") or {}
        how = f", factors in int{quantization['bits']}" if quantization.get("bits") else ""
        items.insert(3, ("weights", f"{megabytes(bytes_before)} -> {megabytes(bytes_after)} "
                                    f"({ratio(bytes_before, bytes_after)} smaller{how})"))
    if "quantized" in perplexity:
        items.insert(7, ("perplexity, factors quantized", _ppl(perplexity.get("quantized"))))
    calibration = report.get("calibration")
    if calibration:
        tokens = max((i["tokens"] for i in calibration["inputs"]), default=0)
        items.append(("calibration (data-aware init)", f"{count(tokens)} tokens, {len(calibration['inputs'])} distinct "
                      f"inputs, {calibration['memory_bytes'] / 2**20:.1f} MiB of statistics"
                      + (f", from {calibration['file']}" if calibration.get("file") else "")))
    speed = report.get("speed") or {}
    if speed.get("ratio"):
        items.append(("forward speed vs original", f"{speed['ratio']:.2f}x  ({speed.get('protocol', '')})"))
    distill = report.get("distill") or {}
    if distill.get("steps"):
        items.append(("distillation steps", distill["steps"]))
    items.append(("saved to", report.get("output_dir", "")))
    return key_value_table("summary", items)
