"""One app's review parts together: the store, the recorder that fills it, the token that guards the page.

Why: the service and the stand-alone page both hang a :class:`ReviewContext` on ``app.state.review``; the routes
get it by dependency injection and nothing lives at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from inspector.review.metrics import ReviewCollector
from inspector.review.recorder import Recorder, RecorderMetrics
from inspector.review.settings import RecordingSettings
from inspector.review.store import ReviewStore


@dataclass
class ReviewContext:
    store: ReviewStore
    recorder: Recorder | None
    token: SecretStr | None

    def start(self) -> None:
        if self.recorder is not None:
            self.recorder.start()

    def stop(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        self.store.close()


def open_review(
    settings: RecordingSettings,
    registry: CollectorRegistry | None = None,
    *,
    token: SecretStr | None = None,
    recording: bool = True,
) -> ReviewContext:
    """The store at the settings' database and folder, a recorder when ``recording``, metrics in ``registry``."""
    store = ReviewStore(settings.database_url(), settings.recording_dir())
    recorder = None
    if recording:
        recorder = Recorder(
            store,
            passed_rate=settings.record_passed,
            max_age=timedelta(days=settings.record_days),
            budget_bytes=int(settings.record_max_mb * 1024 * 1024),
            queue_size=settings.record_queue,
            metrics=RecorderMetrics(registry),
        )
    if registry is not None:
        registry.register(ReviewCollector(store))
    return ReviewContext(store, recorder, settings.reviewer_token or token)
