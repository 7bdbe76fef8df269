"""The runs of kroncompress, each a list of stages over one run record.

    report = kc.run_pipeline("path/to/gpt2", "kn-gpt2", "runs/kn-gpt2", data="shakespeare", max_steps=300)
    report["perplexity"]   # {"teacher": {...}, "compressed": {...}, "distilled": {...}}, each with its protocol

`settings` holds what each run is told, `record` the run record the stages fill in, one module per stage
(`load`, `plan`, `evaluate`, `calibrate`, `compress`, `distill`, `save`, `report`), `text` the text a
language-model run reads, and `runs` the stage lists (COMPRESS, COMPRESS_TASK, CALIBRATE) with their entry
points. Adding a stage: a function of the record in its own module, named in the lists that need it.
"""

from kroncompress.pipeline.record import Run
from kroncompress.pipeline.runs import (
    CALIBRATE, COMPRESS, COMPRESS_TASK, run, run_calibration, run_pipeline, run_stages, run_task_pipeline,
)
from kroncompress.pipeline.settings import CalibrationSettings, PipelineSettings, RunSettings, TaskSettings

__all__ = [
    "run_pipeline", "run_stages", "run_task_pipeline", "run_calibration", "run", "Run",
    "COMPRESS", "COMPRESS_TASK", "CALIBRATE",
    "RunSettings", "PipelineSettings", "TaskSettings", "CalibrationSettings",
]
