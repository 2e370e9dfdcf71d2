"""GLUE metrics, computed locally with scikit-learn and scipy (nothing is fetched from a hub).

Each task lists the metric names it reports (`cpkernels.train.data.GLUE_TASKS`); its *score* is the
mean of those metrics over all of its evaluation splits (MNLI: matched and mismatched accuracy),
and the GLUE average is the mean of the task scores, as on the GLUE leaderboard.

Token-tagging tasks (WNUT-16 NER) are scored by `entity_f1` on BIO tags instead: it takes sequences
of tags, not one label per row, so it is not one of `METRICS`.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["METRICS", "compute_metrics", "task_score", "glue_average", "entity_spans", "entity_f1"]

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


def entity_spans(tags) -> list[tuple[str, int, int]]:
    """The entities of one BIO tag sequence as (type, start, end) with `end` exclusive, in order.

    seqeval's default (non-strict, IOB2) reading, the one CoNLL's conlleval and most NER papers use:
    an entity starts at ``B-X``, and also at an ``I-X`` that follows ``O`` or a tag of another type (a
    tagger that forgets the B- still finds the entity); it goes on over the ``I-X`` after it and ends
    before the next ``O``, ``B-*`` or tag of another type. So ``B-X B-X`` is two entities, and
    ``B-X I-Y`` is two entities of different types. Any tag other than O, B-type, I-type is a ValueError.
    """
    spans, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentinel O closes an entity at the end
        if tag != "O" and (tag[:2] not in ("B-", "I-") or len(tag) == 2):
            raise ValueError(f"tag {tag!r} at position {i} is not O, B-type or I-type")
        new_kind = None if tag == "O" else tag[2:]
        continues = tag.startswith("I-") and new_kind == kind
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if new_kind is not None and not continues:
            start, kind = i, new_kind
    return spans


def entity_f1(preds, labels) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 of predicted BIO tag sequences against the true ones.

    An entity counts as found only when its type, start and end all match a true entity (`entity_spans`;
    seqeval's default mode, whose ``f1_score`` it reproduces). Sequences are scored one by one, so no
    entity spans two sentences. Where a ratio is 0/0 (no predicted or no true entities) it is 0, as
    seqeval and scikit-learn report with ``zero_division=0``.
    """
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"preds and labels must hold the same number of sequences, got {len(preds)} and {len(labels)}")
    found = n_pred = n_true = 0
    for k, (p, t) in enumerate(zip(preds, labels)):
        if len(p) != len(t):
            raise ValueError(f"sequence {k}: {len(p)} predicted tags for {len(t)} tokens")
        p, t = set(entity_spans(p)), set(entity_spans(t))
        found, n_pred, n_true = found + len(p & t), n_pred + len(p), n_true + len(t)
    precision = found / n_pred if n_pred else 0.0
    recall = found / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
