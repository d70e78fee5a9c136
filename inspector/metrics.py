"""Detection metrics in plain numpy, so the line (re-calibration) and the pipelines compute them one way."""

from __future__ import annotations

import numpy as np


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return y, s


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image AUROC (label 1 = anomalous); ties count one half. NaN when a class is missing."""
    y, s = _check(labels, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each true anomaly (step interpolation)."""
    y, s = _check(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y_sorted, s_sorted = y[order], s[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # evaluate only at the last index of each tied score group
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, fp = tp[last], fp[last]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_pos
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def rates_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """False-reject rate (good flagged), escape rate (defect passed), precision, recall and F1 at a threshold."""
    y, s = _check(labels, scores)
    flagged = s > threshold
    tp = int((flagged & y).sum())
    fp = int((flagged & ~y).sum())
    fn = int((~flagged & y).sum())
    n_good, n_bad = int((~y).sum()), int(y.sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / n_bad if n_bad else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
    return {
        "false_reject_rate": fp / n_good if n_good else float("nan"),
        "escape_rate": fn / n_bad if n_bad else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def pixel_auroc(maps: list[np.ndarray], masks: list[np.ndarray | None], *, max_pixels_per_image: int = 4096) -> float:
    """Pixel-level AUROC of anomaly maps against defect masks (None = a good image, no defect pixel).

    Each map/mask pair is subsampled on a regular grid to at most ``max_pixels_per_image`` pixels, so large images
    don't dominate and memory stays small; every image contributes its whole extent.
    """
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    labels, scores = [], []
    for amap, mask in zip(maps, masks):
        amap = np.asarray(amap, dtype=np.float64)
        truth = np.zeros(amap.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if truth.shape != amap.shape:
            raise ValueError(f"mask shape {truth.shape} differs from map shape {amap.shape}")
        step = max(1, int(np.ceil(np.sqrt(amap.size / max_pixels_per_image))))
        labels.append(truth[::step, ::step].ravel())
        scores.append(amap[::step, ::step].ravel())
    return roc_auc(np.concatenate(labels).astype(np.int64), np.concatenate(scores))
