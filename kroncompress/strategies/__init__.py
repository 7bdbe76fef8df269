"""Decomposition strategies. Importing this package registers the built-ins."""

from kroncompress.strategies.base import (
    BaseStrategy, LayerPlan, OptionError, PlannedFit, Strategy, StrategyConfig, StructuralStrategy,
)
from kroncompress.strategies.registry import get_strategy, list_strategies, register_strategy
from kroncompress.strategies import kronecker, svd  # noqa: F401  (registration side effects)
from kroncompress.strategies import layerdrop  # noqa: F401  (registration side effects)
from kroncompress.strategies import cp, tt, tucker  # noqa: F401  (registration side effects)

__all__ = ["BaseStrategy", "LayerPlan", "OptionError", "PlannedFit", "Strategy", "StrategyConfig", "StructuralStrategy", "get_strategy", "list_strategies", "register_strategy"]
