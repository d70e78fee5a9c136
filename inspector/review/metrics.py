"""The reviews on ``/metrics``: reviewed counts and the line's false-reject and escape estimates.

Why a collector: the numbers live in the review database, which several processes write (the service, the page,
a second line PC); reading them when Prometheus scrapes (at most every ``cache_seconds``) keeps every scrape
true without a counter of our own drifting from the tables. A database that is down reports
``inspector_review_database_up 0`` and nothing else, never an error on the page.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy.exc import SQLAlchemyError

from inspector.review.estimates import line_estimates
from inspector.review.store import ReviewStore


class ReviewCollector:
    """Prometheus collector over a :class:`ReviewStore` (values cached ``cache_seconds``)."""

    def __init__(self, store: ReviewStore, cache_seconds: float = 15.0) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self._cached: list[Metric] = []
        self._at = -math.inf

    def describe(self) -> list[Metric]:
        return []  # no query at registration: the database may not be up yet

    def collect(self) -> Iterator[Metric]:
        if time.monotonic() - self._at >= self.cache_seconds:
            self._cached, self._at = self._read(), time.monotonic()
        yield from self._cached

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily("inspector_review_database_up", "1 when the review database answered the last scrape")
        try:
            counts = self.store.counts()
            decided = self.store.reviewed_by_decision()
        except SQLAlchemyError:
            up.add_metric([], 0.0)
            return [up]
        up.add_metric([], 1.0)
        reviewed = GaugeMetricFamily(
            "inspector_review_reviewed_parts",
            "kept parts reviewers decided, by their latest decision",
            labels=["decision"],
        )
        for decision in ("good", "defect"):
            reviewed.add_metric([decision], float(decided.get(decision, 0)))
        estimates = line_estimates(counts)
        return [
            up,
            reviewed,
            GaugeMetricFamily(
                "inspector_review_kept_parts", "kept parts in the review database (flagged)", value=counts.flagged
            ),
            GaugeMetricFamily(
                "inspector_review_confirmed_false_reject_share",
                "share of reviewed flagged parts a reviewer confirmed good (NaN: none reviewed)",
                value=estimates.false_reject_share,
            ),
            GaugeMetricFamily(
                "inspector_review_false_reject_rate_estimate",
                "share of good parts the line flags, from the reviews scaled to all kept parts (NaN: unknown)",
                value=estimates.false_reject_rate,
            ),
            GaugeMetricFamily(
                "inspector_review_escape_rate_estimate",
                "share of defective parts the line passes, from reviewed passed samples (NaN: unknown)",
                value=estimates.escape_rate,
            ),
        ]
