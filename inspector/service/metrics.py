"""Prometheus metrics of the service, and the middleware that counts every request.

Why: the line is watched from a dashboard, not a terminal. Requests by status, latency, images scored, anomalies,
the model served and the registry's state are what an operator alerts on; the recent flag rate beside the
threshold's calibrated false-reject rate shows a camera, lens or lighting change long before anyone reads the
rejects. Each app has a registry of its own, so several apps can live in one process (the tests do).
"""

import math
import threading
import time
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inspector.service.holder import LoadedModel

#: How many of the latest scored parts ``inspector_recent_flag_rate`` covers.
FLAG_WINDOW = 1000


class FlagWindow:
    """The share of the last ``FLAG_WINDOW`` verdicts that flagged a part, kept as they come and go (thread-safe)."""

    def __init__(self) -> None:
        self._flags: deque[bool] = deque(maxlen=FLAG_WINDOW)
        self._flagged = 0  # how many of ``_flags`` are True (no sum over the window)
        self._lock = threading.Lock()

    def add(self, flagged: list[bool]) -> float:
        """Count verdicts in; the rate now (NaN before the first)."""
        with self._lock:
            for flag in flagged:
                if len(self._flags) == FLAG_WINDOW:
                    self._flagged -= self._flags[0]
                self._flags.append(flag)
                self._flagged += flag
            return self._flagged / len(self._flags) if self._flags else math.nan

    def clear(self) -> None:
        with self._lock:
            self._flags.clear()
            self._flagged = 0


class ServiceMetrics:
    """Prometheus metrics in a registry of their own (one per app, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # memory, CPU seconds, open files of this process (Linux)
        PlatformCollector(registry=r)  # the Python build, for telling two line PCs apart
        self.requests = Counter(
            "inspector_http_requests",
            "HTTP requests by method, path and status",
            ["method", "path", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "inspector_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "path"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.images = Counter("inspector_images_scored", "images scored (a score was produced)", registry=r)
        self.image_errors = Counter(
            "inspector_image_errors", "images that could not be scored (per-item errors)", registry=r
        )
        self.anomalies = Counter("inspector_anomalies_flagged", "images scored above the threshold", registry=r)
        self.batches = Counter(
            "inspector_score_batches",
            "scoring batches run (requests that queued behind a running batch are combined into one)",
            registry=r,
        )
        self.batched_requests = Counter(
            "inspector_score_batched_requests",
            "requests scored in those batches (divided by inspector_score_batches_total: requests a batch)",
            registry=r,
        )
        self.model = Info("inspector_model", "the model being served", registry=r)
        self.ready = Gauge("inspector_model_ready", "1 while a verified model is loaded", registry=r)
        self.reloads = Counter("inspector_model_reloads", "model (re)loads by result", ["result"], registry=r)
        self.swaps = Counter("inspector_model_swaps", "times a loaded model was replaced by another", registry=r)
        self.client_disconnects = Counter(
            "inspector_client_disconnects", "requests whose client left before the body was complete", registry=r
        )
        self.served_version = Gauge(
            "inspector_model_registry_version", "registry version being served (0: not from the registry)", registry=r
        )
        self.registry_up = Gauge(
            "inspector_registry_up",
            "1 when the last registry request succeeded, 0 when it could not be made",
            registry=r,
        )
        self.registry_last_success = Gauge(
            "inspector_registry_last_success_timestamp_seconds", "time of the last successful registry poll", registry=r
        )
        self.registry_latest = Gauge(
            "inspector_registry_latest_version", "version the alias points to at the last poll", registry=r
        )
        self.registry_polls = Counter(
            "inspector_registry_polls", "alias look-ups by result (ok, unreachable, error)", ["result"], registry=r
        )
        self.registry_refused = Gauge(
            "inspector_registry_refused_version", "registry version refused last (0: none pending)", registry=r
        )
        self.recent_flag_rate = Gauge(
            "inspector_recent_flag_rate",
            f"share of the served model's last {FLAG_WINDOW} scored parts it flagged (NaN before the first)",
            registry=r,
        )
        self.calibrated_frr = Gauge(
            "inspector_model_calibrated_false_reject_rate",
            "false-reject rate the served model's threshold realised on its calibration goods (NaN: not recorded)",
            registry=r,
        )
        self.calibrated_frr_upper = Gauge(
            "inspector_model_false_reject_rate_upper95",
            "one-sided 95 % upper bound on the served "
            "model's true false-reject rate from its calibration (NaN: not recorded)",
            registry=r,
        )
        # each part type's own figures (a service of several part types; one label value for a single bundle)
        self.part_images = Counter("inspector_part_images_scored", "images scored, by part type", ["part"], registry=r)
        self.part_image_errors = Counter(
            "inspector_part_image_errors", "images that could not be scored, by part type", ["part"], registry=r
        )
        self.part_anomalies = Counter(
            "inspector_part_anomalies_flagged", "images scored above the threshold, by part type", ["part"], registry=r
        )
        self.part_model = Info("inspector_part_model", "the model served for each part type", ["part"], registry=r)
        self.part_swaps = Counter(
            "inspector_part_model_swaps", "times a part type's model was replaced by another", ["part"], registry=r
        )
        self.part_flag_rate = Gauge(
            "inspector_part_recent_flag_rate",
            f"share of each part type's last {FLAG_WINDOW} scored parts flagged (NaN before the first)",
            ["part"],
            registry=r,
        )
        self.part_frr_upper = Gauge(
            "inspector_part_false_reject_rate_upper95",
            "one-sided 95 % bound on each part type's false-reject rate from its calibration (a few-shot part's "
            "few goods give a wide one; NaN: not recorded)",
            ["part"],
            registry=r,
        )
        self._flags = FlagWindow()
        self._part_flags: dict[str, FlagWindow] = {}
        self._part_loaded: dict[str, int] = {}
        self.recent_flag_rate.set(math.nan)
        self._loaded = 0

    def batch_scored(self, requests: int, images: int) -> None:
        """The batcher's hook: one scoring batch of ``requests`` requests (``images`` images in all) ran."""
        self.batches.inc()
        self.batched_requests.inc(requests)

    def parts_scored(self, flagged: list[bool]) -> None:
        """Count the verdicts into the recent flag rate. Why: a camera, lens or lighting change shows up as a flag
        rate far above what the threshold was calibrated for (``calibrated_frr`` plus the line's defect rate) long
        before anyone reads the rejects; an alert on the ratio catches it within one window."""
        rate = self._flags.add(flagged)
        if not math.isnan(rate):
            self.recent_flag_rate.set(rate)

    def part_scored(self, part: str, flagged: list[bool], errors: int) -> None:
        """One request's figures for its part type: images scored, per-item errors, flags and the part's flag rate."""
        self.part_images.labels(part).inc(len(flagged))
        self.part_image_errors.labels(part).inc(errors)
        self.part_anomalies.labels(part).inc(sum(flagged))
        rate = self._part_flags.setdefault(part, FlagWindow()).add(flagged)
        if not math.isnan(rate):
            self.part_flag_rate.labels(part).set(rate)

    def part_loaded(self, part: str, model: LoadedModel) -> None:
        """A part type's holder hook: its model info, its calibration bound, a fresh flag rate, a swap counted."""
        self.part_model.labels(part).info(_model_info(model))
        self.part_frr_upper.labels(part).set(_detail(model, "frr_upper_95"))
        self._part_flags.setdefault(part, FlagWindow()).clear()
        self.part_flag_rate.labels(part).set(math.nan)
        if self._part_loaded.get(part, 0):
            self.part_swaps.labels(part).inc()
        self._part_loaded[part] = self._part_loaded.get(part, 0) + 1

    def model_loaded(self, model: LoadedModel) -> None:
        """The holder's hook: ``model`` is now served (its info, calibration gauges, a fresh flag rate)."""
        self.model.info(_model_info(model))
        self.ready.set(1)
        self.served_version.set(version_number(model.registry_version))
        for gauge, key in ((self.calibrated_frr, "false_reject_rate"), (self.calibrated_frr_upper, "frr_upper_95")):
            gauge.set(_detail(model, key))
        self._flags.clear()  # a new model's rate starts afresh
        self.recent_flag_rate.set(math.nan)
        if self._loaded:
            self.swaps.inc()
        self._loaded += 1

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text page and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _model_info(model: LoadedModel) -> dict[str, str]:
    """What ``inspector_model_info`` (and each part type's ``inspector_part_model_info``) says of a model."""
    return {
        "version": model.version,
        "bundle": str(model.bundle),
        "model_uri": model.model_uri or "",
        "registry_version": model.registry_version or "",
    }


def _detail(model: LoadedModel, key: str) -> float:
    """A number the model's threshold recorded from its calibration (NaN where it recorded none)."""
    value = model.inspector.bundle.spec.threshold.details.get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def version_number(version: str | None) -> float:
    """A registry version as a gauge value (0: none, or not a number)."""
    try:
        return float(version) if version is not None else 0.0
    except ValueError:
        return 0.0


#: Paths that get their own metric label; anything else is counted as "other" (bounded label cardinality).
ROUTES = ("/v1/score", "/v1/reload", "/healthz", "/readyz", "/metrics")
#: A part type's routes (``/v1/parts/<part>/score``) are labelled by their template, never by the part's name.
PART_ROUTES = {"score": "/v1/parts/{part}/score", "reload": "/v1/parts/{part}/reload"}


class MetricsMiddleware:
    """Counts every request by status (413s and 401s included) and times it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in ROUTES else _part_route(path)
        method = scope.get("method", "")
        status = 500
        start = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(method, label, str(status)).inc()
            self.metrics.latency.labels(method, label).observe(time.perf_counter() - start)


def _part_route(path: str) -> str:
    """``/v1/parts/<part>/score`` as its template (bounded label cardinality), anything else ``other``."""
    pieces = path.split("/")
    if len(pieces) == 5 and pieces[:3] == ["", "v1", "parts"] and pieces[4] in PART_ROUTES:
        return PART_ROUTES[pieces[4]]
    return "other"
