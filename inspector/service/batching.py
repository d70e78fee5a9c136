"""Requests that arrive while the model is busy are scored together, as one batch.

Why: on a line with several cameras every request carries one part. Scored one by one, each part pays a batch-1
forward pass on all cores, and passes running at once contend for the same cores; in one batch the forward pass
costs a fraction a part. No waiting window: a request that finds the model idle is scored at once (no latency is
added to a lone camera); only requests that queue behind a running batch are combined.

One request thread at a time leads: it scores batches from the head of the queue until its own images are done,
then hands the lead to the request at the head of what is left. No extra thread, nothing to start or stop.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inspector.engine import Inspector, ScoreResult


class _Pending:
    """One request's images, waiting for their results (or to be told to lead)."""

    def __init__(self, inspector: Inspector, images: list[Any]) -> None:
        self.inspector = inspector
        self.images = images
        self.results: list[ScoreResult] | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.wake = threading.Event()

    @property
    def done(self) -> bool:
        return self.results is not None or self.error is not None


class RequestBatcher:
    """Combines the images of concurrent requests into batches of at most ``max_images`` (1: every request alone)."""

    def __init__(self, max_images: int = 32, on_batch: Callable[[int, int], None] | None = None) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, not {max_images}")
        self.max_images = max_images
        self.on_batch = on_batch  # called with (requests, images) of every batch: the service's metrics
        self._lock = threading.Lock()
        self._queue: deque[_Pending] = deque()
        self._busy = False
        self.requests = 0  # requests scored so far, through whichever batch

    def score(self, inspector: Inspector, images: Sequence[Any]) -> list[ScoreResult]:
        """The results of ``images`` (in order) through ``inspector``, scored alone or with other requests' images;
        re-raises what scoring raised for a batch this request was in."""
        pending = _Pending(inspector, list(images))
        with self._lock:
            self._queue.append(pending)
            if not self._busy:
                self._busy = pending.lead = True
        while not pending.done:
            if not pending.lead:
                pending.wake.wait()
                pending.wake.clear()
                continue
            self._score_next()
        if pending.lead:
            self._hand_over()
        if pending.error is not None:
            raise pending.error
        assert pending.results is not None
        return pending.results

    def _take(self) -> list[_Pending]:
        """Requests from the head of the queue for one batch: one model, at most ``max_images`` images (at least one
        request)."""
        with self._lock:
            batch = [self._queue.popleft()]
            size = len(batch[0].images)
            while (
                self._queue
                and self._queue[0].inspector is batch[0].inspector
                and size + len(self._queue[0].images) <= self.max_images
            ):
                size += len(self._queue[0].images)
                batch.append(self._queue.popleft())
            self.requests += len(batch)
        return batch

    def _score_next(self) -> None:
        batch = self._take()
        images = [image for p in batch for image in p.images]
        if self.on_batch is not None:
            self.on_batch(len(batch), len(images))
        try:
            results = batch[0].inspector.score(images)
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:  # one odd request must not fail the others: each alone, so the error lands where it belongs
                for p in batch:
                    try:
                        p.results = p.inspector.score(p.images)
                    except BaseException as alone:
                        p.error = alone
        else:
            start = 0
            for p in batch:
                p.results = results[start : start + len(p.images)]
                start += len(p.images)
        for p in batch:
            if not p.lead:
                p.wake.set()

    def _hand_over(self) -> None:
        """The leader is done: the request now at the head of the queue leads, or nobody does when it is empty."""
        with self._lock:
            if self._queue:
                head = self._queue[0]
                head.lead = True
                head.wake.set()
            else:
                self._busy = False
