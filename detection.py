"""Detection metrics of anomaly maps: AUROC, AUPRC, the best Dice, and their bootstrap intervals.

NumPy only; the tests check them against direct threshold sweeps. ``anomaly`` re-exports every
name, so ``anomaly.roc_auc`` works as before.
"""

from __future__ import annotations

import numpy as np


def _ranked(scores, labels):
    """Scores high to low: ``(order, labels in that order, last index of each run of equal scores)``."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("detection metrics need both positive and negative labels")
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    return order, labels[order], np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]


def _sorted_counts(scores, labels):
    """True / false positives when predicting "positive" above each distinct score, high to low."""
    _, y, last = _ranked(scores, labels)
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp.astype(np.float64), fp.astype(np.float64), float(tp[-1]), float(fp[-1])


def _roc_area(tp, fp) -> float:
    """Area under the ROC curve from (possibly weighted) counts above each threshold, ties one half."""
    tpr, fpr = np.r_[0.0, tp / tp[-1]], np.r_[0.0, fp / fp[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _pr_area(tp, fp) -> float:
    """Step-sum area under the precision-recall curve from (possibly weighted) counts; where nothing
    lies above a threshold (``tp = fp = 0``, only with weights) recall does not move."""
    precision = tp / np.maximum(tp + fp, 1.0)
    return float(np.sum(np.diff(np.r_[0.0, tp / tp[-1]]) * precision))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (ties count one half): P(score of a positive > score of a negative)."""
    tp, fp, _, _ = _sorted_counts(scores, labels)
    return _roc_area(tp, fp)


def average_precision(scores, labels) -> float:
    """Area under the precision-recall curve as a step sum, ``sum_k (R_k - R_{k-1}) P_k`` (AUPRC)."""
    tp, fp, _, _ = _sorted_counts(scores, labels)
    return _pr_area(tp, fp)


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
    groups = np.asarray(groups).ravel().astype(np.int64)
    if np.size(scores) != np.size(labels) or np.size(scores) != groups.size:
        raise ValueError(f"bootstrap_detection: scores, labels and groups differ in size "
                         f"({np.size(scores)}, {np.size(labels)}, {groups.size})")
    if np.unique(groups).size < 2:
        raise ValueError("bootstrap_detection: all elements are in one group; an interval needs at least two "
                         "groups to draw from")
    order, y, last = _ranked(scores, labels)
    negative, g = ~y, groups[order]
    num_groups = int(groups.max()) + 1
    draws = np.random.default_rng(seed).integers(0, num_groups, (num, num_groups))
    out = {"auroc": np.full(num, np.nan), "auprc": np.full(num, np.nan)}
    w = np.empty(len(g))
    for b, drawn in enumerate(draws):
        np.take(np.bincount(drawn, minlength=num_groups).astype(np.float64), g, out=w)  # each element's multiplicity
        drawn_above = np.cumsum(w)[last]
        w[negative] = 0.0
        tp = np.cumsum(w)[last]
        fp = drawn_above - tp
        if tp[-1] == 0 or fp[-1] == 0:    # a draw without positives (or negatives) has no curve
            continue
        out["auroc"][b], out["auprc"][b] = _roc_area(tp, fp), _pr_area(tp, fp)
    return out


def interval(draws, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap draws (NaN draws, which had no curve, left out)."""
    draws = np.asarray(draws, np.float64)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        raise ValueError("interval: no bootstrap draw had both positive and negative labels")
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
