"""The non-finite guard of every training entry point: `compress`'s distillation (`distill`), `finetune` and
`compress-task` (`distill_task`) all call these, so a NaN/inf never reaches a saved folder with exit 0.

    check_training_settings(epochs=3.0, lr=5e-5, seed=0)   # before any model loads
    check_finite_weights(teacher, "teacher")               # before training: broken source weights
    check_finite_loss({"ce": loss}, step=7, where="finetune", advice="lower the learning rate")  # every step
    check_finite_weights(model, "fine-tuned model", after_training=True)   # before saving

Both errors are KroncompressErrors (ValueErrors), so the CLI prints them as one `error:` line with exit code 2.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from kroncompress.errors import CheckpointError, KroncompressError

SEED_MAX = 2**32 - 1  # numpy's and the Trainer's seeds are 32-bit


class NonFiniteLossError(RuntimeError, KroncompressError):
    """A loss term became NaN or inf: training stopped; the message names the step and the term(s).
    (A RuntimeError as before, and a KroncompressError so the CLI prints it as one line.)"""


class NonFiniteWeightsError(CheckpointError):
    """The model holds NaN/inf weights: before training its source weights are broken; after training the
    training diverged (nothing is saved)."""


def check_finite_weights(model: nn.Module, role: str = "model", *, after_training: bool = False,
                         advice: str = "lower the learning rate or check the data") -> None:
    """NonFiniteWeightsError naming the first floating-point parameter of `model` holding NaN or inf."""
    for name, param in model.named_parameters():
        bad = int((~torch.isfinite(param.detach())).sum()) if param.is_floating_point() else 0
        if not bad:
            continue
        if after_training:
            raise NonFiniteWeightsError(
                f"training diverged: the {role}'s parameter {name} holds {bad:,} NaN/inf value(s) of {param.numel():,} "
                f"after the last step, so it was not saved; {advice}")
        fix = "the model files or their compression" if role == "student" else f"the {role}'s model files"
        raise NonFiniteWeightsError(
            f"the {role}'s parameter {name} holds {bad:,} NaN/inf value(s) of {param.numel():,} before training; "
            f"its source weights are broken ({fix}): reload or re-download them; lowering the learning rate will not help")


def non_finite_terms(terms: Mapping[str, Any]) -> list[str]:
    """`name=value` of every loss term (tensor or float) that is NaN or inf."""
    bad = []
    for name, value in terms.items():
        number = float(value.detach().float()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(number):
            bad.append(f"{name}={number:g}")
    return bad


def check_finite_loss(terms: Mapping[str, Any], *, step: int, where: str, advice: str) -> None:
    """NonFiniteLossError when a loss term is NaN/inf: `where` names the run, `advice` the fix."""
    bad = non_finite_terms(terms)
    if bad:
        raise NonFiniteLossError(f"{where}: non-finite loss at step {step} ({', '.join(bad)}); training stopped and "
                                 f"nothing was saved; {advice}")


def check_training_settings(*, epochs: Any = None, lr: Any = None, seed: Any = None, flags: bool = False) -> None:
    """ValueError for a training setting no run can use: epochs or a learning rate that is not a finite
    number > 0, a seed outside 0..2**32-1. `flags=True` names them as the CLI does (--epochs)."""
    def name(field: str) -> str:
        return f"--{field}" if flags else field

    for field, value in (("epochs", epochs), ("lr", lr)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            hint = (f"3, or cap the steps with {name('max-steps' if flags else 'max_steps')}" if field == "epochs"
                    else "5e-5")
            raise ValueError(f"{name(field)} {value!r}: must be a finite number > 0 (e.g. {hint})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        raise ValueError(f"{name('seed')} {seed!r}: a seed must be an integer from 0 to {SEED_MAX}")
