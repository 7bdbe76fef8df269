"""Downstream tasks (GLUE-style): fine-tune a teacher, compress it, distil it on the task, score it.

    from kroncompress import tasks
    teacher = tasks.finetune("path/to/bert", "sst2", "glue/sst2", output_dir="runs/bert-sst2")
    report = tasks.run_task_pipeline("runs/bert-sst2", "kron-task", "runs/kron-sst2", task="sst2", data="glue/sst2")
    report["scores"]["distilled"]["score"]

Submodules: `spec` (the task spec, GLUE presets), `data` (loading and checking labelled data), `sources`
(where the rows come from: hub, folders, csv / tsv / jsonl files), `metrics` (GLUE's metrics, computed
with numpy), `modeling` (classification heads, padding, scoring), `loss` (the loss head of training
on a task), `training` (fine-tuning and task distillation on the distillation engine). The whole run
(`run_task_pipeline`) is the COMPRESS_TASK stage list of kroncompress.pipeline, handed on here.
"""

from kroncompress.tasks.data import (
    GLUE_TASKS, TaskData, TaskSpec, TaskSplit, cap_eval_splits, load_task, load_task_recipe, task_spec,
)
from kroncompress.tasks.metrics import METRICS, compute_metrics
from kroncompress.tasks.modeling import evaluate_task, load_task_model, predict
from kroncompress.tasks.training import FinetuneResult, default_task_distill, distill_task, finetune

__all__ = [
    "GLUE_TASKS", "TaskData", "TaskSpec", "TaskSplit", "cap_eval_splits", "load_task", "task_spec", "METRICS", "compute_metrics",
    "evaluate_task", "load_task_model", "predict", "FinetuneResult", "default_task_distill", "distill_task", "finetune",
    "load_task_recipe", "run_task_pipeline",
]


def __getattr__(name: str):
    # the task run is a stage list of kroncompress.pipeline, which builds on this package: handed on when asked
    # for, so importing kroncompress.tasks never imports the pipeline above it
    if name == "run_task_pipeline":
        from kroncompress.pipeline.runs import run_task_pipeline

        return run_task_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
