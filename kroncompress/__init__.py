"""kroncompress: compress pretrained transformers by matrix decomposition, then recover by distillation.

    import kroncompress as kc
    A, B = kc.nearest_kronecker(W, a_shape=(m1, n1), b_shape=(m2, n2))
"""

from kroncompress.layers import (
    CPLinear, FactorizedLinear, KroneckerEmbedding, KroneckerLinear, KroneckerTiedHead, LowRankLinear, TTLinear,
    TuckerLinear,
)
from kroncompress.linalg import kron_matmul, kron_sum, kronecker_shapes, nearest_kronecker, truncated_svd
from kroncompress.strategies import (
    LayerPlan, OptionError, Strategy, StrategyConfig, StructuralStrategy, get_strategy, list_strategies, register_strategy,
)
from kroncompress.recipe import (
    DistillConfig, EvaluateConfig, Override, Recipe, RecipeError, Rule, list_recipes, load_recipe, match_pattern,
)
from kroncompress.aliases import aliases_for
from kroncompress.surgery import CompressionPlan, CompressionReport, compress, plan
from kroncompress.calibration import CalibrationStats, calibrate, collect_statistics
from kroncompress.io import export_dense, load_compressed, save_compressed, to_dense
from kroncompress.evaluate import perplexity
# kc.distill stays the subpackage (a function of that name would break `import kroncompress.distill.data`):
# the engine is kc.distill.distill, the whole compress run kc.run_pipeline
from kroncompress import distill
from kroncompress.distill import DistillResult
from kroncompress.pipeline import run_pipeline
from kroncompress.models import load_model

__version__ = "0.1.0"

__all__ = [
    "FactorizedLinear", "KroneckerEmbedding", "KroneckerLinear", "KroneckerTiedHead", "LayerPlan",
    "LowRankLinear", "OptionError", "Strategy", "StrategyConfig", "StructuralStrategy", "get_strategy", "kron_matmul", "kron_sum",
    "kronecker_shapes", "list_strategies", "nearest_kronecker", "register_strategy", "truncated_svd",
    "DistillConfig", "EvaluateConfig", "Override", "Recipe", "RecipeError", "Rule", "list_recipes", "load_recipe",
    "match_pattern",
    "CompressionPlan", "CompressionReport", "aliases_for", "compress", "export_dense", "load_compressed", "plan",
    "save_compressed", "to_dense",
    "CPLinear", "TTLinear", "TuckerLinear",
    "perplexity",
    "distill", "DistillResult", "run_pipeline",
    "CalibrationStats", "calibrate", "collect_statistics",
    "load_model",
]
