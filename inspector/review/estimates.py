"""What the reviews say about the line: its false-reject and escape rates, estimated from kept parts.

Why estimates: the line keeps every flagged part but only a sample of passed ones, each with the chance it had of
being kept, so a passed part kept at rate 2 % stands for 50 parts. Reviewers see some of each: the share of
reviewed flagged parts found good, and of reviewed passed parts found defective, scale to the whole line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ReviewCounts:
    """Kept and reviewed parts; ``passed`` is weighted (each kept passed part counts 1 / its sample rate)."""

    flagged: int = 0
    passed: float = 0.0
    flagged_reviewed: int = 0
    flagged_good: int = 0  # confirmed false rejects
    passed_reviewed: int = 0
    passed_defect: int = 0  # confirmed escapes


@dataclass(frozen=True)
class LineEstimates:
    """NaN where the reviews cannot say yet."""

    false_reject_share: float  # of flagged parts, the share that is good
    false_reject_rate: float  # of good parts, the share the line flags
    escape_rate: float  # of defective parts, the share the line passes


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def line_estimates(c: ReviewCounts) -> LineEstimates:
    """Scale the reviewed shares to all kept parts (NaN shares count as 0 where the other side alone is known)."""
    good_share = _ratio(c.flagged_good, c.flagged_reviewed)
    defect_share = _ratio(c.passed_defect, c.passed_reviewed)
    g = 0.0 if math.isnan(good_share) else good_share
    d = 0.0 if math.isnan(defect_share) else defect_share
    flagged_good, passed_good = c.flagged * g, c.passed * (1 - d)
    flagged_bad, passed_bad = c.flagged * (1 - g), c.passed * d
    frr = math.nan if math.isnan(good_share) else _ratio(flagged_good, flagged_good + passed_good)
    escape = math.nan if math.isnan(defect_share) else _ratio(passed_bad, flagged_bad + passed_bad)
    return LineEstimates(good_share, frr, escape)
