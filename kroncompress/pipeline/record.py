"""The run record: what the stages of a run hand each other, and the wall time of each stage."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Run:
    """One run as its stages fill it in. `text` is set by a language-model run (its distillation text and
    perplexity protocol), `task` by a task run (its labelled examples); `scores` holds each evaluation
    (stage name -> perplexity or task score) and `timings` each stage's seconds."""

    settings: Any
    timings: dict[str, float] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    plan: Any = None
    text: Any = None  # kroncompress.pipeline.text.RunText
    scorer: Any = None  # kroncompress.pipeline.evaluate.Scorer: the perplexity protocol of a language-model run
    task: Any = None  # kroncompress.tasks.data.TaskData
    teacher: Any = None
    stats: Any = None
    sequential: Any = None  # kroncompress.sequential.SequentialStatistics when calibration.sequential is set
    calibration: dict | None = None
    compression: Any = None
    distill_summary: dict | None = None
    quantization: dict | None = None  # kc.quantize's summary, when the recipe has a `quantize` section
    scores: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    @property
    def distills(self) -> bool:
        """Whether the run has a distillation stage (the settings allow it and the recipe or task has one)."""
        if self.task is not None:
            return bool(self.settings.distill)
        return self.text is not None and self.text.distilling

    @contextlib.contextmanager
    def stage(self, name: str):
        """`with run.stage("name"):` adds the block's wall time, in seconds, to `timings["name"]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
