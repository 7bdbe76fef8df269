"""One parameter budget for many modules: each module's measured error-versus-parameters curve, weighted by its
measured sensitivity, allocated by `linalg.allocation`.

Curves, per module (W: out x in, C: the damped input second moment over the calibration tokens):
- dense: all m n parameters, no error;
- svd: rank k costs k (m + n) and leaves sum_{j > k} sigma_j^2 of W L (C = L L^T) as squared output error,
  the whole curve from one SVD (the whitened truncated SVD is optimal at every rank);
- kronecker: the shape search's best measured layout at each of a few ratios (terms and shapes its own).
Errors are absolute squared output errors summed over the calibration tokens, times the sensitivity s of
`kroncompress.sensitivity` (divided by the token count, so e predicts the mean loss increase up to 1/2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from kroncompress.linalg.allocation import Allocation, Candidate, allocate
from kroncompress.linalg.svd import lapack_threads
from kroncompress.linalg.whitening import cholesky_factor

KRONECKER_RATIOS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
STRUCTURES = ("svd", "kronecker")


@dataclass(frozen=True)
class Choice:
    """A candidate's label: the strategy ("dense" keeps the module) and its options, hashable."""

    strategy: str
    options: tuple = ()

    def as_options(self) -> dict:
        return dict(self.options)


def svd_curve(W: torch.Tensor, C: torch.Tensor | None) -> tuple[list[int], list[float]]:
    """(ranks, squared output errors) of the whitened truncated SVD at every rank that saves parameters
    (C None: squared weight errors of the plain truncated SVD)."""
    m, n = W.shape
    WL = W.to(torch.float64)
    if C is not None:
        WL = WL @ cholesky_factor(C.to(device=W.device, dtype=torch.float64))
    with lapack_threads(WL):
        S = torch.linalg.svdvals(WL)
    tail = torch.flip(torch.cumsum(torch.flip(S ** 2, [0]), 0), [0])  # tail[j] = sum_{i >= j} S_i^2
    ranks = [k for k in range(1, min(m, n) + 1) if k * (m + n) < m * n]
    return ranks, [float(tail[k]) if k < len(tail) else 0.0 for k in ranks]


def kronecker_curve(W: torch.Tensor, C: torch.Tensor | None, ratios: Iterable[float] = KRONECKER_RATIOS,
                    rank: int | str = "auto") -> list[tuple[dict, int, float]]:
    """(options, params, squared output error) of the shape search's best measured layout at each ratio
    (C None: the weight-only search, scored by the squared weight error of the nearest Kronecker sum)."""
    from kroncompress.linalg.als import KroneckerProblem
    from kroncompress.linalg.shapes import kronecker_shapes

    m, n = W.shape
    problem = KroneckerProblem(W, C) if C is not None else None
    total = problem.total if problem is not None else float(W.double().pow(2).sum())
    points = []
    for ratio in ratios:
        try:
            if problem is not None:
                found = kronecker_shapes(m, n, ratio=ratio, rank=rank, weight=W, stats=problem.C, problem=problem)
            else:  # a preview: one term per layout keeps the weight-only search quick
                found = kronecker_shapes(m, n, ratio=ratio, rank=1, weight=W)
        except ValueError:
            continue  # no layout of this matrix at this ratio
        best = found[0]
        options = {"a_shape": list(best.a_shape), "b_shape": list(best.b_shape), "rank": best.rank}
        points.append((options, best.params, max(1.0 - best.score, 0.0) * total))
    return points


def module_candidates(W: torch.Tensor, C: torch.Tensor | None, weight: float, structures: Iterable[str] = STRUCTURES,
                      kronecker_ratios: Iterable[float] = KRONECKER_RATIOS) -> list[Candidate]:
    """The candidates of one module (labels: `Choice`s), errors scaled by `weight` (sensitivity / tokens)."""
    structures = tuple(structures)
    unknown = sorted(set(structures) - set(STRUCTURES))
    if unknown:
        raise ValueError(f"budget: strategies {unknown} cannot be allocated; choose from {list(STRUCTURES)}")
    m, n = W.shape
    found = [Candidate(m * n, 0.0, Choice("dense"))]
    if "svd" in structures:
        ranks, errors = svd_curve(W, C)
        found += [Candidate(k * (m + n), weight * e, Choice("svd", (("rank", k),))) for k, e in zip(ranks, errors)]
    if "kronecker" in structures:
        for options, params, error in kronecker_curve(W, C, kronecker_ratios):
            frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())
            found.append(Candidate(params, weight * error, Choice("kronecker", frozen)))
    return found


def allocate_budget(weights: Mapping[str, torch.Tensor], moments: Mapping[str, torch.Tensor], budget: int, *,
                    sensitivity: Mapping[str, float] | None = None, tokens: int = 1,
                    structures: Iterable[str] = STRUCTURES, kronecker_ratios: Iterable[float] = KRONECKER_RATIOS
                    ) -> Allocation:
    """The allocation of `budget` weight parameters over `weights` (name -> W, out x in) with input moments
    `moments` (name -> damped C). `sensitivity`: name -> s (None: uniform, every s = 1)."""
    missing = [name for name in weights if name not in moments]
    if missing:
        raise ValueError(f"budget: no calibration statistics for {', '.join(missing[:3])}; the global budget "
                         "needs a calibration section or --calibration-data")
    curves = {}
    for name, W in weights.items():
        s = 1.0 if sensitivity is None else float(sensitivity[name])
        curves[name] = module_candidates(W, moments[name], s / max(tokens, 1), structures, kronecker_ratios)
    return allocate(curves, int(budget))


# -- a recipe's `budget` section -> explicit per-module rules ---------------------------------------------

SIZE_OPTIONS = {"svd": ("rank", "ratio"), "kronecker": ("ratio", "a_shape", "b_shape", "rank")}


def budget_group(model, recipe) -> list[tuple[str, object, object]]:
    """(name, module, rule) of the Linear / Conv1D modules whose first matching rule the budget covers."""
    from kroncompress.aliases import aliases_for
    from kroncompress.layers.base import dense_weight_of

    covered = set(recipe.budget.rules) if recipe.budget.rules is not None else {
        r.index for r in recipe.compress if r.strategy in SIZE_OPTIONS}
    aliases = aliases_for(model)
    group = []
    for name, module in model.named_modules():
        rule = recipe.rule_for(name, module, aliases) if name else None
        if rule is None or rule.index not in covered:
            continue
        try:
            dense_weight_of(module)
        except TypeError:
            continue  # an embedding or a block: its rule applies to it as written
        group.append((name, module, rule))
    if not group:
        raise ValueError(f"{recipe.source}: budget: its rules match no Linear or Conv1D module of this model; "
                         "point them at the attention and MLP matrices (e.g. role:attention, role:mlp)")
    return group


def _uniform_cost(candidates: list[Candidate], keep: float) -> float | None:
    """The cost of the largest svd candidate within `keep` of the dense size (one uniform ratio), if any."""
    dense = candidates[0].params
    fitting = [c for c in candidates if c.label.strategy == "svd" and c.params <= keep * dense]
    return max(fitting, key=lambda c: c.params).error if fitting else None


def allocate_recipe(model, recipe, calibration=None) -> tuple[dict[str, tuple[str, dict] | None], dict]:
    """({module: (strategy, options), or None where it stays dense}, allocation record) for `recipe.budget`.

    With calibration statistics the curves are output errors on them, weighted by the measured sensitivity
    when the statistics carry it (`sensitivity: measured`); without, they are weight errors (C = I), and on a
    meta model every module gets the uniform share: both are previews that compress re-plans with statistics.
    Options are the module's rule's, less its size options, plus the allocated ones.
    """
    budget = recipe.budget
    group = budget_group(model, recipe)
    weights = {name: _weight(module) for name, module, _ in group}
    dense = sum(W.shape[0] * W.shape[1] for W in weights.values())
    target = int(budget.params if budget.params is not None else budget.keep * dense)
    keep = target / dense
    if target >= dense:
        raise ValueError(f"{recipe.source}: budget: {target:,} parameters is no less than the {dense:,} the budgeted "
                         "modules have; lower budget.params or use keep")
    structures = tuple(budget.strategies or dict.fromkeys(rule.strategy for _, _, rule in group))
    meta = any(W.device.type == "meta" for W in weights.values())
    sens = getattr(calibration, "sensitivity", None) if budget.sensitivity == "measured" else None
    basis = ("weight shapes only (meta model): uniform preview" if meta else
             "weight error (no calibration statistics): preview" if calibration is None else
             "output error on calibration statistics")
    sensitivity = ("uniform" if budget.sensitivity == "uniform" else "measured" if sens is not None else
                   "uniform (the statistics carry no sensitivity)" if calibration is not None else "uniform (preview)")
    if meta:
        ranks = {name: _uniform_rank(W, keep) for name, W in weights.items()}
        choice = {name: Candidate(r * sum(weights[name].shape), 0.0, Choice("svd", (("rank", r),))) for name, r in ranks.items()}
        used, cost, uniform = sum(c.params for c in choice.values()), None, None
    else:
        curves, uniform = {}, 0.0
        for name, W in weights.items():
            C = calibration.matrix(name) if calibration is not None and name in calibration else None
            s = 1.0 if sens is None else float(sens[name])
            curves[name] = module_candidates(W.detach(), C, s, structures)
            u = _uniform_cost(curves[name], keep)
            uniform = None if u is None or uniform is None else uniform + u
        result = allocate(curves, target)
        choice, used, cost = result.choice, result.params, result.error
    picked_options: dict[str, tuple[str, dict] | None] = {}
    modules: dict[str, dict] = {}
    for name, module, rule in group:
        picked = choice[name]
        m, n = weights[name].shape
        modules[name] = {"choice": _describe(picked.label), "params": picked.params, "dense_params": m * n,
                         "kept": round(picked.params / (m * n), 4), "share": round(picked.params / max(used, 1), 4),
                         "cost": None if cost is None else picked.error,
                         "sensitivity": None if sens is None else float(sens[name]), "rule": rule.index}
        if picked.label.strategy == "dense":
            picked_options[name] = None
            continue
        inherited = rule.options if rule.strategy == picked.label.strategy else {}
        options = {k: v for k, v in inherited.items() if k not in SIZE_OPTIONS[picked.label.strategy]}
        options.update({k: list(v) if isinstance(v, tuple) else v for k, v in picked.label.options})
        picked_options[name] = (picked.label.strategy, options)
    record = {"budget": target, "dense_params": dense, "params": used, "keep": round(used / dense, 4),
              "strategies": list(structures), "basis": basis, "sensitivity": sensitivity,
              "predicted_cost": cost, "uniform_cost": uniform, "group": list(weights), "modules": modules}
    return picked_options, record


def _weight(module) -> torch.Tensor:
    from kroncompress.layers.base import dense_weight_of

    return dense_weight_of(module)[0]


def _uniform_rank(W: torch.Tensor, keep: float) -> int:
    m, n = W.shape
    return max(1, int(keep * m * n / (m + n)))


def _describe(choice: Choice) -> str:
    if choice.strategy == "dense":
        return "dense"
    options = dict(choice.options)
    if choice.strategy == "svd":
        return f"svd rank {options['rank']}"
    return f"kronecker {tuple(options['a_shape'])} x {tuple(options['b_shape'])}, {options['rank']} term(s)"
