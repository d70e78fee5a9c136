"""Keeping scored parts without touching the request: a bounded queue and one background writer thread.

Why off the request path: the camera waits for its verdict, not for a disk or a database. A scoring request only
decides what to keep (every flagged part, a random share of passed ones) and puts it on a bounded queue without
waiting; the writer thread stores the image, draws its heatmap with the same model, inserts the row, and applies
retention now and then. A full queue, a full disk or a database that is down each become a counter and a log
line (at most one a minute per cause); the scoring request never sees them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.exc import SQLAlchemyError

from inspector.engine import Inspector
from inspector.review.retention import parts_to_purge
from inspector.review.schema import KeptPart
from inspector.review.store import ReviewStore, utcnow

log = logging.getLogger("inspector.review")

#: how often the writer applies retention (seconds), and how long a cause stays quiet in the log after a line
RETENTION_EVERY = 60.0
LOG_EVERY = 60.0
#: image bytes the queue may hold: a burst of large photos is dropped and counted, never kept in memory unbounded
QUEUE_BYTES = 256 * 1024 * 1024


@dataclass
class ScoredPart:
    """One scored image the line decided to keep: its bytes (service) or its path on the line PC (CLI)."""

    name: str
    score: float
    threshold: float
    verdict: str
    views: dict[str, float] | None
    inspector: Inspector
    part_type: str
    registry_version: str | None = None
    data: bytes | None = None
    path: Path | None = None
    sample_rate: float = 1.0
    recorded_at: datetime = field(default_factory=utcnow)


class RecorderMetrics:
    """The recorder's counters, registered in the app's Prometheus registry (or a private one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.kept = Counter("inspector_review_kept", "scored parts kept for review, by why", ["reason"], registry=r)
        self.failures = Counter(
            "inspector_review_record_failures",
            "kept parts that could not be stored (queue_full, disk, database, error); scoring was unaffected",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("inspector_review_queue_depth", "kept parts waiting to be written", registry=r)
        self.purged = Counter(
            "inspector_review_purged", "kept parts whose files were purged, by rule (age, disk)", ["rule"], registry=r
        )
        self.stored_bytes = Gauge(
            "inspector_review_stored_bytes", "bytes of kept images and heatmaps on disk (after retention)", registry=r
        )


def keep_reason(verdict: str | None, passed_rate: float, draw: float) -> tuple[str, float] | None:
    """Why a scored part is kept, and the chance it had: every flagged part; a passed one when ``draw`` falls under
    ``passed_rate``; None: not kept (unscored images are the camera's problem, not the reviewer's)."""
    if verdict == "anomalous":
        return "flagged", 1.0
    if verdict == "good" and draw < passed_rate:
        return "sample", passed_rate
    return None


def image_suffix(data: bytes) -> str:
    """The file suffix of an encoded image, from its content (``.img`` when Pillow cannot tell)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return f".{(img.format or 'img').lower()}"
    except Exception:
        return ".img"


class Recorder:
    """Keeps scored parts in a :class:`ReviewStore` from a background thread; :meth:`offer` never blocks."""

    def __init__(
        self,
        store: ReviewStore,
        *,
        passed_rate: float,
        max_age: timedelta,
        budget_bytes: int,
        queue_size: int,
        metrics: RecorderMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.passed_rate = passed_rate
        self.max_age = max_age
        self.budget_bytes = budget_bytes
        self.metrics = metrics or RecorderMetrics()
        self._queue: queue.Queue[ScoredPart | None] = queue.Queue(maxsize=queue_size)
        self._rng = rng or random.Random()
        self._thread: threading.Thread | None = None
        self._last_retention = 0.0
        self._last_log: dict[str, float] = {}
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self.failed = 0  # parts (or retention passes) that could not be stored, since start

    # -------------------------------------------------------------------------------------- the request's side

    def keep(
        self,
        inspector: Inspector,
        name: str,
        score: float | None,
        verdict: str | None,
        views: dict[str, float] | None,
        source: bytes | Path,
        part_type: str,
        registry_version: str | None = None,
    ) -> bool:
        """Queue one scored image when it is to be kept (flagged, or drawn among the passed); never blocks."""
        reason = keep_reason(verdict, self.passed_rate, self._rng.random())
        if reason is None or score is None or verdict is None:
            return False
        part = ScoredPart(
            name=name,
            score=float(score),
            threshold=inspector.threshold,
            verdict=verdict,
            views=views,
            inspector=inspector,
            part_type=part_type,
            registry_version=registry_version,
            data=source if isinstance(source, bytes) else None,
            path=source if isinstance(source, Path) else None,
            sample_rate=reason[1],
        )
        return self.offer(part)

    def offer(self, part: ScoredPart) -> bool:
        """Queue ``part`` for writing without waiting; False (and a counted drop) when the queue is full, in parts or
        in image bytes (:data:`QUEUE_BYTES`)."""
        size = len(part.data or b"")
        with self._bytes_lock:
            room = self._queued_bytes + size <= QUEUE_BYTES
            if room:
                self._queued_bytes += size
        try:
            if not room:
                raise queue.Full
            self._queue.put_nowait(part)
        except queue.Full:
            if room:
                self._release(size)
            self.failure("queue_full", f"{part.name}: review queue full, part not kept")
            return False
        self.metrics.queue_depth.set(self._queue.qsize())
        return True

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._queued_bytes -= size

    def failure(self, reason: str, message: str) -> None:
        """Count a failure; log it unless this cause was logged within the last minute."""
        self.metrics.failures.labels(reason).inc()
        self.failed += 1
        now = time.monotonic()
        if now - self._last_log.get(reason, -LOG_EVERY) >= LOG_EVERY:
            self._last_log[reason] = now
            log.warning("review recording (%s): %s", reason, message)

    # -------------------------------------------------------------------------------------- the writer thread

    def start(self) -> Recorder:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="review-recorder", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until everything queued so far is written (tests, and ``inspector score --record`` at its end)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            part = self._queue.get()
            try:
                if part is None:
                    return
                self.write(part)
                self._release(len(part.data or b""))
                if time.monotonic() - self._last_retention >= RETENTION_EVERY:
                    self.apply_retention()
            finally:
                self._queue.task_done()
                self.metrics.queue_depth.set(self._queue.qsize())

    def write(self, part: ScoredPart) -> int | None:
        """Store one part's image and heatmap and insert its row; a failure is counted and logged, never raised."""
        written: list[Path] = []
        try:
            row = self._stored_row(part, written)
            part_id = self.store.add_part(row)
        except OSError as exc:
            self._remove(written)
            self.failure("disk", f"{part.name}: {exc}")
            return None
        except SQLAlchemyError as exc:
            self._remove(written)
            self.failure("database", f"{part.name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            return None
        except Exception as exc:  # nothing the writer meets may stop it
            self._remove(written)
            self.failure("error", f"{part.name}: {type(exc).__name__}: {exc}")
            return None
        self.metrics.kept.labels("flagged" if part.verdict == "anomalous" else "sample").inc()
        return part_id

    def _stored_row(self, part: ScoredPart, written: list[Path]) -> KeptPart:
        root = self.store.root
        if part.data is not None:
            sha = hashlib.sha256(part.data).hexdigest()
            image_name = f"images/{part.recorded_at:%Y-%m-%d}/{sha}{image_suffix(part.data)}"
            image_path = root / image_name
            if not image_path.exists():
                _write_file(image_path, part.data)
                written.append(image_path)
            source: Path = image_path
            image: str = image_name
            size = len(part.data)
        elif part.path is not None:
            source = part.path.resolve()
            sha, image, size = hashlib.sha256(source.read_bytes()).hexdigest(), str(source), 0
        else:
            raise ValueError(f"{part.name}: neither the image nor its path was given")
        heatmap = self._heatmap(part, source, f"heatmaps/{part.recorded_at:%Y-%m-%d}/{sha}.png")
        if heatmap is not None:
            written.append(root / heatmap)
            size += (root / heatmap).stat().st_size
        return KeptPart(
            recorded_at=part.recorded_at,
            part_type=part.part_type,
            model_version=part.inspector.model_version,
            registry_version=part.registry_version,
            name=part.name[:512],
            image=image,
            image_sha256=sha,
            stored_bytes=size,
            heatmap=heatmap,
            score=part.score,
            threshold=part.threshold,
            views=part.views,
            verdict=part.verdict,
            kept="flagged" if part.verdict == "anomalous" else "sample",
            sample_rate=part.sample_rate,
        )

    def _heatmap(self, part: ScoredPart, source: Path, name: str) -> str | None:
        """The heatmap overlay drawn by the model that scored the part (patch-mode bundles only)."""
        from inspector.heatmap import overlay, score_with_maps

        if part.inspector.bundle.mode != "patch":
            return None
        _, image_map, photo = score_with_maps(part.inspector, [source])[0]
        if image_map is None or photo is None:
            return None
        buf = io.BytesIO()
        overlay(photo, image_map, part.inspector.patch_threshold).save(buf, format="PNG")
        _write_file(self.store.root / name, buf.getvalue())
        return name

    @staticmethod
    def _remove(paths: Sequence[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def apply_retention(self, now: datetime | None = None) -> None:
        """Purge by age, then by the disk budget; a database or disk problem is counted, never raised."""
        self._last_retention = time.monotonic()
        try:
            stored = self.store.stored_parts()
            purge = parts_to_purge(stored, now or utcnow(), self.max_age, self.budget_bytes)
            for path in self.store.apply_purge(purge):
                path.unlink(missing_ok=True)
            self.metrics.purged.labels("age").inc(len(purge.old))
            self.metrics.purged.labels("disk").inc(len(purge.over_budget))
            gone = set(purge.old + purge.over_budget)
            self.metrics.stored_bytes.set(sum(p.stored_bytes for p in stored if p.id not in gone))
        except SQLAlchemyError as exc:
            self.failure("database", f"retention: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        except OSError as exc:
            self.failure("disk", f"retention: {exc}")


def _write_file(path: Path, data: bytes) -> None:
    """Write whole or not at all (temp name, then rename), so a full disk leaves no half image behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
