"""Threshold rules against hand-computed examples (verdict: flagged when score > threshold)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inspector.calibration import (
    CalibrationError,
    best_f1_threshold,
    binomial_cdf,
    calibrate,
    frr_constrained_threshold,
    frr_upper_bound,
    good_quantile_threshold,
)

GOODS = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])  # 0.1 … 1.0, shuffled


def test_good_quantile_hand_computed() -> None:
    # n = 10, target 0.25 → floor(2.5) = 2 goods may be flagged; sorted s[10 - 1 - 2] = s[7] = 0.8.
    # Flagged: 0.9 and 1.0 → FRR 2/10; 0.7 would flag 3.
    assert good_quantile_threshold(GOODS, 0.25) == 0.8
    # target 0.2 → floor(0.2 · 10) = 2 exactly (not 1 from 1.999…) → 0.8 too
    assert good_quantile_threshold(GOODS, 0.2) == 0.8
    # target 0.19 → floor(1.9) = 1 → s[8] = 0.9;  target 0 → max = 1.0
    assert good_quantile_threshold(GOODS, 0.19) == 0.9
    assert good_quantile_threshold(GOODS, 0.0) == 1.0
    rng = np.random.default_rng(0)
    for target in (0.0, 0.01, 0.05, 0.1, 0.33):
        s = rng.normal(size=137)
        t = good_quantile_threshold(s, target)
        assert t == np.quantile(s, 1 - target, method="inverted_cdf")
        allowed = math.floor(target * 137)
        assert np.sum(s > t) <= allowed < np.sum(s >= t)  # any threshold below t flags allowed + 1


def test_good_quantile_with_ties() -> None:
    # sorted [0.1, 0.5, 0.5, 0.5, 0.9], target 0.4 → floor(2.0) = 2 → s[5 - 1 - 2] = s[2] = 0.5;
    # flagged: only 0.9 (the tied 0.5s are not > 0.5) → FRR 1/5 ≤ 0.4
    t = calibrate([0.5, 0.9, 0.1, 0.5, 0.5], rule="good_quantile", target_frr=0.4, promise="point")
    assert t.value == 0.5 and t.details["good_rejects"] == 1 and t.details["false_reject_rate"] == 0.2
    # all equal: nothing can be flagged without flagging all → threshold is that score, FRR 0
    assert calibrate([0.3] * 10, target_frr=0.1, promise="point").value == 0.3


def test_target_frr_maximises_recall_and_reports_it() -> None:
    defects = [0.75, 0.85, 0.95, 1.5]
    # goods allow t = 0.8 (as above); defects > 0.8: 0.85, 0.95, 1.5 → recall 3/4, escape 1/4.
    # Any lower threshold breaks the FRR target; any higher one cannot raise recall.
    value, report = frr_constrained_threshold(GOODS, defects, 0.25)
    assert value == 0.8 and report["recall"] == 0.75 and report["escape_rate"] == 0.25
    # weakest detected defect 0.85; highest score below it 0.8 → no room to rise without losing it
    assert report["recall_plateau_upper"] == 0.8
    # defects [0.95, 1.5]: the threshold could rise to 0.9 (highest score < 0.95) keeping recall 1
    assert frr_constrained_threshold(GOODS, [0.95, 1.5], 0.25)[1]["recall_plateau_upper"] == 0.9

    t = calibrate(GOODS, defects, target_frr=0.25, promise="point")  # auto → target_frr
    d = t.details
    assert t.rule == "target_frr" and t.value == 0.8
    assert (d["n_good"], d["n_defect"], d["target_false_reject_rate"]) == (10, 4, 0.25)
    assert d["false_reject_rate"] == 0.2 and d["recall"] == 0.75 and d["good_rejects"] == 2
    # precision 3 / (3 + 2) = 0.6; F1 = 2·3 / (2·3 + 2 + 1) = 6/9
    assert d["precision"] == pytest.approx(0.6) and d["f1"] == pytest.approx(6 / 9)
    assert d["frr_upper_95"] == pytest.approx(frr_upper_bound(2, 10))


def test_best_f1_hand_computed() -> None:
    goods, defects = [0.1, 0.2, 0.3, 0.4], [0.35, 0.5]
    # F1 = 2tp / (2tp + fp + fn) per candidate t:
    #   t < 0.1: tp 2 fp 4 → 4/8 = 0.5     t = 0.1: tp 2 fp 3 → 4/7     t = 0.2: tp 2 fp 2 → 4/6
    #   t = 0.3: tp 2 fp 1 → 4/5 = 0.8     t = 0.35: tp 1 fp 1 fn 1 → 2/4   t = 0.4: tp 1 fn 1 → 2/3   t = 0.5: 0
    value, report = best_f1_threshold(goods, defects)
    assert (
        value == 0.3
        and report["f1"] == pytest.approx(0.8)
        and report["recall"] == 1.0
        and report["false_reject_rate"] == 0.25
    )
    t = calibrate(goods, defects, rule="best_f1", target_frr=0.01)
    assert t.rule == "best_f1" and t.value == 0.3 and t.details["target_false_reject_rate"] is None
    # F1 tie: goods [1, 3, 4], defects [2, 5]. t = 1: tp 2 fp 2 → 4/6; t = 4: tp 1 fn 1 → 2/3. Tie → lowest, 1.
    assert best_f1_threshold([1, 3, 4], [2, 5])[0] == 1.0
    # a good and a defect tied at 2: both flagged or neither. t = 1: tp 2 fp 1 → 4/5 (best); t = 2: tp 1 fn 1 → 2/3
    assert best_f1_threshold([1, 2], [2, 3])[0] == 1.0
    # perfectly separable: every defect above every good → threshold = max good, F1 = 1
    assert best_f1_threshold([0.1, 0.2], [0.3, 0.4]) == (
        0.2,
        pytest.approx(
            {
                "good_rejects": 0,
                "false_reject_rate": 0.0,
                "defects_detected": 2,
                "recall": 1.0,
                "escape_rate": 0.0,
                "precision": 1.0,
                "f1": 1.0,
            }
        ),
    )
    # every defect below every good: flag everything is the best F1 (2·2 / (4 + 2) = 2/3), just below the lowest score
    value, report = best_f1_threshold([0.5, 0.6], [0.1, 0.2])
    assert value < 0.1 and report["recall"] == 1.0 and report["f1"] == pytest.approx(2 / 3)


def test_frr_upper_bound_known_values() -> None:
    # 0 rejects in n: (1 − p)^n = 0.05 → p = 1 − 0.05^(1/100) = 0.029513…  (the "rule of three": ≈ 3/n)
    assert frr_upper_bound(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert frr_upper_bound(0, 100) == pytest.approx(0.0295, abs=1e-4)
    # 1 of 100 → Beta(2, 99) 95 % quantile = 0.04656 (scipy.stats.beta.ppf(0.95, 2, 99))
    assert frr_upper_bound(1, 100) == pytest.approx(0.04656, abs=1e-5)
    # the bound is where P(X ≤ k; n, p) = 0.05
    for k, n in [(5, 100), (3, 10), (40, 2000)]:
        ub = frr_upper_bound(k, n)
        assert k / n < ub < 1 and binomial_cdf(k, n, ub) == pytest.approx(0.05, abs=1e-8)
    assert frr_upper_bound(10, 10) == 1.0
    assert frr_upper_bound(0, 1) == pytest.approx(0.95)
    # binomial CDF sanity: n = 2, p = 0.5 → P(X ≤ 1) = 3/4
    assert binomial_cdf(1, 2, 0.5) == pytest.approx(0.75)
    with pytest.raises(CalibrationError):
        frr_upper_bound(3, 2)


def test_edge_cases() -> None:
    # no defects: auto is the good quantile; the defect rules refuse
    t = calibrate(GOODS, None, target_frr=0.25, promise="point")
    assert t.rule == "good_quantile" and t.value == 0.8 and t.details["n_defect"] == 0 and "recall" not in t.details
    assert t.details["frr_upper_95"] == pytest.approx(frr_upper_bound(2, 10))
    assert calibrate(GOODS, [], target_frr=0.25).rule == "good_quantile"
    for rule in ("target_frr", "best_f1"):
        with pytest.raises(CalibrationError, match="needs defect scores"):
            calibrate(GOODS, None, rule=rule)
    # one good: it is the threshold; 0 rejects of 1 only bounds the FRR below 0.95
    t = calibrate([0.42])
    assert t.value == 0.42 and t.details["frr_upper_95"] == pytest.approx(0.95)
    with pytest.raises(CalibrationError, match="at least one good"):
        calibrate([])
    with pytest.raises(CalibrationError, match="NaN"):
        calibrate([0.1, float("nan")])
    with pytest.raises(CalibrationError, match="NaN"):
        calibrate([0.1, 0.2], [float("inf")])
    with pytest.raises(CalibrationError, match=r"\[0, 1\)"):
        calibrate([0.1, 0.2], target_frr=1.0)
    with pytest.raises(CalibrationError, match="unknown calibration rule"):
        calibrate([0.1], rule="median")
    # 2-d score arrays are flattened
    assert calibrate(GOODS.reshape(2, 5), target_frr=0.25, promise="point").value == 0.8
    with pytest.raises(CalibrationError, match="unknown promise"):
        calibrate([0.1], promise="maybe")


def test_the_front_end_names_a_calibration_set_too_small_for_its_target() -> None:
    from inspector.calibration import goods_to_resolve, shortfall

    assert goods_to_resolve(0.01) == 299  # (1 - 0.01)^299 <= 0.05 < (1 - 0.01)^298
    assert 0.99**299 <= 0.05 < 0.99**298
    assert goods_to_resolve(0.05) == 59 and goods_to_resolve(0.0) is None
    few = calibrate(np.linspace(0.0, 1.0, 50), target_frr=0.01)
    assert few.details["goods_to_resolve_target"] == 299 and few.details["resolves_target"] is False
    note = shortfall(few.details)
    assert note is not None and note.startswith("50 calibration goods are too few to resolve a 1.0% false-reject")
    assert note.endswith("299 goods would resolve it")
    enough = calibrate(np.linspace(0.0, 1.0, 300), target_frr=0.01)
    assert enough.details["resolves_target"] is True and shortfall(enough.details) is None
    assert "resolves_target" not in calibrate(np.r_[0.1, 0.2], np.r_[0.9], rule="best_f1").details


def _exceedance_of_normal(threshold: float) -> float:
    """P(Z > threshold) for a standard normal: the false-reject rate a threshold gives on new goods."""
    return 0.5 * math.erfc(threshold / math.sqrt(2.0))


def test_each_promise_allows_its_number_of_rejects() -> None:
    from inspector.calibration import promised_rejects

    # point: floor(0.25 · 10) = 2; expected: floor(0.25 · 11) − 1 = 1 (a new good exceeds s[8] with 2/11 ≤ 0.25)
    assert promised_rejects(10, 0.25, "point") == 2 and promised_rejects(10, 0.25, "expected") == 1
    assert calibrate(GOODS, target_frr=0.25).value == 0.9  # "expected" is the default
    # expected at 1 %: 99 goods resolve it (k = 0, the highest good), 98 do not
    assert promised_rejects(99, 0.01, "expected") == 0 and promised_rejects(98, 0.01, "expected") is None
    # bound: the largest k whose Clopper-Pearson bound is within the target
    for n, target in [(300, 0.01), (1000, 0.01), (2000, 0.05)]:
        k = promised_rejects(n, target, "bound")
        assert k is not None and frr_upper_bound(k, n) <= target < frr_upper_bound(k + 1, n)
    assert promised_rejects(298, 0.01, "bound") is None  # goods_to_resolve(0.01) = 299
    assert promised_rejects(50, 0.0, "expected") == 0  # a zero target: the highest good, whatever the promise


def test_expected_keeps_the_target_on_new_goods_where_point_does_not() -> None:
    # 1000 calibration sets of 150 normal goods, target 2 %: the rate a new good is flagged, exactly, per set
    rng = np.random.default_rng(7)
    sets = rng.normal(size=(1000, 150))
    rate = {
        promise: np.mean([_exceedance_of_normal(calibrate(s, target_frr=0.02, promise=promise).value) for s in sets])
        for promise in ("point", "expected")
    }
    # point flags floor(3.0) = 3 → (3 + 1) / 151 = 2.65 % on average; expected k = floor(3.02) − 1 = 2 → 3 / 151
    assert rate["point"] == pytest.approx(4 / 151, abs=0.001)
    assert rate["expected"] == pytest.approx(3 / 151, abs=0.001) and rate["expected"] <= 0.02


def test_too_few_goods_extrapolate_a_tail_that_keeps_the_promise() -> None:
    # 40 goods cannot resolve 1 % from observed scores (99 would): the threshold is extrapolated above the highest
    rng = np.random.default_rng(3)
    sets = rng.normal(size=(1000, 40))
    expected = [calibrate(s, target_frr=0.01) for s in sets]
    bound = [calibrate(s, target_frr=0.01, promise="bound") for s in sets]
    assert all(t.details["extrapolated"] and t.value >= s.max() for t, s in zip(expected, sets))
    point_rate = np.mean([_exceedance_of_normal(s.max()) for s in sets])  # today's rule: the highest good
    expected_rate = np.array([_exceedance_of_normal(t.value) for t in expected])
    bound_rate = np.array([_exceedance_of_normal(t.value) for t in bound])
    assert point_rate == pytest.approx(1 / 41, abs=0.002)  # 2.4 %: the realised rate over twice the target
    assert expected_rate.mean() < 0.015  # the exponential tail errs high on light-tailed goods
    assert np.mean(bound_rate <= 0.01) >= 0.95 and bound_rate.mean() < expected_rate.mean()
    d = expected[0].details
    assert d["promise"] == "expected" and d["tail_size"] == 10 and d["tail_exceedance"] <= 0.01 + 1e-12
    # two goods: no tail to fit, the highest good, and the record says the promise is not kept
    two = calibrate([0.1, 0.3])
    assert two.value == 0.3 and two.details["promise_kept"] is False


def test_gamma_quantile_matches_known_chi_square_values() -> None:
    from inspector.calibration import _gamma_lower_quantile

    # chi-square 5 % quantiles: 20 dof 10.851, 10 dof 3.940 (tables); Gamma(m, 1) = chi-square(2m) / 2
    assert 2 * _gamma_lower_quantile(10, 0.05) == pytest.approx(10.851, abs=1e-3)
    assert 2 * _gamma_lower_quantile(5, 0.05) == pytest.approx(3.940, abs=1e-3)
