"""The review database behind one small API: parts in, filtered lists and decisions out, purges applied.

Why one class: the recorder, the review page, the metrics and the loop's export all read and write the same
tables; each goes through :class:`ReviewStore`, which opens the database (SQLite file or PostgreSQL URL) and
brings its schema to the latest Alembic revision first. Files (kept images, heatmaps) live under the recording
folder and are named by path relative to it; an image recorded by path on the line PC is never deleted.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from pydantic import BaseModel
from sqlalchemy import Engine, case, create_engine, delete, func, select
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, aliased

from inspector.errors import InspectorError
from inspector.review.estimates import ReviewCounts
from inspector.review.retention import Purge, StoredPart
from inspector.review.schema import DECISIONS, Export, KeptPart, Review

MIGRATIONS = Path(__file__).with_name("migrations")


class ReviewError(InspectorError):
    """A review request the store refuses (unknown part, unknown decision, a defect without its type)."""


def utcnow() -> datetime:
    """Naive UTC: what every timestamp column holds (SQLite keeps no time zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


def hide_password(url: str) -> str:
    """``postgresql://user:***@host/db``: a URL fit for an error message or a log line."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def migrate(engine: Engine) -> None:
    """Bring the schema to the latest revision (creating it in an empty database)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class PartView(BaseModel):
    """A kept part as the page and the loop see it, with its latest review."""

    id: int
    recorded_at: datetime
    part_type: str
    model_version: str
    registry_version: str | None
    name: str
    score: float
    threshold: float
    views: dict[str, float] | None
    verdict: str
    kept: str
    has_image: bool
    has_heatmap: bool
    decision: str | None = None
    defect_type: str | None = None
    reviewer: str | None = None
    decided_at: datetime | None = None
    review_id: int | None = None


@dataclass(frozen=True)
class PartFilter:
    """What the page filters by; None: any."""

    day: date | None = None
    model_version: str | None = None
    part_type: str | None = None
    verdict: str | None = None
    reviewed: bool | None = None


@dataclass(frozen=True)
class ReviewedPart:
    """A part's latest review, with where its image is: what the loop exports."""

    part_id: int
    review_id: int
    decision: str
    defect_type: str | None
    reviewer: str
    decided_at: datetime
    image: Path | None
    image_sha256: str
    verdict: str
    kept: str
    part_type: str
    model_version: str


@dataclass(frozen=True)
class DayStats:
    """One day of the line, for the page's plots: score / threshold ratios and the review outcome."""

    day: date
    ratios: list[float]
    flagged: int
    passed: float  # weighted by 1 / sample rate
    flagged_reviewed: int
    flagged_good: int


def _latest_reviews() -> Any:
    """Each part's latest review: an alias of :class:`Review` over a subquery."""
    latest = select(func.max(Review.id).label("id")).group_by(Review.part_id).subquery()
    return aliased(Review, select(Review).join(latest, Review.id == latest.c.id).subquery())


class ReviewStore:
    """The review database at ``url`` and the recording folder ``root`` its files live under."""

    def __init__(self, url: str, root: Path) -> None:
        self.root = Path(root)
        self.url = url
        sqlite = url.startswith("sqlite")
        try:
            self.engine = create_engine(
                url, pool_pre_ping=not sqlite, connect_args={"timeout": 5} if sqlite else {"connect_timeout": 5}
            )
        except (ArgumentError, ImportError) as exc:
            raise ReviewError(
                f"review database {hide_password(url)!r}: cannot be opened ({exc}); give a SQLAlchemy URL such as "
                "sqlite:////var/lib/inspector/review.db or postgresql+psycopg2://user@host/review "
                "(PostgreSQL needs pip install '.[postgres]')"
            ) from None
        self._migrated = False
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        """A session on a database whose schema is current: migrated on first use, so a database that is down when
        the line starts is migrated once it is back (meanwhile every call raises SQLAlchemy's error)."""
        if not self._migrated:
            with self._lock:
                if not self._migrated:
                    migrate(self.engine)
                    self._migrated = True
        return Session(self.engine)

    def path_of(self, stored: str | None) -> Path | None:
        """A stored file name as a path: relative names are under the recording folder."""
        if stored is None:
            return None
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    # ------------------------------------------------------------------------------------------------ writing

    def add_part(self, part: KeptPart) -> int:
        with self.session() as session, session.begin():
            session.add(part)
            session.flush()
            return int(part.id)

    def add_review(
        self, part_id: int, decision: str, reviewer: str, defect_type: str | None = None, note: str | None = None
    ) -> PartView:
        """Append a decision on ``part_id`` and return the part as it now reads."""
        if decision not in DECISIONS:
            raise ReviewError(f"part {part_id}: unknown decision {decision!r}; expected one of {', '.join(DECISIONS)}")
        defect_type = (defect_type or "").strip() or None
        if decision == "defect" and defect_type is None:
            raise ReviewError(f"part {part_id}: a defect needs its type (scratch, crack, …)")
        if not reviewer.strip():
            raise ReviewError(f"part {part_id}: the reviewer's name is empty")
        with self.session() as session, session.begin():
            if session.get(KeptPart, part_id) is None:
                raise ReviewError(f"part {part_id}: no such kept part (purged, or never recorded)")
            session.add(
                Review(
                    part_id=part_id,
                    decision=decision,
                    defect_type=defect_type if decision == "defect" else None,
                    reviewer=reviewer.strip()[:128],
                    decided_at=utcnow(),
                    note=note,
                )
            )
        return self.part(part_id)

    # ------------------------------------------------------------------------------------------------ reading

    def _views(self, session: Session, query: Any) -> list[PartView]:
        latest = _latest_reviews()
        stmt = query.add_columns(latest).outerjoin(latest, latest.part_id == KeptPart.id)
        out = []
        for part, review in session.execute(stmt):
            out.append(
                PartView(
                    id=part.id,
                    recorded_at=part.recorded_at,
                    part_type=part.part_type,
                    model_version=part.model_version,
                    registry_version=part.registry_version,
                    name=part.name,
                    score=part.score,
                    threshold=part.threshold,
                    views=part.views,
                    verdict=part.verdict,
                    kept=part.kept,
                    has_image=part.image is not None,
                    has_heatmap=part.heatmap is not None,
                    decision=review.decision if review else None,
                    defect_type=review.defect_type if review else None,
                    reviewer=review.reviewer if review else None,
                    decided_at=review.decided_at if review else None,
                    review_id=review.id if review else None,
                )
            )
        return out

    def parts(self, where: PartFilter = PartFilter(), limit: int = 50, before_id: int | None = None) -> list[PartView]:
        """Kept parts, newest first, filtered."""
        query = select(KeptPart).order_by(KeptPart.id.desc()).limit(limit)
        if where.day is not None:
            start = datetime.combine(where.day, datetime.min.time())
            query = query.where(KeptPart.recorded_at >= start, KeptPart.recorded_at < start + timedelta(days=1))
        for column, value in (
            (KeptPart.model_version, where.model_version),
            (KeptPart.part_type, where.part_type),
            (KeptPart.verdict, where.verdict),
        ):
            if value:
                query = query.where(column == value)
        if before_id is not None:
            query = query.where(KeptPart.id < before_id)
        if where.reviewed is not None:
            reviewed = select(Review.part_id)
            query = query.where(KeptPart.id.in_(reviewed) if where.reviewed else KeptPart.id.not_in(reviewed))
        with self.session() as session:
            return self._views(session, query)

    def part(self, part_id: int) -> PartView:
        with self.session() as session:
            found = self._views(session, select(KeptPart).where(KeptPart.id == part_id))
        if not found:
            raise ReviewError(f"part {part_id}: no such kept part (purged, or never recorded)")
        return found[0]

    def file_of(self, part_id: int, which: str) -> Path | None:
        """The image or heatmap file of a part (None when there is none any more)."""
        with self.session() as session:
            part = session.get(KeptPart, part_id)
            if part is None:
                return None
            return self.path_of(part.image if which == "image" else part.heatmap)

    def choices(self) -> dict[str, list[str]]:
        """The values the page's filters offer."""
        with self.session() as session:
            versions = session.scalars(select(KeptPart.model_version).distinct().order_by(KeptPart.model_version))
            types = session.scalars(select(KeptPart.part_type).distinct().order_by(KeptPart.part_type))
            defects = session.scalars(
                select(Review.defect_type)
                .where(Review.defect_type.is_not(None))
                .distinct()
                .order_by(Review.defect_type)
            )
            return {
                "model_versions": list(versions),
                "part_types": list(types),
                "defect_types": [d for d in defects if d],
            }

    def counts(self) -> ReviewCounts:
        """Kept and reviewed parts, for the metrics' estimates."""
        latest = _latest_reviews()
        stmt = (
            select(
                KeptPart.kept,
                func.count(KeptPart.id),
                func.sum(1.0 / KeptPart.sample_rate),
                func.count(latest.id),
                func.sum(case((latest.decision == "good", 1), else_=0)),
                func.sum(case((latest.decision == "defect", 1), else_=0)),
            )
            .outerjoin(latest, latest.part_id == KeptPart.id)
            .group_by(KeptPart.kept)
        )
        by_kept: dict[str, tuple[int, float, int, int, int]] = {}
        with self.session() as session:
            for kept, n, weighted, reviewed, good, defect in session.execute(stmt):
                by_kept[kept] = (int(n), float(weighted or 0), int(reviewed or 0), int(good or 0), int(defect or 0))
        f = by_kept.get("flagged", (0, 0.0, 0, 0, 0))
        s = by_kept.get("sample", (0, 0.0, 0, 0, 0))
        return ReviewCounts(f[0], s[1], f[2], f[3], s[2], s[4])

    def reviewed_by_decision(self) -> dict[str, int]:
        """How many parts carry each decision (their latest review)."""
        latest = _latest_reviews()
        with self.session() as session:
            rows = session.execute(select(latest.decision, func.count()).group_by(latest.decision))
            return {str(d): int(n) for d, n in rows}

    def days(self, last: int = 14, where: PartFilter = PartFilter()) -> list[DayStats]:
        """The last ``last`` days with kept parts, oldest first."""
        latest = _latest_reviews()
        since = datetime.combine(utcnow().date() - timedelta(days=last - 1), datetime.min.time())
        stmt = (
            select(
                KeptPart.recorded_at,
                KeptPart.score,
                KeptPart.threshold,
                KeptPart.kept,
                KeptPart.sample_rate,
                latest.decision,
            )
            .outerjoin(latest, latest.part_id == KeptPart.id)
            .where(KeptPart.recorded_at >= since)
        )
        if where.model_version:
            stmt = stmt.where(KeptPart.model_version == where.model_version)
        if where.part_type:
            stmt = stmt.where(KeptPart.part_type == where.part_type)
        per_day: dict[date, dict[str, Any]] = {}
        with self.session() as session:
            for at, score, threshold, kept, rate, decision in session.execute(stmt):
                d = per_day.setdefault(at.date(), {"ratios": [], "flagged": 0, "passed": 0.0, "rev": 0, "good": 0})
                d["ratios"].append(score / threshold if threshold > 0 and math.isfinite(threshold) else math.nan)
                if kept == "flagged":
                    d["flagged"] += 1
                    d["rev"] += decision is not None
                    d["good"] += decision == "good"
                else:
                    d["passed"] += 1.0 / rate
        return [
            DayStats(day, v["ratios"], v["flagged"], v["passed"], v["rev"], v["good"])
            for day, v in sorted(per_day.items())
        ]

    def reviewed_after(self, review_id: int) -> list[ReviewedPart]:
        """Parts whose latest review is newer than ``review_id`` (the last export's watermark)."""
        latest = _latest_reviews()
        stmt = (
            select(KeptPart, latest)
            .join(latest, latest.part_id == KeptPart.id)
            .where(latest.id > review_id)
            .order_by(latest.id)
        )
        with self.session() as session:
            return [
                ReviewedPart(
                    part_id=part.id,
                    review_id=review.id,
                    decision=review.decision,
                    defect_type=review.defect_type,
                    reviewer=review.reviewer,
                    decided_at=review.decided_at,
                    image=self.path_of(part.image),
                    image_sha256=part.image_sha256,
                    verdict=part.verdict,
                    kept=part.kept,
                    part_type=part.part_type,
                    model_version=part.model_version,
                )
                for part, review in session.execute(stmt)
            ]

    def passed_unchallenged(self, limit: int = 500) -> list[Path]:
        """Images of kept passed parts no reviewer called defective (newest first): recent goods to calibrate on."""
        latest = _latest_reviews()
        stmt = (
            select(KeptPart.image)
            .outerjoin(latest, latest.part_id == KeptPart.id)
            .where(KeptPart.verdict == "good", KeptPart.image.is_not(None))
            .where((latest.decision.is_(None)) | (latest.decision == "good"))
            .order_by(KeptPart.id.desc())
            .limit(limit)
        )
        with self.session() as session:
            return [p for p in (self.path_of(s) for s in session.scalars(stmt)) if p is not None]

    # ------------------------------------------------------------------------------------------------ exports

    def last_export_watermark(self) -> int:
        with self.session() as session:
            return int(session.scalar(select(func.max(Export.last_review_id))) or 0)

    def record_export(self, last_review_id: int, false_rejects: int, defects: int, outcome: dict[str, Any]) -> int:
        with self.session() as session, session.begin():
            export = Export(
                created_at=utcnow(),
                last_review_id=last_review_id,
                false_rejects=false_rejects,
                defects=defects,
                outcome=outcome,
            )
            session.add(export)
            session.flush()
            return int(export.id)

    # ------------------------------------------------------------------------------------------------ retention

    def stored_parts(self) -> list[StoredPart]:
        """Parts whose files are still on disk."""
        reviewed = select(Review.part_id).distinct().subquery()
        stmt = (
            select(KeptPart.id, KeptPart.recorded_at, KeptPart.stored_bytes, reviewed.c.part_id)
            .outerjoin(reviewed, reviewed.c.part_id == KeptPart.id)
            .where(KeptPart.purged_at.is_(None))
        )
        with self.session() as session:
            return [StoredPart(i, at, int(n), r is not None) for i, at, n, r in session.execute(stmt)]

    def apply_purge(self, purge: Purge) -> list[Path]:
        """Forget the purged parts' files (unreviewed parts past the age limit go altogether; reviewed ones keep
        their row, the audit trail). Returns the files to delete: only those under the recording folder."""
        ids = purge.old + purge.over_budget
        if not ids:
            return []
        files: list[Path] = []
        with self.session() as session, session.begin():
            reviewed = set(session.scalars(select(Review.part_id).where(Review.part_id.in_(ids))))
            for part in session.scalars(select(KeptPart).where(KeptPart.id.in_(ids))):
                files += [self.root / s for s in (part.image, part.heatmap) if s and not Path(s).is_absolute()]
                part.image = None if part.image and not Path(part.image).is_absolute() else part.image
                part.heatmap, part.stored_bytes, part.purged_at = None, 0, utcnow()
            gone = [i for i in purge.old if i not in reviewed]
            if gone:
                session.execute(delete(KeptPart).where(KeptPart.id.in_(gone)))
        return files
