"""The review database's tables (SQLAlchemy 2 ORM): kept parts, the reviewers' decisions, the exports.

Why three tables: a part is what the line decided, once; a review is what a person decided about it, appended
(never updated, so who decided what and when is the audit trail, and the latest review is the decision); an
export is what the loop took from the reviews (a watermark, so no review is exported twice). The schema is
created and changed only by the Alembic migrations in :mod:`inspector.review.migrations`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: what a reviewer can say about a part
DECISIONS = ("good", "defect")


class Base(DeclarativeBase):
    pass


class KeptPart(Base):
    """One scored part the line kept: the image (a file under the recording folder, or its path on the line PC),
    its heatmap, both views' scores, the threshold and the model that decided."""

    __tablename__ = "kept_parts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    part_type: Mapped[str] = mapped_column(String(128), index=True)
    model_version: Mapped[str] = mapped_column(String(256), index=True)
    registry_version: Mapped[str | None] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(512))
    image: Mapped[str | None] = mapped_column(String(1024))  # None once purged
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    stored_bytes: Mapped[int] = mapped_column(Integer, default=0)  # image + heatmap bytes under the recording folder
    heatmap: Mapped[str | None] = mapped_column(String(1024))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    views: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    verdict: Mapped[str] = mapped_column(String(16), index=True)  # "anomalous" or "good", as the line said
    kept: Mapped[str] = mapped_column(String(16))  # "flagged" or "sample"
    sample_rate: Mapped[float] = mapped_column(Float)  # the chance it had of being kept (1 for flagged parts)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime)


class Review(Base):
    """One reviewer's decision on one part; appended, never changed (the latest per part counts)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    part_id: Mapped[int] = mapped_column(ForeignKey("kept_parts.id"), index=True)
    decision: Mapped[str] = mapped_column(String(16))  # one of DECISIONS
    defect_type: Mapped[str | None] = mapped_column(String(128))
    reviewer: Mapped[str] = mapped_column(String(128))
    decided_at: Mapped[datetime] = mapped_column(DateTime)
    note: Mapped[str | None] = mapped_column(Text)


class Export(Base):
    """What one run of the loop took: the reviews up to ``last_review_id`` and what it made of them."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_review_id: Mapped[int] = mapped_column(Integer)
    false_rejects: Mapped[int] = mapped_column(Integer)
    defects: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON)
