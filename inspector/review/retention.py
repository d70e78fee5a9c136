"""Which kept parts to purge so the disk never fills: by age, then by a disk budget.

Why pure: the rule is the part worth testing with exact numbers; the store applies it. Parts past the age limit
go first; then, while the kept files exceed the budget, the oldest go, parts nobody has reviewed before reviewed
ones (a reviewed part is what the loop has yet to take).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class StoredPart:
    """A kept part whose files are still on disk."""

    id: int
    recorded_at: datetime
    stored_bytes: int
    reviewed: bool


@dataclass(frozen=True)
class Purge:
    """Parts to purge: ``old`` (past the age limit) and ``over_budget`` (to bring the disk under the budget)."""

    old: list[int]
    over_budget: list[int]


def parts_to_purge(parts: Sequence[StoredPart], now: datetime, max_age: timedelta, budget_bytes: int) -> Purge:
    """The age limit first, then the oldest (unreviewed before reviewed) until the rest fit ``budget_bytes``."""
    cutoff = now - max_age
    old = [p for p in parts if p.recorded_at < cutoff]
    rest = sorted((p for p in parts if p.recorded_at >= cutoff), key=lambda p: (p.reviewed, p.recorded_at, p.id))
    total = sum(p.stored_bytes for p in rest)
    over: list[int] = []
    for p in rest:
        if total <= budget_bytes:
            break
        over.append(p.id)
        total -= p.stored_bytes
    return Purge([p.id for p in old], over)
