"""Calibration: one teacher pass over token blocks, accumulating each compressed layer's input statistics.

    stats = kc.calibrate(model, "kn-gpt2-mlp", tokenizer, data="shakespeare", tokens=16384)
    report = kc.compress(model, "kn-gpt2-mlp", calibration=stats)   # data-aware initialisation

For every target module (nn.Linear or GPT-2's Conv1D) a forward pre-hook adds C += X^T X (float64) for
the rows X of its input: streaming, so no activation is kept. Modules that read the very same input tensor
(q/k/v of a Llama block, gate/up of its MLP) are detected by the tensor's identity in the hook and share
one accumulator, so the memory is n x n float64 per distinct input (`memory_estimate` gives the upper
bound before the pass). The statistics the strategies receive are the damped mean second moment
C / tokens + damping * mean(diag) I (scaling C does not change any minimiser; damping keeps it SPD).

An embedding's input is a token id, so its statistic is the token counts (a length-V histogram of the ids
it looked up, its padding_idx excluded; calibration blocks are packed text, so nothing else is padding).
A tied LM head is a linear module like any other: its input second moment is collected under its own
name, and `for_module(embedding, heads=[head])` pairs the two (linalg.weighted_kronecker.TokenStatistics).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn

from kroncompress.calibration.stats import CalibrationStats, InputStatistic, TokenCount, in_features
from kroncompress.linalg.whitening import DEFAULT_DAMPING

DEFAULT_TOKENS = 16384
DEFAULT_BLOCK_SIZE = 256


def _check_hookable(name: str, module: nn.Module) -> None:
    from kroncompress.surgery import module_kind

    if module_kind(module) not in ("linear", "conv1d", "embedding"):
        raise ValueError(f"calibration: module {name!r} is a {type(module).__name__}; input statistics are collected "
                         "for nn.Linear, Conv1D and nn.Embedding modules only")


def _accumulator_bytes(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding):
        return 8 * module.num_embeddings
    return 8 * in_features(module) ** 2


def memory_estimate(model: nn.Module, module_names: Iterable[str]) -> int:
    """Bytes the accumulators need at most: n x n float64 per linear module (shared inputs count once after
    the pass), V float64 counts per embedding."""
    return sum(_accumulator_bytes(model.get_submodule(name)) for name in module_names)


class StatisticsCollector:
    """Forward pre-hooks accumulating input second moments on `module_names`; use as a context manager.

    `device`: where the accumulators live (default: where each input arrives).
    """

    def __init__(self, model: nn.Module, module_names: Iterable[str], device: str | torch.device | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else None
        self.inputs: list[InputStatistic] = []
        self.token_counts: list[TokenCount] = []
        self._of_module: dict[str, InputStatistic | TokenCount] = {}
        self._handles = []
        for name in dict.fromkeys(module_names):
            module = model.get_submodule(name)
            _check_hookable(name, module)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if isinstance(module, nn.Embedding):
                self._count(name, module, args[0])
            else:
                self._record(name, args[0])
        return hook

    def _count(self, name: str, module: nn.Embedding, ids: torch.Tensor) -> None:
        stat = self._of_module.get(name)
        if stat is None:
            device = self.device or ids.device
            stat = TokenCount(torch.zeros(module.num_embeddings, dtype=torch.float64, device=device), module.padding_idx,
                              modules=[name])
            self.token_counts.append(stat)
            self._of_module[name] = stat
        stat.add(ids)

    def _record(self, name: str, x: torch.Tensor) -> None:
        stat = self._of_module.get(name)
        if stat is None:  # first call: join the group whose latest input is this very tensor
            stat = next((s for s in self.inputs if s._last is not None and s._last() is x), None)
            if stat is None:
                device = self.device or x.device
                stat = InputStatistic(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=device))
                self.inputs.append(stat)
            stat.modules.append(name)
            self._of_module[name] = stat
        if stat._last is not None and stat._last() is x:
            return  # a module sharing this input already counted it
        stat._last = weakref.ref(x)
        stat.add(x, self.device)

    def stats(self, damping: float = DEFAULT_DAMPING) -> CalibrationStats:
        for stat in self.inputs:
            stat._last = None
        return CalibrationStats(self.inputs, damping, self.token_counts)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "StatisticsCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _forward(model: nn.Module, input_ids: torch.Tensor) -> None:
    model(input_ids=input_ids) if _takes_input_ids(model) else model(input_ids)


def _takes_input_ids(model: nn.Module) -> bool:
    import inspect

    try:
        return "input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def collect_statistics(model: nn.Module, blocks: torch.Tensor, module_names: Iterable[str], *, batch_size: int = 8,
                       damping: float = DEFAULT_DAMPING, device: str | torch.device | None = None,
                       progress: Callable[[int, int], None] | None = None) -> CalibrationStats:
    """Run `model` (eval mode, no gradients) over `blocks` ((N, T) token ids, or a list of 1-D tensors) in
    batches and return the input statistics of `module_names`.

    The forward runs where the model's parameters are; `device` places the accumulators (default: with
    the inputs). `progress(done_tokens, total_tokens)` is called after every batch. The result does not
    depend on `batch_size` beyond float64 rounding.
    """
    if batch_size < 1:
        raise ValueError(f"calibration: batch_size must be >= 1, got {batch_size}")
    sequences = [torch.as_tensor(b, dtype=torch.long) for b in blocks]
    if not sequences:
        raise ValueError("calibration: no token blocks to run; give calibration data with at least one block")
    target = next((p.device for p in model.parameters()), torch.device("cpu"))
    total = sum(s.numel() for s in sequences)
    was_training, done = model.training, 0
    model.eval()
    try:
        with StatisticsCollector(model, module_names, device) as collector:
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start:start + batch_size]
                if len({s.numel() for s in batch}) == 1:
                    _forward(model, torch.stack(batch).to(target))
                else:
                    for s in batch:
                        _forward(model, s[None].to(target))
                done += sum(s.numel() for s in batch)
                if progress is not None:
                    progress(done, total)
            missing = [n for n in dict.fromkeys(module_names) if n not in collector._of_module]
            if missing:
                raise ValueError(f"calibration: module(s) {', '.join(missing[:3])} never ran in the forward pass; "
                                 "target modules the model uses, or drop them from the recipe")
            return collector.stats(damping)
    finally:
        model.train(was_training)


def calibration_targets(model: nn.Module, recipe: Any) -> list[str]:
    """Names of the target modules that take calibration statistics: the rows of a CompressionPlan (or of
    the plan of a recipe) whose strategy declares it would use them (`Strategy.wants_statistics`), and
    the LM heads tied to such an embedding (their input second moment serves the embedding's init)."""
    from kroncompress.surgery import CompressionPlan, plan

    planned = recipe if isinstance(recipe, CompressionPlan) else plan(model, recipe)
    names = []
    for row in planned.rows:
        if not row.structural and row.strategy_impl.uses_calibration and row.strategy_impl.wants_statistics(row.plan.kind):
            names.append(row.name)
            names += [tie["name"] for tie in row.tied if tie["as"] == "head"]
    if planned.allocation is not None:  # a budget allocates over every module of its group, dense ones included
        names += planned.allocation["group"]
    return list(dict.fromkeys(names))


def calibrate(model: nn.Module, plan: Any, tokenizer, *, data: Any = None, tokens: int | None = None,
              block_size: int | None = None, damping: float | None = None, batch_size: int = 8,
              device: str | torch.device | None = None, progress: Callable[[int, int], None] | None = None,
              cache_dir=None) -> CalibrationStats:
    """Input statistics for the data-aware targets of `plan` (a CompressionPlan from `kc.plan`, or a
    recipe, which is planned here), from the recipe's `calibration` section.

    Arguments given here override the section (`data`: a spec as for distillation data, e.g.
    "shakespeare" or {"files": [...]}; `tokens`: how many tokens; `block_size`: tokens per forward
    sequence, clipped to the model's positions). Without a section or `data`, reads the offline default
    corpus. Raises ValueError when the text is shorter than one block.
    """
    from kroncompress.recipe import CalibrationConfig
    from kroncompress.surgery import CompressionPlan
    from kroncompress.surgery import plan as plan_model

    planned = plan if isinstance(plan, CompressionPlan) else plan_model(model, plan)
    section = (planned.source.calibration if planned.source is not None else None) or CalibrationConfig()
    damping = section.damping if damping is None else damping
    blocks = calibration_blocks(model, planned, tokenizer, data=data, tokens=tokens, block_size=block_size,
                                cache_dir=cache_dir)
    names = calibration_targets(model, planned)
    stats = collect_statistics(model, blocks, names, batch_size=batch_size, damping=damping, device=device,
                               progress=progress)
    budget = planned.source.budget if planned.source is not None else None
    if budget is not None and budget.sensitivity == "measured":
        from kroncompress.sensitivity import measure_sensitivity

        stats.sensitivity = measure_sensitivity(model, blocks, planned.allocation["group"], batch_size=1)
    return stats


def calibration_blocks(model: nn.Module, plan: Any, tokenizer, *, data: Any = None, tokens: int | None = None,
                       block_size: int | None = None, cache_dir=None) -> torch.Tensor:
    """The (N, T) token blocks of a calibration pass: the recipe's `calibration` section (of `plan`, a
    CompressionPlan), overridden by the arguments, as `calibrate` reads them."""
    from kroncompress.distill.data import pack_blocks, spec_bos, text_spec, token_stream
    from kroncompress.evaluate import max_positions
    from kroncompress.recipe import CalibrationConfig

    section = (plan.source.calibration if getattr(plan, "source", None) is not None else None) or CalibrationConfig()
    spec = data if data is not None else section.data
    tokens = int(tokens or section.tokens)
    block_size = int(block_size or section.block_size)
    limit = max_positions(model)
    if limit is not None:
        block_size = min(block_size, limit)
    s = text_spec(spec)
    ids = token_stream(s, tokenizer, s.split, max_tokens=tokens, cache_dir=cache_dir)[:tokens]
    blocks = pack_blocks(ids, block_size, spec_bos(s, tokenizer))
    if len(blocks) == 0:
        raise ValueError(f"calibration: {s.describe()} gave {ids.numel()} tokens, fewer than one block of {block_size}; "
                         "add text or lower calibration.block_size")
    return blocks


def calibrate_for_cli(model: nn.Module, plan: Any, tokenizer, *, data: str | None = None, tokens: int | None = None,
                      console=None) -> CalibrationStats | None:
    """What `kroncompress compress` runs: calibrate when the recipe has a `calibration` section or
    `--calibration-data` is given (None otherwise), with a rich progress bar on `console` (plain lines when
    it is not a terminal). `plan`: a
    CompressionPlan (or a recipe, planned here)."""
    from kroncompress.surgery import CompressionPlan
    from kroncompress.surgery import plan as plan_model

    plan = plan if isinstance(plan, CompressionPlan) else plan_model(model, plan)
    recipe = plan.source
    if recipe.calibration is None and data is None:
        if tokens is not None:
            raise ValueError("--calibration-tokens needs calibration data: add --calibration-data (e.g. shakespeare) "
                             "or a calibration section to the recipe")
        return None
    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer, but none was found next to the model; "
                         "save the tokenizer with the model or drop --calibration-data")
    if console is None:
        return calibrate(model, plan, tokenizer, data=data, tokens=tokens)
    if not console.is_terminal:  # a log file or CI: plain lines at a steady rhythm (kroncompress.progress)
        from kroncompress.progress import progress_callback

        return calibrate(model, plan, tokenizer, data=data, tokens=tokens,
                         progress=progress_callback("calibrating", unit="tokens", stream=console.file))
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=None)
        stats = calibrate(model, plan, tokenizer, data=data, tokens=tokens,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"[bold]calibration[/bold] {len(stats.inputs)} distinct inputs, "
                  f"{stats.memory_bytes / 2**20:.1f} MiB of statistics")
    return stats


def describe(stats: CalibrationStats) -> dict[str, Any]:
    """JSON-able summary: inputs, their modules and tokens, embeddings' distinct tokens seen, memory and damping."""
    return {"damping": stats.damping, "memory_bytes": stats.memory_bytes,
            "inputs": [{"modules": list(s.modules), "tokens": s.tokens, "size": int(s.sum_xxt.shape[0])} for s in stats.inputs],
            "embeddings": [{"modules": list(s.modules), "tokens": s.tokens, "vocab": int(s.counts.numel()),
                            "distinct": int((s.counts > 0).sum())} for s in stats.token_counts]}
