"""Detection metrics in plain numpy, so the line (re-calibration) and the pipelines compute them one way.

Beside the ranking metrics: the operating points a quality engineer chooses a threshold from (the escape rate at
a few false-reject rates), an interval for any metric by resampling whole capture groups (photos of one part are
one piece of evidence, so resampling images would claim more certainty than the parts give), and the pooled figure
of a cross-validation whose folds each scored their own images with their own model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

#: The false-reject rates a line is usually run at: the operating points reported beside the threshold.
FALSE_REJECT_RATES = (0.005, 0.01, 0.02, 0.05)


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


@dataclass(frozen=True)
class OperatingPoint:
    """The lowest threshold that rejects at most ``target`` of the goods, and the defects it lets through."""

    target: float  # the false-reject rate asked for
    threshold: float
    false_reject_rate: float  # realised on these goods (at most ``target``)
    escape_rate: float  # share of the defects scored at or under the threshold (NaN without defects)
    n_good: int
    #: the goods are enough to tell the target from zero (at least one of them may be rejected); otherwise the
    #: threshold is simply the worst good and the point says nothing about ``target``
    resolved: bool

    @property
    def metric_name(self) -> str:
        """A metric key for run trackers, e.g. ``escape_at_frr_0.5pct``."""
        return f"escape_at_frr_{self.target * 100:g}pct"


def operating_point(labels: np.ndarray, scores: np.ndarray, false_reject_rate: float) -> OperatingPoint:
    """The operating point at ``false_reject_rate`` (label 1 = defective; a part is rejected when its score is
    strictly above the threshold, as on the line). Raises ValueError without goods."""
    y, s = _check(labels, scores)
    if not 0.0 <= false_reject_rate < 1.0:
        raise ValueError(f"false_reject_rate must be in [0, 1), got {false_reject_rate}")
    good = np.sort(s[~y])
    if not len(good):
        raise ValueError("an operating point needs good parts' scores")
    allowed = int(math.floor(false_reject_rate * len(good) + 1e-9))  # goods that may be rejected
    threshold = float(good[len(good) - 1 - allowed])
    bad = s[y]
    return OperatingPoint(
        target=float(false_reject_rate),
        threshold=threshold,
        false_reject_rate=float(np.mean(good > threshold)),
        escape_rate=float(np.mean(bad <= threshold)) if len(bad) else float("nan"),
        n_good=len(good),
        resolved=allowed >= 1,
    )


def operating_points(
    labels: np.ndarray, scores: np.ndarray, false_reject_rates: Sequence[float] = FALSE_REJECT_RATES
) -> list[OperatingPoint]:
    """:func:`operating_point` at each rate: the table a quality engineer chooses the line's threshold from."""
    return [operating_point(labels, scores, rate) for rate in false_reject_rates]


def fold_weighted(
    metric: Callable[[np.ndarray, np.ndarray], float], labels: np.ndarray, scores: np.ndarray, folds: np.ndarray
) -> float:
    """``metric(labels, scores)`` within each fold, averaged with each fold's defects as weights.

    Why: in a cross-validation every fold's model scores its own test images on its own scale, so no score of one
    fold may be ranked against another's. With the same goods in every fold, the weighted AUROC is the AUROC over all
    (defect, good) pairs scored by one model. Folds where the metric is NaN (no goods or no defects) are left out;
    NaN when every fold is."""
    y, s = _check(labels, scores)
    f = np.asarray(folds).ravel()
    if f.shape != y.shape:
        raise ValueError(f"folds and labels differ in length: {f.shape[0]} vs {y.shape[0]}")
    total = weight = 0.0
    for fold in np.unique(f):
        rows = f == fold
        value = metric(y[rows].astype(np.int64), s[rows])
        n_bad = float(y[rows].sum())
        if math.isfinite(value) and n_bad:
            total += n_bad * value
            weight += n_bad
    return total / weight if weight else float("nan")


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval: ``confidence`` of the resampled values lie between ``low`` and ``high``."""

    low: float
    high: float
    confidence: float = 0.95

    def __str__(self) -> str:
        return f"[{self.low:.3f}, {self.high:.3f}]"


def grouped_bootstrap(
    statistic: Callable[[np.ndarray], float],
    groups: Sequence[Hashable] | np.ndarray,
    *,
    strata: Sequence[Hashable] | np.ndarray | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of ``statistic`` over resamples of whole groups (seeded, so a rerun prints the same).

    ``statistic`` takes the row indices of one resample (a row repeats when its group is drawn twice), e.g.
    ``lambda rows: roc_auc(labels[rows], scores[rows])``. ``groups``: each row's capture group. ``strata``: groups
    are drawn within each stratum, as many as it has (pass the labels, so every resample keeps as many good and
    defective parts as the data); a group with rows in two strata is a separate unit in each. Resamples whose
    statistic is NaN are left out; the interval is NaN when more than half are.
    """
    g = np.asarray(groups, dtype=object).ravel()
    st = np.zeros(len(g), dtype=np.int64) if strata is None else np.asarray(strata, dtype=object).ravel()
    if st.shape != g.shape:
        raise ValueError(f"strata and groups differ in length: {st.shape[0]} vs {g.shape[0]}")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    units: dict[tuple[Hashable, Hashable], list[int]] = {}
    for row, key in enumerate(zip(st.tolist(), g.tolist())):
        units.setdefault(key, []).append(row)
    by_stratum: dict[Hashable, list[np.ndarray]] = {}
    for (stratum, _), rows in units.items():
        by_stratum.setdefault(stratum, []).append(np.asarray(rows, dtype=np.int64))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        drawn = [members[i] for members in by_stratum.values() for i in rng.integers(0, len(members), len(members))]
        value = statistic(np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64))
        if math.isfinite(value):
            values.append(value)
    if len(values) * 2 < resamples:
        return Interval(float("nan"), float("nan"), confidence)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(float(low), float(high), confidence)
