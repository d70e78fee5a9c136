"""The statistics behind the quality figures: operating points, fold pooling and the grouped bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inspector.metrics import (
    FALSE_REJECT_RATES,
    fold_weighted,
    grouped_bootstrap,
    operating_point,
    operating_points,
    rates_at_threshold,
    roc_auc,
)


def test_operating_point_rejects_at_most_the_target_and_lets_through_what_scores_under() -> None:
    goods = np.arange(100, dtype=float)  # 0 … 99
    defects = np.array([50.0, 97.5, 98.5, 200.0])
    labels = np.r_[np.zeros(100), np.ones(4)]
    point = operating_point(labels, np.r_[goods, defects], 0.02)
    assert point.threshold == 97.0  # the two highest goods (98, 99) may be rejected
    assert point.false_reject_rate == pytest.approx(0.02)
    assert point.escape_rate == pytest.approx(0.25)  # only the 50 is let through
    assert point.resolved
    flagged = rates_at_threshold(labels, np.r_[goods, defects], point.threshold)
    assert flagged["false_reject_rate"] == pytest.approx(point.false_reject_rate)
    assert flagged["escape_rate"] == pytest.approx(point.escape_rate)


def test_operating_point_with_too_few_goods_is_the_worst_good_and_says_so() -> None:
    labels = np.r_[np.zeros(50), np.ones(2)]
    scores = np.r_[np.linspace(0, 1, 50), 0.5, 2.0]
    point = operating_point(labels, scores, 0.01)  # 1 % of 50 goods is half a part
    assert point.threshold == 1.0
    assert point.false_reject_rate == 0.0
    assert not point.resolved
    assert point.escape_rate == 0.5


def test_operating_point_ties_at_the_threshold_are_not_rejected() -> None:
    labels = np.r_[np.zeros(4), np.ones(1)]
    point = operating_point(labels, np.array([1.0, 2.0, 2.0, 3.0, 2.0]), 0.25)
    assert point.threshold == 2.0
    assert point.false_reject_rate == 0.25
    assert point.escape_rate == 1.0  # the defect ties the goods it cannot be told from


def test_operating_points_are_the_default_rates_in_order_and_named_for_trackers() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(400), np.ones(40)]
    scores = np.r_[rng.normal(0, 1, 400), rng.normal(2, 1, 40)]
    points = operating_points(labels, scores)
    assert [p.target for p in points] == list(FALSE_REJECT_RATES)
    assert [p.metric_name for p in points] == [
        "escape_at_frr_0.5pct",
        "escape_at_frr_1pct",
        "escape_at_frr_2pct",
        "escape_at_frr_5pct",
    ]
    escapes = [p.escape_rate for p in points]
    assert escapes == sorted(escapes, reverse=True)  # a stricter false-reject rate lets more defects through


def test_operating_point_refuses_no_goods_and_bad_rates() -> None:
    with pytest.raises(ValueError, match="good parts"):
        operating_point(np.ones(3), np.arange(3.0), 0.01)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        operating_point(np.r_[0, 1], np.arange(2.0), 1.0)


def test_fold_weighted_auroc_is_the_auroc_over_pairs_scored_by_one_model() -> None:
    rng = np.random.default_rng(1)
    goods = rng.normal(0, 1, 30)
    labels, scores, folds = [], [], []
    pairs = concordant = 0.0
    for fold, (n_bad, shift) in enumerate(((5, 1.0), (9, 3.0), (2, -2.0))):
        fold_goods = goods + shift  # each fold's model puts the same goods on its own scale
        bad = rng.normal(1.5, 1, n_bad) + shift
        labels += [0] * 30 + [1] * n_bad
        scores += list(fold_goods) + list(bad)
        folds += [fold] * (30 + n_bad)
        concordant += sum((b > g) + 0.5 * (b == g) for b in bad for g in fold_goods)
        pairs += n_bad * 30
    y, s, f = np.array(labels), np.array(scores), np.array(folds)
    assert fold_weighted(roc_auc, y, s, f) == pytest.approx(concordant / pairs)
    assert abs(fold_weighted(roc_auc, y, s, f) - roc_auc(y, s)) > 0.01  # pooling the raw scores would mix scales


def test_fold_weighted_leaves_out_folds_without_defects_and_is_nan_without_any() -> None:
    y = np.array([0, 0, 1, 0, 0])
    s = np.array([0.1, 0.2, 0.9, 5.0, 6.0])
    f = np.array([0, 0, 0, 1, 1])
    assert fold_weighted(roc_auc, y, s, f) == 1.0
    assert math.isnan(fold_weighted(roc_auc, np.zeros(4), np.arange(4.0), np.array([0, 0, 1, 1])))
    with pytest.raises(ValueError, match="folds and labels"):
        fold_weighted(roc_auc, y, s, f[:3])


def test_grouped_bootstrap_is_seeded_and_brackets_a_clear_difference() -> None:
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(60), np.ones(30)]
    scores = np.r_[rng.normal(0, 1, 60), rng.normal(1.5, 1, 30)]
    groups = np.arange(90)

    def auroc(rows: np.ndarray) -> float:
        return roc_auc(labels[rows], scores[rows])

    first = grouped_bootstrap(auroc, groups, strata=labels, resamples=300, seed=3)
    assert first == grouped_bootstrap(auroc, groups, strata=labels, resamples=300, seed=3)
    assert first != grouped_bootstrap(auroc, groups, strata=labels, resamples=300, seed=4)
    assert 0.5 < first.low < roc_auc(labels, scores) < first.high <= 1.0
    assert str(first) == f"[{first.low:.3f}, {first.high:.3f}]"


def test_photos_of_one_part_widen_the_interval_as_one_piece_of_evidence() -> None:
    """Ten photos of each of 12 parts: resampling photos claims the certainty of 120 parts, resampling parts does
    not."""
    rng = np.random.default_rng(5)
    part_scores = np.r_[rng.normal(0, 1, 6), rng.normal(1, 1, 6)]
    part_labels = np.r_[np.zeros(6), np.ones(6)]
    scores = np.repeat(part_scores, 10) + rng.normal(0, 0.05, 120)
    labels = np.repeat(part_labels, 10)

    def auroc(rows: np.ndarray) -> float:
        return roc_auc(labels[rows], scores[rows])

    by_part = grouped_bootstrap(auroc, np.repeat(np.arange(12), 10), strata=labels, resamples=400)
    by_photo = grouped_bootstrap(auroc, np.arange(120), strata=labels, resamples=400)
    assert (by_part.high - by_part.low) > 1.5 * (by_photo.high - by_photo.low)


def test_strata_keep_each_class_as_many_groups_as_it_has() -> None:
    labels = np.r_[np.zeros(8), np.ones(3)]
    seen: set[int] = set()

    def defects(rows: np.ndarray) -> float:
        seen.add(int(labels[rows].sum()))
        return float(len(rows))

    interval = grouped_bootstrap(defects, np.arange(11), strata=labels, resamples=50)
    assert seen == {3}
    assert interval.low == interval.high == 11.0


def test_grouped_bootstrap_is_nan_when_most_resamples_are() -> None:
    def undefined_with_the_first_part(rows: np.ndarray) -> float:  # drawn in 1 - (5/6)**6 = 67 % of resamples
        return float("nan") if 0 in rows else 1.0

    interval = grouped_bootstrap(undefined_with_the_first_part, np.arange(6), resamples=200)
    assert math.isnan(interval.low)
    assert math.isnan(interval.high)
    with pytest.raises(ValueError, match="strata and groups"):
        grouped_bootstrap(undefined_with_the_first_part, np.arange(6), strata=np.zeros(4))
