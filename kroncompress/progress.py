"""Progress that reaches a log: plain lines at a steady rhythm for long stages when no terminal shows a bar.

    log = ProgressLog("compressing", unit="modules")
    for i, name in enumerate(names, 1):
        ...
        log.update(i, len(names), name)
    # stderr: "compressing: 12/48 modules (25%), 0:31 elapsed, ETA 1:33  transformer.h.2.mlp.c_fc"

Progress bars drawn for terminals (rich, tqdm) show nothing useful in a CI log, under `nohup` or in a
cluster job's output file. A ProgressLog writes one line when a stage starts reporting, then at most
one every `interval` seconds, and one when it completes, each with the elapsed time and an ETA (from
the rate so far). The interval is `$KRONCOMPRESS_PROGRESS_INTERVAL` seconds (default 30; 0 writes a
line on every update). `progress_callback` gives the `(done, total[, detail])` callable that
`kc.compress`, `kc.calibrate`, `kc.perplexity` and `run_pipeline` take; training stages use the
Trainer callback `kroncompress.distill.hf_trainer.LogProgress`, built on the same class.

Plain standard library: the library imports without rich or click.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Callable

INTERVAL_ENV = "KRONCOMPRESS_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def progress_interval() -> float:
    """Seconds between two progress lines: `$KRONCOMPRESS_PROGRESS_INTERVAL`, default 30; ValueError for a value
    that is not a number >= 0."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: give the seconds between two progress lines, a number >= 0 "
                         f"(0: a line on every update; default {DEFAULT_INTERVAL:g})")
    return value


def is_terminal(stream: IO | None = None) -> bool:
    """Whether `stream` (default: stderr) is an interactive terminal, where a redrawn bar is visible."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def clock(seconds: float) -> str:
    """A duration as m:ss, or h:mm:ss from one hour."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog:
    """Plain progress lines for one stage (see the module docs).

    `update(done, total, detail)` reports `done` of `total` units (total None: unknown, no ETA); a line is
    written on the first update, then when `interval` seconds have passed since the last line, and when
    `done` reaches `total`. `stream` None writes to the current `sys.stderr` (looked up at each line, so
    a redirected stderr is followed). `unit` names what is counted ("steps", "windows"). `first` (default
    True): write a line on the first update, so a log shows at once that the stage began.
    """

    def __init__(self, label: str, *, unit: str = "", interval: float | None = None, stream: IO | None = None,
                 first: bool = True, timer: Callable[[], float] = time.monotonic):
        self.label, self.unit, self.stream, self.first = label, unit, stream, first
        self.interval = progress_interval() if interval is None else float(interval)
        self.timer = timer
        self.start: float | None = None
        self.start_done = 0
        self.last_line: float | None = None
        self.finished = False
        self.lines = 0

    def update(self, done: int | float, total: int | float | None = None, detail: Any = "") -> None:
        now = self.timer()
        if self.start is None:
            # the rate counts from the first update (a resumed run starts part-way: not counted as speed)
            self.start, self.start_done = now, done
        complete = bool(total) and done >= total
        if self.finished:
            return
        if self.last_line is None:
            due = self.first or now - self.start >= self.interval
        else:
            due = now - self.last_line >= self.interval
        if not (due or complete):
            return
        self.finished = complete
        self.last_line = now
        self.write(self.line(done, total, detail, now))

    def line(self, done, total, detail: Any = "", now: float | None = None) -> str:
        """`label: done/total unit (pct%), elapsed, ETA` (ETA from the rate since the first update)."""
        now = self.timer() if now is None else now
        elapsed = now - (self.start if self.start is not None else now)
        unit = f" {self.unit}" if self.unit else ""
        if total:
            text = f"{self.label}: {_number(done)}/{_number(total)}{unit} ({100 * done / total:.0f}%)"
        else:
            text = f"{self.label}: {_number(done)}{unit}"
        text += f", {clock(elapsed)} elapsed"
        if total and done >= total:
            text += ", done"
        elif total and done > self.start_done and elapsed > 0:
            rate = (done - self.start_done) / elapsed
            text += f", ETA {clock((total - done) / rate)}"
        elif total:
            text += ", ETA unknown"
        detail = str(detail).strip() if detail is not None else ""
        return text + (f"  {detail}" if detail else "")

    def write(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(text, file=stream, flush=True)
        self.lines += 1


def _number(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def progress_callback(label: str, *, unit: str = "", interval: float | None = None,
                      stream: IO | None = None) -> Callable[..., None]:
    """A `(done, total[, detail])` callable writing a ProgressLog's lines, for the `progress=` argument of
    `kc.compress`, `kc.calibrate`, `kc.perplexity` and `run_pipeline`'s `*_progress` callbacks."""
    log = ProgressLog(label, unit=unit, interval=interval, stream=stream)

    def update(done, total=None, detail: Any = "") -> None:
        log.update(done, total, detail)

    update.log = log  # type: ignore[attr-defined]
    return update


__all__ = ["DEFAULT_INTERVAL", "INTERVAL_ENV", "ProgressLog", "clock", "is_terminal", "progress_callback",
           "progress_interval"]
