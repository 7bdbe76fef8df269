"""kroncompress: compress pretrained transformers by matrix decomposition, then recover by distillation.

    import kroncompress as kc
    A, B = kc.nearest_kronecker(W, a_shape=(m1, n1), b_shape=(m2, n2))

Every name below is imported on first use (PEP 562), so `import kroncompress` and `kroncompress --help`
load neither torch nor transformers; `kc.X`, `from kroncompress import X` and `dir(kc)` work as usual.
Importing it also makes transformers' `from_pretrained` load compressed folders (see kroncompress.hf).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module it lives in
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("CPLinear", "FactorizedLinear", "KroneckerEmbedding", "KroneckerLinear", "KroneckerTiedHead",
                     "LowRankLinear", "TTLinear", "TuckerLinear"), "kroncompress.layers"),
    **dict.fromkeys(("kron_matmul", "kron_sum", "kronecker_shapes", "nearest_kronecker", "truncated_svd"),
                    "kroncompress.linalg"),
    **dict.fromkeys(("CheckpointError", "DataError", "KroncompressError", "OptionError", "OutputError",
                     "OutputExistsError", "RecipeError"), "kroncompress.errors"),
    **dict.fromkeys(("LayerPlan", "Strategy", "StrategyConfig", "StructuralStrategy", "get_strategy",
                     "list_strategies", "register_strategy"), "kroncompress.strategies"),
    **dict.fromkeys(("DistillConfig", "EvaluateConfig", "Override", "Recipe", "Rule", "list_recipes",
                     "load_recipe", "match_pattern"), "kroncompress.recipe"),
    "aliases_for": "kroncompress.aliases",
    **dict.fromkeys(("CompressionPlan", "CompressionReport", "plan"), "kroncompress.surgery"),
    "compress": "kroncompress.hf",  # surgery's compress, then the model is marked as a kroncompress checkpoint
    **dict.fromkeys(("CalibrationStats", "calibrate", "collect_statistics"), "kroncompress.calibration"),
    **dict.fromkeys(("export_dense", "load_compressed", "save_compressed", "to_dense"), "kroncompress.io"),
    "perplexity": "kroncompress.evaluate",
    **dict.fromkeys(("QuantizationSummary", "quantize", "weight_bytes"), "kroncompress.quantization"),
    "DistillResult": "kroncompress.distill",
    "run_pipeline": "kroncompress.pipeline",
    "load_model": "kroncompress.models",
    "finetune": "kroncompress.tasks",
}
# kc.distill stays the subpackage (a function of that name would break `import kroncompress.distill.data`):
# the engine is kc.distill.distill, the whole compress run kc.run_pipeline. kc.lora (LoRA adapters) needs the
# optional peft, so it is not in __all__.
_SUBPACKAGES = ("distill", "lora")

__all__ = [
    "KroncompressError", "CheckpointError", "DataError", "OutputError", "OutputExistsError",
    "FactorizedLinear", "KroneckerEmbedding", "KroneckerLinear", "KroneckerTiedHead", "LayerPlan",
    "LowRankLinear", "OptionError", "Strategy", "StrategyConfig", "StructuralStrategy", "get_strategy", "kron_matmul", "kron_sum",
    "kronecker_shapes", "list_strategies", "nearest_kronecker", "register_strategy", "truncated_svd",
    "DistillConfig", "EvaluateConfig", "Override", "Recipe", "RecipeError", "Rule", "list_recipes", "load_recipe",
    "match_pattern",
    "CompressionPlan", "CompressionReport", "aliases_for", "compress", "export_dense", "load_compressed", "plan",
    "save_compressed", "to_dense",
    "CPLinear", "TTLinear", "TuckerLinear",
    "perplexity",
    "QuantizationSummary", "quantize", "weight_bytes",
    "distill", "DistillResult", "run_pipeline",
    "CalibrationStats", "calibrate", "collect_statistics",
    "load_model",
    "finetune",
]


_REGISTRY_MODULE = "transformers.quantizers.auto"  # where from_pretrained looks formats up


def _after_import(target: str, then: str) -> None:
    """Import our module `then` (which registers us with a library) at once if module `target` is loaded,
    else right after it is, through a one-shot import hook, so `import kroncompress` itself loads neither."""
    import sys

    if target in sys.modules:
        importlib.import_module(then)
        return

    from importlib.abc import MetaPathFinder
    from importlib.util import find_spec

    class _AfterImport(MetaPathFinder):
        busy = False

        def find_spec(self, fullname, path=None, target_=None):
            # a bare find_spec (e.g. transformers' is_peft_available) also lands here without importing:
            # the hook stays in place until the module is really executed
            if fullname != target or self.busy:
                return None
            self.busy = True
            try:
                spec = find_spec(fullname)
            finally:
                self.busy = False
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                try:
                    importlib.import_module(then)
                except Exception:  # noqa: BLE001  never break the library's import; kc.* paths register again
                    pass

            spec.loader.exec_module = exec_then_register
            return spec

    _AfterImport.target = target
    if not any(getattr(f, "target", None) == target and type(f).__name__ == "_AfterImport" for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


# `AutoModel*.from_pretrained(folder)` loads compressed folders after a bare `import kroncompress` (kroncompress.hf
# registers the format once transformers loads its quantizer registry: `from_pretrained` does, a tokenizer-only
# use of transformers does not pay for it); `import kroncompress.hf` registers explicitly.
_after_import(_REGISTRY_MODULE, "kroncompress.hf")
# stock `PeftModel.from_pretrained` loads adapters of compressed models (kroncompress.peft_compat) once peft loads
_after_import("peft", "kroncompress._peft_hook")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static tools (type checkers, IDEs, mkdocstrings) see; never run
    from kroncompress import distill
    from kroncompress.aliases import aliases_for
    from kroncompress.calibration import CalibrationStats, calibrate, collect_statistics
    from kroncompress.distill import DistillResult
    from kroncompress.errors import (
        CheckpointError, DataError, KroncompressError, OptionError, OutputError, OutputExistsError, RecipeError,
    )
    from kroncompress.evaluate import perplexity
    from kroncompress.io import export_dense, load_compressed, save_compressed, to_dense
    from kroncompress.layers import (
        CPLinear, FactorizedLinear, KroneckerEmbedding, KroneckerLinear, KroneckerTiedHead, LowRankLinear, TTLinear,
        TuckerLinear,
    )
    from kroncompress.linalg import kron_matmul, kron_sum, kronecker_shapes, nearest_kronecker, truncated_svd
    from kroncompress.models import load_model
    from kroncompress.pipeline import run_pipeline
    from kroncompress.quantization import QuantizationSummary, quantize, weight_bytes
    from kroncompress.recipe import (
        DistillConfig, EvaluateConfig, Override, Recipe, Rule, list_recipes, load_recipe, match_pattern,
    )
    from kroncompress.strategies import (
        LayerPlan, Strategy, StrategyConfig, StructuralStrategy, get_strategy, list_strategies, register_strategy,
    )
    from kroncompress.hf import compress
    from kroncompress.surgery import CompressionPlan, CompressionReport, plan
    from kroncompress.tasks import finetune
