"""Choosing the decision threshold from scores, one way for the line (re-calibration) and the pipelines.

The verdict everywhere is ``score > threshold`` → flagged. Every rule returns an *observed* score as the threshold
(never an interpolated one) where the goods can resolve its promise, so what it promises on the calibration data
holds exactly, and every rule reports
what it realised there: the false-reject rate (FRR) on the goods, recall / escape rate on the defects, and a
one-sided 95 % Clopper-Pearson upper bound on the true FRR — a calibration slice of 100 goods with no rejects
still allows an FRR of up to ≈ 3 % on the line, and the bound says so.

Rules:

- ``good_quantile`` (good images only): the lowest threshold that rejects at most ``floor(target · n)`` goods.
- ``target_frr`` (goods and defects): meet the target FRR on the goods and maximise recall. Recall only falls as
  the threshold rises, so this is the same threshold as ``good_quantile``; the defects are what lets it report
  recall and the escape rate (and how far the threshold could rise before losing a detected defect).
- ``best_f1`` (goods and defects): the threshold of highest F1 on the calibration data (ties: the lowest).
- ``auto``: ``target_frr`` when defect scores are given, ``good_quantile`` otherwise.

What the target promises (``promise``, for the two target rules):

- ``point``: at most ``floor(target · n)`` calibration goods flagged. A *new* good then exceeds the threshold with
  probability ``(allowed + 1) / (n + 1)``: 2 % for a 1 % target on 50 goods, where the threshold is their maximum.
- ``expected`` (default): the rate a new good is flagged is at most the target on average over calibration sets
  (the split-conformal order statistic, ``allowed = floor(target · (n + 1)) − 1``).
- ``bound``: the one-sided 95 % Clopper-Pearson bound on that rate is within the target (plants that must not
  exceed it); it costs recall, which the report states.

Where the goods are too few for the promise (fewer than ``1 / target − 1`` for ``expected``, than
:func:`goods_to_resolve` for ``bound``), no observed score can keep it and the threshold is extrapolated above the
highest good from an exponential fit to the goods' upper tail (peaks over a threshold; for ``bound`` with the fit's
95 % upper confidence on the tail's scale): a model-based threshold, recorded as ``extrapolated`` with its tail.

Pure numpy (and :mod:`math`): no scipy on a line PC.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from inspector.bundle import Threshold
from inspector.errors import InspectorError

RULES = ("auto", "good_quantile", "target_frr", "best_f1")
PROMISES = ("point", "expected", "bound")
CONFIDENCE = 0.95
#: the upper tail an extrapolated threshold is fitted on: the top fifth of the goods, and at least this many
TAIL_MIN = 10


class CalibrationError(InspectorError, ValueError):
    """The scores or settings cannot give a threshold (no goods, NaN scores, a target outside [0, 1))."""


# --------------------------------------------------------------------------------------------------- statistics


def _log_binomial_terms(k: int, n: int) -> np.ndarray:
    """log C(n, i) for i = 0..k."""
    i = np.arange(k + 1)
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    return math.lgamma(n + 1) - lgamma(i + 1.0) - lgamma(n - i + 1.0)


def binomial_cdf(k: int, n: int, p: float, _log_comb: np.ndarray | None = None) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), summed in log space (stable for n in the hundreds of thousands)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_comb = _log_binomial_terms(k, n) if _log_comb is None else _log_comb
    i = np.arange(k + 1, dtype=np.float64)
    terms = log_comb + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(terms.max())
    return float(min(1.0, math.exp(top) * np.exp(terms - top).sum()))


def frr_upper_bound(rejects: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate after ``rejects`` events in ``n`` trials.

    The p at which ``P(X ≤ rejects; n, p) = 1 − confidence`` (the Beta(rejects + 1, n − rejects) quantile),
    found by bisection on the binomial CDF, which falls as p rises. 0 of 100 at 95 % → 1 − 0.05^(1/100) ≈ 0.0295.
    """
    if n <= 0:
        raise CalibrationError("an FRR bound needs at least one good image")
    if not 0 <= rejects <= n:
        raise CalibrationError(f"{rejects} rejects out of {n} is impossible")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"confidence must be in (0, 1), got {confidence}")
    if rejects == n:
        return 1.0
    alpha = 1.0 - confidence
    if rejects == 0:  # closed form: (1 − p)^n = alpha
        return float(-math.expm1(math.log(alpha) / n))
    log_comb = _log_binomial_terms(rejects, n)
    lo, hi = rejects / n, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if binomial_cdf(rejects, n, mid, log_comb) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return float(hi)


def goods_to_resolve(target_frr: float, confidence: float = CONFIDENCE) -> int | None:
    """How many calibration goods it takes to show the false-reject rate is at most ``target_frr``: the fewest n for
    which, with no good rejected, the one-sided bound at ``confidence`` is within the target, ``(1 − t)^n ≤ 1 − c``
    (299 goods for 1 % at 95 %). None for a target of 0, which no finite sample can show."""
    if target_frr <= 0.0:
        return None
    return int(math.ceil(math.log(1.0 - confidence) / math.log1p(-target_frr) - 1e-9))


def resolution(n_good: int, target_frr: float | None, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Whether ``n_good`` calibration goods can resolve the target false-reject rate, and how many would."""
    if target_frr is None:
        return {}
    needed = goods_to_resolve(target_frr, confidence)
    return {"goods_to_resolve_target": needed, "resolves_target": needed is not None and n_good >= needed}


def shortfall(details: dict[str, Any]) -> str | None:
    """A sentence naming the shortfall when a threshold's calibration goods were too few to resolve its target
    false-reject rate (run summaries, MLflow and the gate print it), else None."""
    if details.get("resolves_target", True):
        return None
    n, target, needed = (
        details.get("n_good"),
        details.get("target_false_reject_rate"),
        details.get("goods_to_resolve_target"),
    )
    bound = details.get("frr_upper_95")
    if not isinstance(n, int) or not isinstance(target, float):
        return None
    promise = "no finite set can show a 0 % rate" if needed is None else f"{needed} goods would resolve it"
    bound_text = f" (the 95 % bound on the false-reject rate is {bound:.1%})" if isinstance(bound, float) else ""
    return f"{n} calibration goods are too few to resolve a {target:.1%} false-reject target{bound_text}; {promise}"


# --------------------------------------------------------------------------------------------------- inputs


def _scores(values: Any, what: str, *, allow_empty: bool = False) -> np.ndarray:
    s = np.asarray(values if values is not None else [], dtype=np.float64).ravel()
    if len(s) == 0 and not allow_empty:
        raise CalibrationError(f"calibration needs at least one {what} score")
    if not np.isfinite(s).all():
        raise CalibrationError(f"{what} scores contain NaN or inf")
    return s


def _target(target_frr: float) -> float:
    if not 0.0 <= float(target_frr) < 1.0:
        raise CalibrationError(f"target false-reject rate must be in [0, 1), got {target_frr}")
    return float(target_frr)


def allowed_rejects(n_good: int, target_frr: float) -> int:
    """How many of ``n_good`` goods the target FRR lets the threshold flag: ``floor(target · n)``."""
    return int(math.floor(_target(target_frr) * n_good + 1e-9))  # 1e-9: 0.2 · 10 must be 2, not 1.9999…


# --------------------------------------------------------------------------------------------------- rules


def promised_rejects(n_good: int, target_frr: float, promise: str = "point") -> int | None:
    """How many of ``n_good`` calibration goods the threshold may flag so that ``promise`` holds for the target;
    None where no observed score can keep it (too few goods: the threshold must lie above them all).

    ``point``: ``floor(t · n)``. ``expected``: a new good exceeds the (n − k)-th smallest of n exchangeable goods
    with probability (k + 1) / (n + 1), so ``k = floor(t · (n + 1)) − 1``. ``bound``: the largest k whose
    Clopper-Pearson bound is within the target."""
    target = _target(target_frr)
    if promise == "point" or target == 0.0:  # no sample resolves a zero rate: the highest good is the best there is
        return allowed_rejects(n_good, target)
    if promise == "expected":
        k = int(math.floor(target * (n_good + 1) + 1e-9)) - 1
        return k if k >= 0 else None
    if promise == "bound":
        k = -1
        while k + 1 < n_good and frr_upper_bound(k + 1, n_good) <= target:
            k += 1
        return k if k >= 0 else None
    raise CalibrationError(f"unknown promise {promise!r}; expected one of {', '.join(PROMISES)}")


def _gamma_lower_quantile(shape: int, alpha: float) -> float:
    """x with P(Gamma(shape, 1) ≤ x) = alpha, by bisection on P(Poisson(x) ≥ shape) (no scipy on a line PC)."""

    i = np.arange(shape, dtype=np.float64)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1.0, shape)))])

    def cdf(x: float) -> float:
        return float(1.0 - np.exp(i * math.log(x) - x - log_factorial).sum())

    lo, hi = 1e-12, float(shape) + 40.0 * math.sqrt(shape) + 40.0
    while hi - lo > 1e-10 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < alpha else (lo, mid)
    return hi


def tail_threshold(
    good_scores: Any, exceedance: float, confidence: float | None = None
) -> tuple[float, dict[str, Any]]:
    """A threshold above the goods that a new good exceeds with probability ``exceedance``, from an exponential fit
    to their upper tail (the excesses of the top ``m`` scores over the next one, ``m`` the top fifth and at least
    ``TAIL_MIN``); with ``confidence``, the tail's scale is its one-sided upper confidence bound (chi-square on
    2m degrees of freedom), so the threshold keeps the promise with that confidence under the model. Never below the
    highest good. Why exponential: score tails of distances are light (sub-exponential), so it errs high."""
    s = np.sort(_scores(good_scores, "good"))
    n = len(s)
    if n < 3:
        raise CalibrationError(f"{n} good scores are too few to extrapolate a threshold; calibrate on more goods")
    if not 0.0 < exceedance < 1.0:
        raise CalibrationError(f"exceedance must be in (0, 1), got {exceedance}")
    m = min(n - 1, max(TAIL_MIN, int(math.ceil(0.2 * n))))
    base = float(s[n - 1 - m])
    scale = float(np.mean(s[n - m :] - base))
    if confidence is not None:
        scale *= m / _gamma_lower_quantile(m, 1.0 - confidence)
    value = base + scale * math.log(m / (n * exceedance)) if m / n > exceedance else float(s[-1])
    value = max(value, float(s[-1]))
    tail = {"tail_size": m, "tail_base": base, "tail_scale": scale, "tail_confidence": confidence}
    tail["tail_exceedance"] = (m / n) * math.exp(-(value - base) / scale) if scale > 0 else 0.0
    return value, tail


def good_quantile_threshold(good_scores: Any, target_frr: float, promise: str = "point") -> float:
    """The lowest observed good score that flags at most :func:`promised_rejects` of the goods.

    For ``point`` the empirical (1 − target) quantile, ``numpy.quantile(..., method="inverted_cdf")``: with the
    goods sorted ascending it is ``s[n − 1 − allowed]``; any lower value flags ``allowed + 1`` goods. Where the goods
    cannot resolve the promise, :func:`promised_threshold` extrapolates; this returns the highest good.
    """
    s = np.sort(_scores(good_scores, "good"))
    allowed = promised_rejects(len(s), target_frr, promise)
    return float(s[len(s) - 1 - (allowed or 0)])


def promised_threshold(good_scores: Any, target_frr: float, promise: str = "point") -> tuple[float, dict[str, Any]]:
    """The threshold that keeps ``promise`` for the target on these goods, and how it was set: an observed score
    where the goods resolve it, else :func:`tail_threshold` (``extrapolated``)."""
    good = _scores(good_scores, "good")
    allowed = promised_rejects(len(good), target_frr, promise)
    info: dict[str, Any] = {"promise": promise, "extrapolated": allowed is None, "promise_kept": True}
    if allowed is not None:
        info["good_rejects_allowed"] = allowed
        return good_quantile_threshold(good, target_frr, promise), info
    if len(good) < 3:  # nothing to fit a tail on: the highest good, and the record says the promise is not kept
        return float(good.max()), {**info, "extrapolated": False, "promise_kept": False, "good_rejects_allowed": 0}
    value, tail = tail_threshold(good, _target(target_frr), CONFIDENCE if promise == "bound" else None)
    return value, {**info, "good_rejects_allowed": 0, **tail}


def frr_constrained_threshold(
    good_scores: Any, defect_scores: Any, target_frr: float, promise: str = "point"
) -> tuple[float, dict[str, Any]]:
    """Meet ``target_frr`` on the goods and maximise recall on the defects; return (threshold, report).

    Recall (defects scoring above the threshold) never rises with the threshold, so the best threshold meeting the
    FRR constraint is the lowest one: :func:`good_quantile_threshold`. The report holds recall, escape rate, and
    ``recall_plateau_upper``: the highest observed score the threshold could rise to without losing a detected
    defect on this data (a measure of margin; the rule does not go there, as unseen defects may score lower).
    """
    good = _scores(good_scores, "good")
    bad = _scores(defect_scores, "defect")
    value, how = promised_threshold(good, target_frr, promise)
    detected = bad[bad > value]
    if len(detected):
        weakest = float(detected.min())
        below = np.r_[good, bad]
        below = below[below < weakest]
        plateau = float(below.max())
    else:
        plateau = float("inf")
    report = {**_rates(good, bad, value), "recall_plateau_upper": plateau, **how}
    return value, report


def best_f1_threshold(good_scores: Any, defect_scores: Any) -> tuple[float, dict[str, Any]]:
    """The threshold of highest F1 (defect = positive) on the calibration data; ties go to the lowest threshold.

    Candidates are every observed score (flag what scores above it) and one just below the lowest score (flag
    everything).
    """
    good = _scores(good_scores, "good")
    bad = _scores(defect_scores, "defect")
    candidates = np.unique(np.r_[good, bad])  # ascending
    candidates = np.r_[np.nextafter(candidates[0], -np.inf), candidates]
    # counts flagged (score > t) for each candidate via sorted arrays
    tp = len(bad) - np.searchsorted(np.sort(bad), candidates, side="right")
    fp = len(good) - np.searchsorted(np.sort(good), candidates, side="right")
    fn = len(bad) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    best = int(np.argmax(f1))  # first maximum = lowest threshold
    value = float(candidates[best])
    return value, {**_rates(good, bad, value), "f1": float(f1[best])}


def _rates(good: np.ndarray, bad: np.ndarray, value: float) -> dict[str, Any]:
    fp = int((good > value).sum())
    tp = int((bad > value).sum())
    out: dict[str, Any] = {
        "good_rejects": fp,
        "false_reject_rate": fp / len(good) if len(good) else float("nan"),
    }
    if len(bad):
        out.update(
            {
                "defects_detected": tp,
                "recall": tp / len(bad),
                "escape_rate": 1.0 - tp / len(bad),
                "precision": tp / (tp + fp) if tp + fp else float("nan"),
                "f1": 2 * tp / (2 * tp + fp + (len(bad) - tp)),
            }
        )
    return out


def calibrate(
    good_scores: Any,
    defect_scores: Any = None,
    rule: str = "auto",
    target_frr: float = 0.01,
    promise: str = "expected",
) -> Threshold:
    """Choose the threshold by ``rule`` and record how: rule, sample sizes, target, realised rates, FRR bound.

    ``details`` keys: ``rule``, ``n_good``, ``n_defect``, ``target_false_reject_rate`` (None for ``best_f1``),
    ``good_rejects``, ``false_reject_rate`` (realised on the calibration goods), ``frr_upper_95`` (one-sided
    Clopper-Pearson bound on the true FRR at 95 %), and with defects ``recall``, ``escape_rate``,
    ``precision``, ``f1``; with a target, ``goods_to_resolve_target`` and ``resolves_target`` (:func:`shortfall`
    puts them in words). The one calibration front end: the pipelines, re-calibration and INT8 use it.
    """
    if rule not in RULES:
        raise CalibrationError(f"unknown calibration rule {rule!r}; expected one of {', '.join(RULES)}")
    good = _scores(good_scores, "good")
    bad = _scores(defect_scores, "defect", allow_empty=True)
    if rule == "auto":
        rule = "target_frr" if len(bad) else "good_quantile"
    if rule in ("target_frr", "best_f1") and not len(bad):
        raise CalibrationError(f"rule {rule!r} needs defect scores; with good images only use 'good_quantile'")
    extra: dict[str, Any] = {}
    target: float | None = _target(target_frr)
    if promise not in PROMISES:
        raise CalibrationError(f"unknown promise {promise!r}; expected one of {', '.join(PROMISES)}")
    if rule == "good_quantile":
        value, extra = promised_threshold(good, target_frr, promise)
    elif rule == "target_frr":
        value, extra = frr_constrained_threshold(good, bad, target_frr, promise)
    else:
        value, extra = best_f1_threshold(good, bad)
        target = None
    rates = _rates(good, bad, value)
    details: dict[str, Any] = {
        "rule": rule,
        "n_good": int(len(good)),
        "n_defect": int(len(bad)),
        "target_false_reject_rate": target,
        **extra,
        **rates,
        "min_resolvable_frr": 1.0 / len(good),
        "frr_upper_95": frr_upper_bound(rates["good_rejects"], len(good), CONFIDENCE),
        **resolution(len(good), target),
    }
    return Threshold(value=value, rule=rule, details=details)
