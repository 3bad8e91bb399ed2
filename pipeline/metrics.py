"""Detection metrics on labelled rows (1 = anomaly), in NumPy so the library needs no scikit-learn."""

from __future__ import annotations

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance an anomaly outscores a normal row (ties count half).

    One sort and per-tie-group counts: about 17 bytes a row, so millions of scored rows fit.
    """
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores, hits = np.asarray(scores)[order], labels[order]
    del order
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    positives = np.add.reduceat(hits.astype(np.int64), starts)
    negatives = np.diff(np.r_[starts, len(hits)]) - positives
    negatives_below = np.cumsum(negatives) - negatives
    return float((positives * (negatives_below + 0.5 * negatives)).sum() / (n_pos * n_neg))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: precision averaged over the recall steps, highest scores first."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, hits = scores[order], labels[order]
    # Evaluate only at the last index of each group of tied scores, as a threshold would.
    last_of_group = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    true_pos = np.cumsum(hits)[last_of_group]
    predicted = (np.arange(len(scores)) + 1)[last_of_group]
    precision = true_pos / predicted
    recall_step = np.diff(np.r_[0, true_pos]) / n_pos
    return float((precision * recall_step).sum())
