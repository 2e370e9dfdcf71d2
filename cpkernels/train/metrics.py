"""GLUE metrics, computed locally with scikit-learn and scipy (nothing is fetched from a hub).

Each task lists the metric names it reports (`cpkernels.train.data.GLUE_TASKS`); its *score* is the
mean of those metrics over all of its evaluation splits (MNLI: matched and mismatched accuracy),
and the GLUE average is the mean of the task scores, as on the GLUE leaderboard.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["METRICS", "compute_metrics", "task_score", "glue_average"]

#: Metric names a task may ask for, and whether they score class predictions or real values.
METRICS = {
    "accuracy": "classification",
    "f1": "classification",     # binary F1 of the positive class (label 1), as GLUE reports it
    "mcc": "classification",    # Matthews correlation (CoLA)
    "macro_f1": "classification",  # unweighted mean of the per-class F1 (imbalanced multi-class tasks)
    "pearson": "regression",
    "spearman": "regression",
}


def _metric(name: str, preds: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if name == "accuracy":
        return float(accuracy_score(labels, preds))
    if name == "f1":
        return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0))
    if name == "macro_f1":
        return float(f1_score(labels, preds, average="macro", zero_division=0.0))
    if name == "mcc":
        return float(matthews_corrcoef(labels, preds))
    from scipy.stats import pearsonr, spearmanr

    # A constant prediction has no correlation; scipy warns and returns NaN. Report 0 instead, the
    # value of an uninformative predictor, so that averages stay finite.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = pearsonr(preds, labels)[0] if name == "pearson" else spearmanr(preds, labels)[0]
    return 0.0 if math.isnan(value) else float(value)


def compute_metrics(names, preds, labels) -> dict[str, float]:
    """``{name: value}`` for each metric name in `names`, on 1-D predictions and labels.

    Classification metrics take class indices; regression metrics take real values.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.ndim != 1:
        raise ValueError(f"preds and labels must be 1-D arrays of one length, got shapes {preds.shape} and "
                         f"{labels.shape}")
    if preds.size == 0:
        raise ValueError("cannot compute metrics on an empty evaluation split")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
    return {n: _metric(n, preds, labels) for n in names}


def task_score(metrics: dict[str, float]) -> float:
    """One number per task: the mean of its metrics (e.g. MRPC (F1 + accuracy) / 2)."""
    return float(np.mean(list(metrics.values())))


def glue_average(scores: dict[str, float]) -> float:
    """Mean of the per-task scores (the tasks that were run; GLUE proper has nine)."""
    return float(np.mean(list(scores.values())))
