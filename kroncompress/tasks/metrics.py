"""GLUE's metrics: accuracy, F1, Matthews correlation, Pearson and Spearman correlation, computed with numpy
from their definitions (scikit-learn's and scipy's conventions; the tests check them against both).

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


def _f1(predictions: np.ndarray, references: np.ndarray, label) -> float:
    """F1 of one class: 2 tp / (2 tp + fp + fn), 0 when the class is neither predicted nor present."""
    tp = int(np.sum((predictions == label) & (references == label)))
    wrong = int(np.sum((predictions == label) != (references == label)))  # fp + fn
    return 2 * tp / (2 * tp + wrong) if tp or wrong else 0.0


def _matthews(predictions: np.ndarray, references: np.ndarray) -> float:
    """Matthews correlation of any number of classes (Gorodkin's R_K, scikit-learn's matthews_corrcoef);
    0 when it is undefined (one class only, predicted or true)."""
    labels, index = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    truth, guess = index[: len(references)], index[len(references):]
    confusion = np.zeros((len(labels), len(labels)), dtype=np.float64)
    np.add.at(confusion, (truth, guess), 1.0)
    true_sum, pred_sum, n = confusion.sum(axis=1), confusion.sum(axis=0), confusion.sum()
    covariance = np.trace(confusion) * n - true_sum @ pred_sum
    spread = (n * n - pred_sum @ pred_sum) * (n * n - true_sum @ true_sum)
    return float(covariance / math.sqrt(spread)) if spread else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (scipy.stats.rankdata's default)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(np.clip((x @ y) / denominator, -1.0, 1.0)) if denominator else 0.0


def compute_metrics(names: Sequence[str], predictions: Sequence, references: Sequence,
                    num_labels: int | None = None) -> dict[str, float]:
    """{metric: value} for each of `names`, plus "score", their mean.

    Classification metrics take class ids; correlations take floats (a regression's predictions).
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape or predictions.ndim != 1:
        raise ValueError(f"metrics: predictions {predictions.shape} and references {references.shape} must be two "
                         "1-D sequences of the same length")
    if len(predictions) == 0:
        raise ValueError("metrics: no examples to score")
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            value = float(np.mean(predictions == references))
        elif name == "f1":
            classes = num_labels or int(max(references.max(), predictions.max())) + 1
            if classes <= 2:  # the positive class's F1 (MRPC, QQP)
                value = _f1(predictions, references, 1)
            else:  # macro: the mean over the classes that occur, true or predicted
                value = float(np.mean([_f1(predictions, references, label)
                                       for label in np.unique(np.concatenate([references, predictions]))]))
        elif name == "matthews":
            value = _matthews(predictions, references)
        elif name in REGRESSION_METRICS:
            x, y = predictions.astype(np.float64), references.astype(np.float64)
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                value = 0.0  # correlation of a constant is undefined
            else:
                value = _pearson(x, y) if name == "pearson" else _pearson(_ranks(x), _ranks(y))
        else:
            raise ValueError(f"metric {name!r} unknown; choose from {', '.join(METRICS)}")
        value = float(value)
        out[name] = 0.0 if math.isnan(value) else value
    out["score"] = float(np.mean([out[name] for name in names]))
    return out
