"""The global budget allocation (linalg/allocation.py) against brute force on small random instances."""

from __future__ import annotations

import itertools
import random

import pytest

from kroncompress.linalg.allocation import Candidate, allocate, lower_hull


def _instance(seed, modules=4, per_module=4):
    rng = random.Random(seed)
    curves = {}
    for i in range(modules):
        dense = rng.randint(50, 200)
        points = [Candidate(dense, 0.0, "dense")]
        for k in range(per_module - 1):
            points.append(Candidate(rng.randint(1, dense - 1), rng.uniform(0.0, 10.0), ("svd", k)))
        curves[f"m{i}"] = points
    return curves


def _brute_force(curves, budget):
    best = float("inf")
    for combo in itertools.product(*curves.values()):
        if sum(c.params for c in combo) <= budget:
            best = min(best, sum(c.error for c in combo))
    return best


def test_lower_hull_keeps_only_convex_undominated_points():
    points = [Candidate(10, 5.0), Candidate(20, 4.5), Candidate(30, 1.0), Candidate(40, 1.5), Candidate(50, 0.0),
              Candidate(10, 6.0)]
    hull = lower_hull(points)
    # (20, 4.5) lies above the segment (10, 5) -> (30, 1); (40, 1.5) is dominated; (10, 6) loses to (10, 5)
    assert [(c.params, c.error) for c in hull] == [(10, 5.0), (30, 1.0), (50, 0.0)]


@pytest.mark.parametrize("seed", range(12))
def test_greedy_is_optimal_where_lagrangian_and_never_worse_after_fill(seed):
    curves = _instance(seed)
    smallest = sum(min(c.params for c in cs) for cs in curves.values())
    largest = sum(max(c.params for c in cs) for cs in curves.values())
    for budget in (smallest, (smallest + largest) // 2, largest - 7, largest):
        result = allocate(curves, budget)
        assert result.params <= budget
        assert result.params == sum(c.params for c in result.choice.values())
        assert result.error == pytest.approx(sum(c.error for c in result.choice.values()))
        # Everett: the Lagrangian stop is optimal for the parameters it used
        assert result.lagrangian_error == pytest.approx(_brute_force(curves, result.lagrangian_params))
        optimum = _brute_force(curves, budget)
        assert optimum - 1e-12 <= result.error <= result.lagrangian_error + 1e-12
        assert all(result.choice[name] in curves[name] for name in curves)


def test_full_budget_keeps_everything_dense():
    curves = _instance(99)
    result = allocate(curves, sum(max(c.params for c in cs) for cs in curves.values()))
    assert all(c.label == "dense" for c in result.choice.values()) and result.error == 0


def test_sensitivity_moves_parameters_to_the_sensitive_module():
    base = [Candidate(100, 0.0, "dense"), Candidate(50, 1.0, "half"), Candidate(10, 3.0, "small")]
    weighted = {"robust": base, "sensitive": [Candidate(c.params, 10 * c.error, c.label) for c in base]}
    result = allocate(weighted, 110)
    assert result.choice["sensitive"].label == "dense" and result.choice["robust"].label == "small"


@pytest.mark.parametrize("curves,budget,match", [
    ({}, 10, "no modules"),
    ({"a": []}, 10, "'a' has no candidates"),
    ({"a": [Candidate(20, 1.0)]}, 10, "below the smallest choice"),
    ({"a": [Candidate(5, float("nan"))]}, 10, "finite error"),
    ({"a": [Candidate(5, float("inf"))]}, 10, "finite error"),
])
def test_bad_input_is_refused(curves, budget, match):
    with pytest.raises(ValueError, match=match):
        allocate(curves, budget)

