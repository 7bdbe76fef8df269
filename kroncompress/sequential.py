"""Sequential calibration: each module's statistics taken with the modules before it already compressed.

The parallel calibration pass measures every module on the original model's inputs; once the modules before
it are compressed, a module sees other inputs, and errors compound unseen. Here the modules are compressed
group by group in the order the forward pass reaches them (a group: consecutive modules reading the same
input, such as q/k/v or gate/up), and before each group one pass over the calibration blocks runs the
original model (the teacher) and the partly compressed one side by side, collecting for each module of the
group the moments of `kroncompress.linalg.refit.CrossMoments`:

    Css = sum x_s x_s^T,  Cts = sum x_t x_s^T,  Ctt = sum x_t x_t^T,

x_t its input in the teacher, x_s in the student, at the same tokens. The module is then initialised on
Css (what it will really see) and refit against the teacher's outputs W x_t on the student's inputs.

Layer by layer, as GPTQ and SVD-LLM calibrate: where the groups sit in the model's stack of blocks (the
outermost ModuleList its forward runs in order, feeding each block's output to the next), both models' inputs
to the current block are kept for every calibration batch, with the arguments the model passed each block
(masks, position embeddings) recorded once. A group's pass then runs that one block, and moving to the next
block runs each model's finished block once: the whole costs a few forward passes, not one per group. Where
no such stack is found (or its blocks are not chained output to input), each pass runs the models from
their inputs and stops once the group's inputs are recorded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from kroncompress.linalg.refit import CrossMoments
from kroncompress.linalg.whitening import DEFAULT_DAMPING, damp


class _Stop(Exception):
    """Raised by a hook once everything a pass needs is recorded: the rest of the forward is skipped."""


def _forward(model: nn.Module, input_ids: torch.Tensor) -> None:
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        model(input_ids=input_ids, **kwargs)
    except _Stop:
        pass


def _run(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor | None:
    """The block's output hidden states (None when a hook stopped it)."""
    args, kwargs = call
    try:
        out = block(hidden, *args, **kwargs)
    except _Stop:
        return None
    return out if isinstance(out, torch.Tensor) else out[0]


CACHE_ARGUMENTS = ("past_key_value", "past_key_values", "layer_past")  # a block must not grow a KV cache


def block_of(model: nn.Module, name: str) -> tuple[str, int] | None:
    """(path of the outermost ModuleList above module `name`, the index of its child holding it), or None."""
    parts = name.split(".")
    for k in range(len(parts) - 1):
        if parts[k + 1].isdigit():
            path = ".".join(parts[:k + 1])
            if isinstance(model.get_submodule(path), nn.ModuleList):
                return path, int(parts[k + 1])
    return None


@dataclass
class _BlockInputs:
    """Both models' inputs to block `index` of the stack at `path`, one per calibration batch, and what the
    model passed each block besides them (`calls[b][i]`: (args, kwargs) of block i in batch b)."""

    student: nn.Module
    path: str
    index: int
    teacher_hidden: list[torch.Tensor] = field(default_factory=list)
    student_hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)


class SequentialStatistics:
    """Collects cross moments group by group; see the module docs. `teacher`: the original model (kept
    unchanged); `blocks`: (N, T) calibration token ids; `layerwise`: keep the inputs of the current block of
    the model's stack (False: every pass runs the models from their inputs)."""

    def __init__(self, teacher: nn.Module, blocks, *, damping: float = DEFAULT_DAMPING, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None, layerwise: bool = True):
        self.teacher = teacher.eval()
        self.blocks = torch.as_tensor(blocks, dtype=torch.long)
        if self.blocks.dim() != 2 or len(self.blocks) == 0:
            raise ValueError("sequential calibration: blocks must be a non-empty (N, T) tensor of token ids")
        self.damping = damping
        self.batch_size = batch_size
        self.progress = progress
        self.passes = 0
        self.layerwise = layerwise
        self._inputs: _BlockInputs | None = None

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
        inputs = self._block_inputs(student, group) if self.layerwise else None
        if inputs is None:
            runs = [(lambda b=b: _forward(self.teacher, b), lambda b=b: _forward(student, b.to(_device(student))))
                    for b in self._batches(self.teacher)]
        else:
            t_block = self.teacher.get_submodule(inputs.path)[inputs.index]
            s_block = student.get_submodule(inputs.path)[inputs.index]
            runs = [(lambda b=b: _run(t_block, inputs.teacher_hidden[b], inputs.calls[b][inputs.index]),
                     lambda b=b: _run(s_block, inputs.student_hidden[b], inputs.calls[b][inputs.index]))
                    for b in range(len(inputs.calls))]
        return self._collect(student, group, runs)

    def _batches(self, model: nn.Module) -> list[torch.Tensor]:
        return [self.blocks[i:i + self.batch_size].to(_device(model)) for i in range(0, len(self.blocks), self.batch_size)]

    def _block_inputs(self, student: nn.Module, group: list[str]) -> _BlockInputs | None:
        """The inputs of the block holding `group`, moved there from the kept ones (taken anew for another
        student, another stack, or a block behind the kept one); None where the stack cannot be used."""
        where = {block_of(self.teacher, name) for name in group}
        if len(where) != 1 or None in where:
            return None
        path, index = where.pop()
        kept = self._inputs
        if kept is None or kept.student is not student or kept.path != path or kept.index > index:
            kept = self._inputs = self._capture(student, path)
            if kept is None:
                self.layerwise = False  # this model's stack is not a chain of blocks: run whole models
                return None
        t_blocks, s_blocks = self.teacher.get_submodule(path), student.get_submodule(path)
        while kept.index < index:  # the blocks before are finished: run each model's once
            i = kept.index
            for b, calls in enumerate(kept.calls):
                kept.teacher_hidden[b] = _run(t_blocks[i], kept.teacher_hidden[b], calls[i])
                kept.student_hidden[b] = _run(s_blocks[i], kept.student_hidden[b], calls[i])
            kept.index += 1
        return kept

    def _capture(self, student: nn.Module, path: str) -> _BlockInputs | None:
        """One teacher pass per batch recording every block's arguments (stopped after the last block), and
        one student pass up to the first block; None unless the blocks run in order, each on the last's output."""
        blocks = self.teacher.get_submodule(path)
        kept = _BlockInputs(student, path, 0)
        for batch in self._batches(self.teacher):
            calls: list[tuple[tuple, dict]] = []
            last_output: Any = None
            chained = True

            def before(module, args, kwargs, i):
                nonlocal chained
                if i != len(calls) or not args or not isinstance(args[0], torch.Tensor) \
                        or (i > 0 and args[0] is not last_output):
                    chained = False
                    raise _Stop
                if i == 0:
                    kept.teacher_hidden.append(args[0])
                calls.append((tuple(args[1:]), {k: (None if k in CACHE_ARGUMENTS else v) for k, v in kwargs.items()}))

            def after(module, args, kwargs, output, i):
                nonlocal last_output
                last_output = output if isinstance(output, torch.Tensor) else output[0]
                if i == len(blocks) - 1:
                    raise _Stop

            handles = [block.register_forward_pre_hook(lambda m, a, k, i=i: before(m, a, k, i), with_kwargs=True)
                       for i, block in enumerate(blocks)]
            handles += [block.register_forward_hook(lambda m, a, k, o, i=i: after(m, a, k, o, i), with_kwargs=True)
                        for i, block in enumerate(blocks)]
            try:
                _forward(self.teacher, batch)
            finally:
                for h in handles:
                    h.remove()
            if not chained or len(calls) != len(blocks):
                return None
            kept.calls.append(calls)

        def first_input(module, args):
            kept.student_hidden.append(args[0])
            raise _Stop

        handle = student.get_submodule(path)[0].register_forward_pre_hook(first_input)
        try:
            for batch in self._batches(student):
                _forward(student, batch)
        finally:
            handle.remove()
        return kept

    def _collect(self, student: nn.Module, group: list[str], runs) -> dict[str, CrossMoments]:
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
            for b, (run_teacher, run_student) in enumerate(runs):
                teacher_inputs.clear()
                run_teacher()
                run_student()
                done = min((b + 1) * self.batch_size, len(self.blocks))
                tokens += (done - b * self.batch_size) * self.blocks.shape[1]
                if self.progress is not None:
                    self.progress(done, len(self.blocks))
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
