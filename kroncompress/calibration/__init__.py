"""Calibration: one teacher pass over token blocks, accumulating each compressed layer's input statistics.

    stats = kc.calibrate(model, "kn-gpt2-mlp", tokenizer, data="shakespeare", tokens=16384)
    report = kc.compress(model, "kn-gpt2-mlp", calibration=stats)   # data-aware initialisation
    stats.save("gpt2.calibration.safetensors")                      # reused by later runs

`stats` holds the statistics and their file (`CalibrationStats`, `save_calibration`, `load_calibration`);
`collect` the pass (`collect_statistics`, `calibrate`, `calibration_blocks`, `calibration_targets`,
`memory_estimate`).
"""

from kroncompress.calibration.collect import (
    DEFAULT_BLOCK_SIZE, DEFAULT_TOKENS, StatisticsCollector, calibrate, calibrate_for_cli, calibration_blocks,
    calibration_targets, collect_statistics, describe, memory_estimate,
)
from kroncompress.calibration.stats import (
    CalibrationStats, InputStatistic, TokenCount, check_calibration_file, load_calibration, save_calibration,
)

__all__ = [
    "CalibrationStats", "InputStatistic", "StatisticsCollector", "TokenCount", "calibrate", "calibrate_for_cli",
    "calibration_blocks",
    "calibration_targets", "check_calibration_file", "collect_statistics", "describe", "load_calibration",
    "memory_estimate", "save_calibration", "DEFAULT_BLOCK_SIZE", "DEFAULT_TOKENS",
]
