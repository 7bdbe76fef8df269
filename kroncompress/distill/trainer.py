"""The distillation engine: a transformers `Trainer` whose loss is the teacher-student distillation loss.

    result = distill(student, teacher, recipe.distill, train_blocks, eval_blocks, output_dir="runs/x/checkpoints")
    result.eval_history      # [{"step": 0, "perplexity": ...}, {"step": 500, ...}, ...]

Everything else comes from the Trainer (and accelerate under it): AdamW, linear warmup + cosine decay,
gradient accumulation, clipping, bf16/fp16 autocast on GPU, gradient checkpointing, checkpoints with
optimizer/scheduler/RNG state, and DDP / FSDP / DeepSpeed under `accelerate launch` or `torchrun`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kroncompress.distill.checkpoints import last_checkpoint  # noqa: F401  (public here before checkpoints.py)
from kroncompress.distill.checkpoints import (
    checkpoint_folders, load_checkpoint_weights, record_settings, resume_point, run_settings as describe_run,
    verify_settings,
)
from kroncompress.distill.data import BlockDataset
from kroncompress.distill.guards import (  # noqa: F401  (the errors: public here before guards.py)
    NonFiniteLossError, NonFiniteWeightsError, check_finite_weights,
)
from kroncompress.distill.losses import LOSS_TERMS, DistillationLoss, check_same_vocabulary, resolve_layer_map
from kroncompress.distill.models import disable_attention_dropout, is_causal, keep_inference_settings, use_eager_attention
from kroncompress.recipe import DistillConfig

RESULT_NAME = "distill_result.json"
DEFAULT_SAVE_EVERY = 500
EVALS_PER_RUN = 10  # evaluations over a run whose settings give no train.eval_every
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class DistillResult:
    """What `distill` did: optimizer steps, the last logged value of each loss term, the validation
    perplexity at each evaluation (for a plot), wall time and tokens seen (all processes, all sessions)."""

    steps: int
    final_losses: dict[str, float]
    eval_history: list[dict[str, float]] = field(default_factory=list)
    loss_history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    resumed_from: str | None = None
    output_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable plain data."""
        return asdict(self)


def as_dataset(data: Any, *, tokenizer: Any = None, block_size: int = 1024,
               model: nn.Module | None = None) -> torch.utils.data.Dataset | None:
    """A Dataset of dicts from a torch Dataset (returned as is), an (N, block) tensor of ids, or None; or
    from text or tokens in memory or a spec (a `datasets.Dataset` / `IterableDataset`, a list of strings,
    1-D ids, a dict; see kroncompress.distill.data), read with `tokenizer` (default: the one saved with
    `model`'s name_or_path) and packed into `block_size` blocks."""
    if data is None or isinstance(data, torch.utils.data.Dataset):
        return data
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        return BlockDataset(data.long())
    if isinstance(data, (list, tuple)) and data and not isinstance(data[0], str):
        return BlockDataset(torch.as_tensor(data, dtype=torch.long))  # nested lists of ids
    from kroncompress.distill.data import model_tokenizer, pack_blocks, spec_bos, text_spec, token_stream

    spec = text_spec(data)
    size = spec.block_size if isinstance(data, dict) and "block_size" in data else block_size
    tokens_only = isinstance(spec.inline, torch.Tensor) or (
        spec.column not in (getattr(spec.inline, "column_names", None) or (spec.column,)))
    if not tokens_only:
        tokenizer = model_tokenizer(model, tokenizer, needed_for="distill on text")
    return BlockDataset(pack_blocks(token_stream(spec, tokenizer), int(size), spec_bos(spec, tokenizer)))


# -- progress -----------------------------------------------------------------------------------------

def _show_progress(progress: bool | None) -> bool:
    """Whether to draw rich's bar: on a terminal (or forced by KRONCOMPRESS_FORCE_PROGRESS), rich installed."""
    if progress is False:
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return sys.stderr.isatty() or bool(progress and os.environ.get("KRONCOMPRESS_FORCE_PROGRESS"))


def _progress_callback(progress: bool | None):
    """rich's bar on a terminal; plain lines at a steady rhythm otherwise (a log file, CI: see
    kroncompress.progress); None for progress=False."""
    from kroncompress.distill.hf_trainer import LogProgress, RichProgress

    if progress is False:
        return None
    return RichProgress() if _show_progress(progress) else LogProgress("distill")


# -- the public entry point ----------------------------------------------------------------------------

def _precision(bf16: bool) -> dict[str, bool]:
    """Mixed precision only on GPU: bf16 where supported, else fp16 (with loss scaling); fp32 on CPU."""
    if not bf16 or not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    if torch.cuda.is_bf16_supported():
        return {"bf16": True, "fp16": False}
    return {"bf16": False, "fp16": True}


def check_training_args(training_args: Any) -> dict[str, Any]:
    """`training_args` as a dict of TrainingArguments keyword arguments; ValueError naming an unknown key
    (with a did-you-mean)."""
    import difflib

    from kroncompress.recipe import report_to_problem, training_argument_names

    if not training_args:
        return {}
    if not isinstance(training_args, Mapping):
        raise ValueError(f"training_args: expected a mapping of TrainingArguments keywords, got {type(training_args).__name__}")
    names = training_argument_names()
    for key in training_args:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see transformers.TrainingArguments for the keys"
            raise ValueError(f"training_args: unknown TrainingArguments key {key!r}; {hint}")
    problem = report_to_problem(training_args.get("report_to"))
    if problem:
        raise ValueError(f"training_args.report_to: {problem}")
    return dict(training_args)


def eval_every(train: Any, examples: int) -> int:
    """The evaluation schedule of every run: `train.eval_every` (a TrainConfig's), else about EVALS_PER_RUN
    evaluations over the steps that `examples` training examples (or blocks) make, across every process."""
    if train.eval_every:
        return train.eval_every
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = math.ceil(examples / (train.batch_size * world)) // train.grad_accum or 1
    steps = train.max_steps or max(1, math.ceil(per_epoch * train.epochs))
    return max(1, steps // EVALS_PER_RUN)


def training_arguments(config: DistillConfig, output_dir: str | os.PathLike, *, max_steps: int | None = None,
                       has_eval: bool = False, log_every: int = 10, eval_on_start: bool = False,
                       training_args: Mapping[str, Any] | None = None, save: bool = True):
    """The transformers TrainingArguments a DistillConfig stands for (every run trains with these: token
    distillation, task distillation, fine-tuning). `train.training_args`, then `training_args`, replace or add
    keyword arguments (e.g. `report_to`, `logging_steps`; default `report_to="none"`). `save=False` keeps no
    checkpoint (a run whose result is saved by its caller)."""
    from transformers import TrainingArguments

    from kroncompress.distill.hf_trainer import version_arguments

    train = config.train
    steps = max_steps if max_steps is not None else train.max_steps
    eval_every = train.eval_every if has_eval else None
    save_every = train.save_every or DEFAULT_SAVE_EVERY
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm or 0.0,
        optim="adamw_torch",
        lr_scheduler_type=_SCHEDULERS[train.schedule],
        num_train_epochs=train.epochs,
        max_steps=steps if steps is not None else -1,
        seed=train.seed,
        data_seed=train.seed,
        **version_arguments(warmup_ratio=train.warmup_ratio, activation_checkpointing=train.gradient_checkpointing),
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        eval_on_start=bool(has_eval and eval_on_start),
        prediction_loss_only=True,
        save_strategy="steps" if save else "no",
        save_steps=save_every,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=log_every,
        logging_first_step=True,
        include_num_input_tokens_seen="all",
        disable_tqdm=True,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # without a GPU, use_cpu is what makes accelerate run DDP over gloo under torchrun
        use_cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available(),
        **_precision(train.bf16),
    )
    settings.update(check_training_args(train.training_args))
    settings.update(check_training_args(training_args))
    return TrainingArguments(**settings)


def distill(student: nn.Module, teacher: nn.Module | None, config: DistillConfig, train_data: Any,
            eval_data: Any = None, output_dir: str | os.PathLike = "distill-checkpoints", *,
            max_steps: int | None = None, resume: bool = False, progress: bool | None = True,
            log_every: int = 10, callbacks: list | None = None,
            run_settings: dict[str, Any] | None = None, tokenizer: Any = None,
            training_args: Mapping[str, Any] | None = None) -> DistillResult:
    """Train `student` in place against the frozen `teacher` with `config`'s losses and settings.

    `train_data` / `eval_data`: a Dataset of {"input_ids", "labels"} dicts or an (N, block_size) tensor of
    token ids; or text or tokens as any data spec takes them (a `datasets.Dataset` / `IterableDataset`
    with a "text" column, a list of strings, 1-D ids, a dict or spec string), tokenised with `tokenizer`
    (default: the one saved with the student's name_or_path) into `config.data.block_size` blocks.
    `training_args`: TrainingArguments keyword arguments (e.g. `{"report_to": ["wandb"]}`) over those of
    `config.train.training_args` and the defaults (`report_to="none"`). `output_dir` receives the checkpoints (`checkpoint-<step>`: weights, optimizer, scheduler,
    RNG and trainer state, every `train.save_every` steps (default 500) and at the end) and
    distill_result.json; only the main process writes. `max_steps` overrides `train.max_steps`.
    `resume=True` continues from the newest intact checkpoint in `output_dir` (a fresh start if there is
    none; a damaged newer one is skipped with a warning) and ends where an uninterrupted run would. A fresh
    run records its settings (the config, step budget, student layout, data hash and `run_settings`, e.g.
    the recipe's fingerprint) in `output_dir`/run_settings.json; a resumed one must match them. With
    `eval_data` and `train.eval_every`, the validation perplexity is measured before training, every
    `eval_every` steps and at the end. `progress` (default True): rich's bar on a terminal, else plain lines
    (step, ETA, loss terms) every $KRONCOMPRESS_PROGRESS_INTERVAL seconds (see kroncompress.progress);
    False: neither.

    Raises NonFiniteWeightsError (a ValueError) naming the first NaN/inf tensor of the student or teacher
    before training; NonFiniteLossError naming the step and loss term when a term turns NaN/inf;
    ResumeError (a ValueError) naming each changed setting, or when no checkpoint is intact; ValueError for
    a teacher with another vocabulary, a bad layer_map, or existing checkpoints without resume=True.
    """
    from transformers.trainer_callback import PrinterCallback

    from kroncompress.distill.hf_trainer import DistillTrainer

    start = time.perf_counter()
    with keep_inference_settings(student, teacher):
        loss_fn, teacher = _loss_and_teacher(student, teacher, config)
        check_finite_weights(student, "student")
        if teacher is not None:
            check_finite_weights(teacher, "teacher")
        output_dir = Path(output_dir)
        existing = checkpoint_folders(output_dir)  # damaged ones too: the Trainer's rotation would count them
        if existing and not resume:
            raise ValueError(f"{output_dir} already holds checkpoints (newest: {existing[0].name}); pass resume=True "
                             "(CLI: --resume) to continue that run, or use an empty output folder")
        checkpoint = resume_point(output_dir) if resume else None
        size = config.data.block_size if config.data is not None else 1024
        limit = getattr(student.config, "max_position_embeddings", None) or getattr(student.config, "n_positions", None)
        size = min(size, limit) if limit else size
        train_dataset, eval_dataset = (as_dataset(d, tokenizer=tokenizer, block_size=size, model=student)
                                       for d in (train_data, eval_data))
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("distill: the training data is empty; give at least one block of token ids")
        has_eval = eval_dataset is not None and len(eval_dataset) > 0 and config.train.eval_every is not None
        args = training_arguments(config, output_dir, max_steps=max_steps, has_eval=has_eval,
                                  log_every=log_every, eval_on_start=checkpoint is None, training_args=training_args)
        settings = describe_run(config, args.max_steps, student, train_dataset, eval_dataset, run_settings)
        if checkpoint:
            verify_settings(output_dir, settings, checkpoint, student)
        trainer = DistillTrainer(model=student, args=args, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset if has_eval else None, teacher=teacher, loss_fn=loss_fn,
                                 callbacks=list(callbacks or []))
        if checkpoint is None and trainer.args.should_save:
            record_settings(output_dir, settings)
        trainer.remove_callback(PrinterCallback)
        bar = _progress_callback(progress)
        if bar is not None:
            trainer.add_callback(bar)
        if checkpoint and _finished(checkpoint, args.max_steps):
            # the Trainer would run one step past the end; a finished run only reloads its final weights
            from transformers import TrainerState

            load_checkpoint_weights(student, checkpoint)
            trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        else:
            trainer.train(resume_from_checkpoint=checkpoint)
            check_finite_weights(student, "student", after_training=True,
                                 advice="lower the learning rate (train.lr) or turn on gradient clipping (train.max_grad_norm)")
        student.eval()

    result = _result(trainer, time.perf_counter() - start, checkpoint if resume else None, output_dir)
    if trainer.args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULT_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result


def _finished(checkpoint: str, max_steps: int) -> bool:
    """Whether the checkpoint already reached the run's end (`max_steps`, else the end it planned)."""
    state = json.loads(Path(checkpoint, "trainer_state.json").read_text(encoding="utf-8"))
    end = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return end > 0 and state.get("global_step", 0) >= end


def _loss_and_teacher(student: nn.Module, teacher: nn.Module | None,
                      config: DistillConfig) -> tuple[DistillationLoss, nn.Module | None]:
    """The loss of `config` and the teacher it needs (None when only `ce` is on), the teacher frozen and both
    models set up for the enabled terms (layer map, eager attention, no attention dropout)."""
    loss_fn = DistillationLoss(config.losses, causal=is_causal(student))
    if not loss_fn.needs_teacher:
        return loss_fn, None
    if teacher is None:
        raise ValueError(f"loss terms {', '.join(n for n in loss_fn.enabled if n != 'ce')} need a teacher; "
                         "pass the original model as teacher (or keep only ce)")
    check_same_vocabulary(student, teacher)
    if loss_fn.needs_hidden_states or loss_fn.needs_attentions:
        loss_fn.layer_map = resolve_layer_map(student, teacher, config.layer_map)
    _freeze(teacher)
    if loss_fn.needs_attentions:
        use_eager_attention(student)
        use_eager_attention(teacher)
        disable_attention_dropout(student)
    return loss_fn, teacher


def _freeze(teacher: nn.Module) -> None:
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)


def _result(trainer, seconds: float, resumed_from: str | None, output_dir: Path) -> DistillResult:
    history = trainer.state.log_history
    evals: dict[int, dict[str, float]] = {}
    losses = []
    for entry in history:
        step = int(entry.get("step", 0))
        if "eval_perplexity" in entry and step not in evals:
            evals[step] = {"step": step, "perplexity": float(entry["eval_perplexity"]), "loss": float(entry["eval_loss"])}
        terms = {k[5:]: float(v) for k, v in entry.items() if k.startswith("loss_")}
        if terms:
            losses.append({"step": step, "loss": float(entry.get("loss", float("nan"))), **terms})
    final = {name: losses[-1][name] for name in ("loss", *LOSS_TERMS) if losses and name in losses[-1]}
    return DistillResult(steps=trainer.state.global_step, final_losses=final,
                         eval_history=[evals[s] for s in sorted(evals)], loss_history=losses, seconds=round(seconds, 3),
                         tokens=int(trainer.state.num_input_tokens_seen), resumed_from=resumed_from,
                         output_dir=str(output_dir))
