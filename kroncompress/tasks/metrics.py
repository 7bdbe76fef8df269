"""GLUE's metrics, computed by scikit-learn and scipy: accuracy, F1, Matthews correlation, Pearson and
Spearman correlation.

    scores = compute_metrics(["f1", "accuracy"], predictions=[1, 0, 1], references=[1, 1, 1])
    scores   # {"f1": 0.8, "accuracy": 0.667, "score": 0.733}   score: the mean, as GLUE averages them

F1 is the positive class's F1 for two classes (GLUE's MRPC / QQP) and the macro average otherwise.
Correlations of a constant prediction are undefined (NaN in scipy); they count as 0 here, so a collapsed
model scores 0 rather than poisoning the average.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")
REGRESSION_METRICS = ("pearson", "spearman")


def compute_metrics(names: Sequence[str], predictions: Sequence, references: Sequence,
                    num_labels: int | None = None) -> dict[str, float]:
    """{metric: value} for each of `names`, plus "score", their mean.

    Classification metrics take class ids; correlations take floats (a regression's predictions).
    """
    from scipy import stats
    from sklearn import metrics as skm

    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape or predictions.ndim != 1:
        raise ValueError(f"metrics: predictions {predictions.shape} and references {references.shape} must be two "
                         "1-D sequences of the same length")
    if len(predictions) == 0:
        raise ValueError("metrics: no examples to score")
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            value = skm.accuracy_score(references, predictions)
        elif name == "f1":
            classes = num_labels or int(max(references.max(), predictions.max())) + 1
            average = "binary" if classes <= 2 else "macro"
            value = skm.f1_score(references, predictions, average=average, zero_division=0.0)
        elif name == "matthews":
            value = skm.matthews_corrcoef(references, predictions)
        elif name in REGRESSION_METRICS:
            if np.ptp(predictions) == 0 or np.ptp(references) == 0:
                value = 0.0  # correlation of a constant is undefined
            else:
                correlation = stats.pearsonr if name == "pearson" else stats.spearmanr
                value = correlation(predictions.astype(float), references.astype(float))[0]
        else:
            raise ValueError(f"metric {name!r} unknown; choose from {', '.join(METRICS)}")
        value = float(value)
        out[name] = 0.0 if math.isnan(value) else value
    out["score"] = float(np.mean([out[name] for name in names]))
    return out
