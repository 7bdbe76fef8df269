"""Sequential calibration: each module's statistics taken with the modules before it already compressed.

The parallel calibration pass measures every module on the original model's inputs; once the modules before
it are compressed, a module sees other inputs, and errors compound unseen. Here the modules are compressed
group by group in the order the forward pass reaches them (a group: consecutive modules reading the same
input, such as q/k/v or gate/up), and before each group one pass over the calibration blocks runs the
original model (the teacher) and the partly compressed one side by side, collecting for each module of the
group the moments of `kroncompress.linalg.refit.CrossMoments`:

    Css = sum x_s x_s^T,  Cts = sum x_t x_s^T,  Ctt = sum x_t x_t^T,

x_t its input in the teacher, x_s in the student, at the same tokens. The module is then initialised on
Css (what it will really see) and refit against the teacher's outputs W x_t on the student's inputs. Each
pass stops as soon as the group's inputs are recorded, so the whole costs about half a forward pass per group
(GPTQ and SVD-LLM calibrate layer by layer the same way).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from kroncompress.linalg.refit import CrossMoments
from kroncompress.linalg.whitening import DEFAULT_DAMPING, damp


class _Stop(Exception):
    """Raised by a hook once everything a pass needs is recorded: the rest of the forward is skipped."""


def _forward(model: nn.Module, input_ids: torch.Tensor) -> None:
    try:
        model(input_ids=input_ids)
    except _Stop:
        pass


class SequentialStatistics:
    """Collects cross moments group by group; see the module docs. `teacher`: the original model (kept
    unchanged); `blocks`: (N, T) calibration token ids."""

    def __init__(self, teacher: nn.Module, blocks, *, damping: float = DEFAULT_DAMPING, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None):
        self.teacher = teacher.eval()
        self.blocks = torch.as_tensor(blocks, dtype=torch.long)
        if self.blocks.dim() != 2 or len(self.blocks) == 0:
            raise ValueError("sequential calibration: blocks must be a non-empty (N, T) tensor of token ids")
        self.damping = damping
        self.batch_size = batch_size
        self.progress = progress
        self.passes = 0

    def groups(self, names: Iterable[str]) -> list[list[str]]:
        """`names` in the order the teacher's forward reaches them, consecutive readers of one input together;
        modules the forward never reaches are left out (the caller compresses them without statistics)."""
        wanted = set(names)
        modules = dict(self.teacher.named_modules())
        order: list[tuple[str, torch.Tensor]] = []  # the inputs are kept alive: a freed one's address could be reused

        def hook(name):
            def record(module, args):
                if name not in {n for n, _ in order}:
                    order.append((name, args[0]))
            return record

        handles = [modules[n].register_forward_pre_hook(hook(n)) for n in wanted if n in modules]
        try:
            with torch.no_grad():
                _forward(self.teacher, self.blocks[:1].to(_device(self.teacher)))
        finally:
            for h in handles:
                h.remove()
        groups: list[list[str]] = []
        last = None
        for name, tensor in order:
            if groups and tensor is last:
                groups[-1].append(name)
            else:
                groups.append([name])
            last = tensor
        return groups

    @torch.no_grad()
    def collect(self, student: nn.Module, group: list[str]) -> dict[str, CrossMoments]:
        """CrossMoments (Css damped) of each module of `group`, the teacher and `student` run side by side."""
        t_modules, s_modules = dict(self.teacher.named_modules()), dict(student.named_modules())
        sums = {n: None for n in group}
        teacher_inputs: dict[str, torch.Tensor] = {}
        tokens = 0

        def teacher_hook(name):
            def record(module, args):
                teacher_inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                if len(teacher_inputs) == len(group):
                    raise _Stop
            return record

        def student_hook(name):
            def record(module, args):
                xs = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                xt = teacher_inputs[name]
                parts = (xs.T @ xs, xt.T @ xs, xt.T @ xt)
                sums[name] = parts if sums[name] is None else tuple(a + b for a, b in zip(sums[name], parts))
                if name == group[-1]:  # a group's modules read one input: the last one ends the pass
                    raise _Stop
            return record

        handles = [t_modules[n].register_forward_pre_hook(teacher_hook(n)) for n in group]
        handles += [s_modules[n].register_forward_pre_hook(student_hook(n)) for n in group]
        was_training = student.training
        student.eval()
        try:
            for start in range(0, len(self.blocks), self.batch_size):
                batch = self.blocks[start:start + self.batch_size]
                teacher_inputs.clear()
                _forward(self.teacher, batch.to(_device(self.teacher)))
                _forward(student, batch.to(_device(student)))
                tokens += batch.numel()
                if self.progress is not None:
                    self.progress(start + len(batch), len(self.blocks))
        finally:
            for h in handles:
                h.remove()
            student.train(was_training)
        self.passes += 1
        missing = [n for n in group if sums[n] is None]
        if missing:
            raise ValueError(f"sequential calibration: module(s) {', '.join(missing)} did not run in the student's "
                             "forward pass; compress them without `sequential`")
        return {n: CrossMoments(damp(ss / tokens, self.damping), ts / tokens, tt / tokens)
                for n, (ss, ts, tt) in sums.items()}


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
