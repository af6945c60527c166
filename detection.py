"""Detection metrics of anomaly maps: AUROC, AUPRC, the best Dice, and their bootstrap intervals.

NumPy only; the tests check them against direct threshold sweeps. ``anomaly`` re-exports every
name, so ``anomaly.roc_auc`` works as before.
"""

from __future__ import annotations

import numpy as np


def _sorted_counts(scores, labels):
    """True / false positives when predicting "positive" above each distinct score, high to low."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("detection metrics need both positive and negative labels")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp.astype(np.float64), fp.astype(np.float64), float(labels.sum()), float((~labels).sum())


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (ties count one half): P(score of a positive > score of a negative)."""
    tp, fp, p, n = _sorted_counts(scores, labels)
    tpr, fpr = np.r_[0.0, tp / p], np.r_[0.0, fp / n]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(scores, labels) -> float:
    """Area under the precision-recall curve as a step sum, ``sum_k (R_k - R_{k-1}) P_k`` (AUPRC)."""
    tp, fp, p, _ = _sorted_counts(scores, labels)
    recall, precision = tp / p, tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_dice(scores, labels) -> tuple[float, float]:
    """The highest Dice ``2 TP / (2 TP + FP + FN)`` over all thresholds, and the threshold giving it.

    Returns:
        ``(dice, threshold)``: predicting ``score >= threshold`` as positive scores ``dice``.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    tp, fp, p, _ = _sorted_counts(scores, labels)
    dice = 2 * tp / (p + tp + fp)
    k = int(np.argmax(dice))
    return float(dice[k]), float(np.sort(np.unique(scores))[::-1][k])


def detection_metrics(scores, labels) -> dict[str, float]:
    """``{"auroc", "auprc", "best_dice", "best_dice_threshold"}`` of scores against binary labels."""
    dice, thr = best_dice(scores, labels)
    return {"auroc": roc_auc(scores, labels), "auprc": average_precision(scores, labels),
            "best_dice": dice, "best_dice_threshold": thr}


def bootstrap_detection(scores, labels, groups, num: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """AUROC and AUPRC of ``scores`` against ``labels`` over ``num`` bootstrap draws of whole groups.

    A draw takes as many groups as there are, with replacement, and counts each element as often as
    its group was drawn, so what belongs together (a slice's pixels, a lesioned slice and its clean
    twin, a case) stays together. The draws depend only on ``seed`` and the number of groups: two maps
    scored with the same ``groups`` and ``seed`` see the same draws, so their differences are paired.

    Args:
        scores: float, any shape; labels: bool, the same shape; groups: int, the same shape, each
            element's group ``0..G-1``.
    Returns:
        ``{"auroc": (num,), "auprc": (num,)}`` float64; percentiles of them are the intervals.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    groups = np.asarray(groups).ravel().astype(np.int64)
    if scores.shape != labels.shape or scores.shape != groups.shape:
        raise ValueError(f"bootstrap_detection: scores, labels and groups differ in size "
                         f"({scores.size}, {labels.size}, {groups.size})")
    if labels.all() or not labels.any():
        raise ValueError("detection metrics need both positive and negative labels")
    num_groups = int(groups.max()) + 1
    order = np.argsort(-scores, kind="mergesort")
    s, negative, g = scores[order], ~labels[order], groups[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    draws = np.random.default_rng(seed).integers(0, num_groups, (num, num_groups))
    out = {"auroc": np.full(num, np.nan), "auprc": np.full(num, np.nan)}
    w = np.empty(len(s))
    for b, drawn in enumerate(draws):
        np.take(np.bincount(drawn, minlength=num_groups).astype(np.float64), g, out=w)  # each element's multiplicity
        drawn_above = np.cumsum(w)[last]
        w[negative] = 0.0
        tp = np.cumsum(w)[last]
        fp = drawn_above - tp
        p, n = tp[-1], fp[-1]
        if p == 0 or n == 0:    # a draw without positives (or negatives) has no curve
            continue
        tpr, fpr = np.r_[0.0, tp / p], np.r_[0.0, fp / n]
        out["auroc"][b] = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
        # as average_precision; where no drawn element lies above a threshold tp = fp = 0 and recall does not move
        out["auprc"][b] = np.sum(np.diff(np.r_[0.0, tp / p]) * tp / np.maximum(tp + fp, 1.0))
    return out


def interval(draws, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap draws (NaN draws, which had no curve, left out)."""
    draws = np.asarray(draws, np.float64)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        raise ValueError("interval: no bootstrap draw had both positive and negative labels")
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
