"""The production-line HTTP service (FastAPI + uvicorn, one model per process):
``inspector serve --bundle PATH`` or ``inspector serve --model-uri models:/<name>@champion --tracking-uri URL``.

```
POST /v1/score    one or many images (multipart field ``files``, or one raw ``image/*`` body) -> verdicts
POST /v1/reload   load + verify a bundle or registry model off to the side, then swap it in atomically
GET  /healthz     the process is alive
GET  /readyz      200 only while a verified model is loaded (reports its version and the registry's state)
GET  /metrics     Prometheus text: requests by status, latency, images scored, anomalies, model version, registry
```

From the registry (:mod:`inspector.registry`, urllib only): at start the alias is resolved and the version
downloaded, verified and cached; with the registry down, the version last served from the cache is served and
``/readyz`` says so. A :class:`RegistryWatcher` thread re-resolves the alias every ``poll_seconds``; a new version
is fetched, verified and smoke-tested off to the side, then swapped in; a version that fails is refused (the old
model keeps serving) and retried only after an exponential back-off. The line never stops because the registry
blinked, and a bad version never reaches it.

Rules (``../shared/DESIGN.md``, "Reliability rules"): a bad image fails that item with an error naming it, never
the request; a request where every image is bad is a 422 with the reasons; too big is a 413; nothing here turns
bad input into a 500. A reload builds a complete new :class:`~inspector.engine.Inspector` (hashes verified, ORT
session created, one smoke inference) before a single reference assignment swaps it in; requests already running
keep the object they started with, and a failed load leaves the old model serving.

This module is the only part of ``inspector`` that needs the ``serve`` extra (fastapi, uvicorn,
prometheus-client, python-multipart); ``import inspector`` and the CLI import it only when serving.
"""

import hmac
import json
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from inspector.batching import RequestBatcher
from inspector.engine import Inspector
from inspector.errors import BundleError, ImageError, InspectorError
from inspector.registry import (
    BundleCache,
    FetchedBundle,
    ModelVersionRef,
    RegistryClient,
    RegistryError,
    RegistrySource,
    RegistryUnreachable,
    default_cache_dir,
    parse_model_uri,
)

log = logging.getLogger("inspector.service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Paths that get their own metric label; anything else is counted as "other" (bounded label cardinality).
_ROUTES = ("/v1/score", "/v1/reload", "/healthz", "/readyz", "/metrics")
_ENV_PREFIX = "INSPECTOR_"


# --------------------------------------------------------------------------------------------------- settings


class _Model(BaseModel):
    model_config = ConfigDict(protected_namespaces=())  # fields named model_version / model_uri are ours


class ServiceSettings(_Model):
    """Everything ``inspector serve`` needs; defaults work, env vars (``INSPECTOR_*``) and CLI flags override."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    bundle: Path | None = Field(None, description="bundle directory to serve")
    model_uri: str | None = Field(None, description="registry model to serve and follow (models:/<name>@champion)")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server (http://host:5000); env MLFLOW_TRACKING_URI too"
    )
    poll_seconds: float = Field(30.0, ge=0, description="how often to re-resolve the alias (0: never)")
    cache_dir: Path | None = Field(None, description="verified registry bundles (default ~/.cache/inspector/registry)")
    registry_timeout: float = Field(10.0, gt=0, description="seconds per registry request")
    token: SecretStr | None = Field(None, description="bearer token required on /v1/score and /v1/reload")
    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest request body accepted (413 above)")
    max_images: int = Field(64, gt=0, description="most images in one request (413 above)")
    threads: int | None = Field(
        None, ge=0, description="onnxruntime intra-op threads (None: INSPECTOR_THREADS or all cores)"
    )
    combine_images: int = Field(
        32,
        ge=1,
        description="requests queued behind a running batch are scored together, up to this many "
        "images (1: every request alone)",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @model_validator(mode="after")
    def _token_not_blank(self) -> "ServiceSettings":
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("token is empty: leave it unset to disable auth")
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServiceSettings":
        """Defaults, then ``INSPECTOR_<FIELD>`` env vars, then the non-None ``overrides`` (CLI flags)."""
        values: dict[str, Any] = {}
        mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if mlflow_uri.startswith(
            ("http://", "https://")
        ):  # the MLflow convention; INSPECTOR_TRACKING_URI wins. A local
            values["tracking_uri"] = mlflow_uri  # sqlite/file store there is the training stack's, not ours: ignored
        for name in cls.model_fields:
            env = os.environ.get(_ENV_PREFIX + name.upper())
            if env not in (None, ""):
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
            raise InspectorError(f"invalid service settings: {problems}") from None

    def check_source(self) -> None:
        """Fail at startup, with a message an operator can act on, when there is nothing we can load."""
        if self.bundle is not None and self.model_uri is not None:
            raise InspectorError(
                "give either --bundle or --model-uri, not both (INSPECTOR_BUNDLE / INSPECTOR_MODEL_URI)"
            )
        if self.model_uri is not None:
            parse_model_uri(self.model_uri)
            if not self.tracking_uri:
                raise InspectorError(
                    f"{self.model_uri}: serving from the registry needs --tracking-uri URL (or MLFLOW_TRACKING_URI)"
                )
            self.registry_source()
        elif self.bundle is None:
            raise InspectorError(
                "no model to serve: pass --bundle PATH or --model-uri models:/<name>@champion "
                "(or set INSPECTOR_BUNDLE / INSPECTOR_MODEL_URI)"
            )

    def registry_source(self) -> RegistrySource | None:
        """The registry client and bundle cache, when a tracking URI is configured."""
        if not self.tracking_uri:
            return None
        return RegistrySource(
            RegistryClient(self.tracking_uri, timeout=self.registry_timeout),
            BundleCache(self.cache_dir or default_cache_dir()),
        )


# ------------------------------------------------------------------------------------------------ model holder


@dataclass(frozen=True)
class LoadedModel:
    """One verified, ready-to-score model and where it came from; replaced as a whole, never mutated."""

    inspector: Inspector
    bundle: Path
    loaded_at: float
    model_uri: str | None = None  # set when it came from the registry
    registry_version: str | None = None

    @property
    def version(self) -> str:
        return self.inspector.model_version


class ModelHolder:
    """Holds the model being served and swaps in a new one atomically.

    ``current`` is a single reference: a request reads it once and scores with that object to the end, so a
    reload never changes the model under a running request. :meth:`load` builds and smoke-tests the new model
    completely before the one assignment that publishes it; if anything fails, the old model keeps serving.
    """

    def __init__(self, settings: ServiceSettings, registry: RegistrySource | None = None) -> None:
        self.settings = settings
        self.registry = registry or settings.registry_source()
        self._current: LoadedModel | None = None
        self._swap_lock = threading.Lock()  # guards the assignment (and reads that need a consistent pair)
        self._load_lock = threading.Lock()  # one load at a time; scoring never waits on it
        self.last_error: str | None = None
        self._listeners: list[Callable[[LoadedModel], None]] = []

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def on_swap(self, listener: Callable[[LoadedModel], None]) -> None:
        self._listeners.append(listener)
        if self._current is not None:
            listener(self._current)

    def _build(self, path: Path, fetched: FetchedBundle | None = None) -> LoadedModel:
        inspector = Inspector.from_bundle(path, threads=self.settings.threads)  # verifies hashes, schema, dims
        pre = inspector.bundle.spec.preprocessing
        probe = Image.new("RGB", (pre.width, pre.height), tuple(int(round(m * 255)) for m in pre.mean))
        result = inspector.score([probe])[0]  # the whole path once: decode-free preprocess, ORT run, kNN
        if result.error is not None or result.score is None or not math.isfinite(result.score):
            raise BundleError(f"{path}: smoke inference failed ({result.error or f'score {result.score!r}'})")
        return LoadedModel(
            inspector=inspector,
            bundle=path,
            loaded_at=time.time(),
            model_uri=fetched.uri if fetched else None,
            registry_version=fetched.version if fetched else None,
        )

    def load(
        self, bundle: str | Path | None = None, *, model_uri: str | None = None, resolved: ModelVersionRef | None = None
    ) -> tuple[LoadedModel | None, LoadedModel]:
        """Load ``bundle`` or the registry model ``model_uri`` (``resolved``: its version, already looked up),
        verify it, then swap it in. With neither, re-load from where the served model came from.

        Returns (previous, new). Raises :class:`InspectorError` (old model untouched) when the new one is bad, and
        :class:`~inspector.registry.RegistryUnreachable` when the registry cannot be asked.
        """
        with self._load_lock:
            current = self._current
            if bundle is None and model_uri is None:
                if current is not None:
                    model_uri, bundle = current.model_uri, None if current.model_uri else current.bundle
                else:
                    model_uri, bundle = self.settings.model_uri, self.settings.bundle
            fetched = self._fetch(model_uri, resolved) if model_uri is not None else None
            if fetched is None and bundle is None:
                raise InspectorError("no bundle to load: give a bundle path or a model URI")
            return self._swap_in(fetched.path if fetched else Path(bundle), fetched)  # type: ignore[arg-type]

    def load_cached(self, fetched: FetchedBundle) -> tuple[LoadedModel | None, LoadedModel]:
        """Serve a version from the local cache (the registry is down at startup)."""
        with self._load_lock:
            return self._swap_in(fetched.path, fetched)

    def _fetch(self, model_uri: str, resolved: ModelVersionRef | None) -> FetchedBundle:
        if self.registry is None:
            raise InspectorError(
                f"{model_uri}: no registry configured: start the service with --tracking-uri URL (or MLFLOW_TRACKING_URI)"
            )
        try:
            return self.registry.fetch(model_uri, resolved)
        except InspectorError as exc:
            self.last_error = str(exc)
            raise

    def _swap_in(self, path: Path, fetched: FetchedBundle | None) -> tuple[LoadedModel | None, LoadedModel]:
        try:
            new = self._build(path, fetched)
        except InspectorError as exc:
            if fetched is None:
                self.last_error = str(exc)
                raise
            self.last_error = f"{fetched.uri} (version {fetched.version}): {exc}"
            raise BundleError(self.last_error) from exc
        except Exception as exc:  # onnxruntime / numpy errors on a bad model file: still the bundle's fault
            self.last_error = f"{path}: cannot load model ({type(exc).__name__}: {exc})"
            raise BundleError(self.last_error) from exc
        with self._swap_lock:
            previous, self._current = self._current, new
        self.last_error = None
        if fetched is not None and self.registry is not None:
            self.registry.cache.remember(fetched.uri, fetched.version)
        for listener in self._listeners:  # still under the load lock: metrics follow swaps in order
            listener(new)
        log.info(
            "serving %s from %s (was %s)", describe(new), new.bundle, describe(previous) if previous else "nothing"
        )
        return previous, new


def describe(model: LoadedModel) -> str:
    """``tiny:run-id`` or, from the registry, ``models:/parts@champion version 3 (parts:run-id)``."""
    if model.model_uri:
        return f"{model.model_uri} version {model.registry_version} ({model.version})"
    return model.version


# ---------------------------------------------------------------------------------------------------- metrics


#: How many of the latest scored parts ``inspector_recent_flag_rate`` covers.
FLAG_WINDOW = 1000


class ServiceMetrics:
    """Prometheus metrics in a registry of their own (one per app, so several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self._flags: deque[bool] = deque(maxlen=FLAG_WINDOW)
        self._flagged = 0  # how many of ``_flags`` are True, kept as they come and go (no sum over the window)
        self._flags_lock = threading.Lock()
        self.recent_flag_rate.set(math.nan)
        self._loaded = 0

    def batch_scored(self, requests: int, images: int) -> None:
        self.batches.inc()
        self.batched_requests.inc(requests)

    def parts_scored(self, flagged: list[bool]) -> None:
        """Count the verdicts into the recent flag rate. Why: a camera, lens or lighting change shows up as a flag
        rate far above what the threshold was calibrated for (``calibrated_frr`` plus the line's defect rate) long
        before anyone reads the rejects; an alert on the ratio catches it within one window."""
        with self._flags_lock:
            for flag in flagged:
                if len(self._flags) == FLAG_WINDOW:
                    self._flagged -= self._flags[0]
                self._flags.append(flag)
                self._flagged += flag
            if self._flags:
                self.recent_flag_rate.set(self._flagged / len(self._flags))

    def model_loaded(self, model: LoadedModel) -> None:
        self.model.info(
            {
                "version": model.version,
                "bundle": str(model.bundle),
                "model_uri": model.model_uri or "",
                "registry_version": model.registry_version or "",
            }
        )
        self.ready.set(1)
        self.served_version.set(_version_number(model.registry_version))
        details = model.inspector.bundle.spec.threshold.details
        for gauge, key in ((self.calibrated_frr, "false_reject_rate"), (self.calibrated_frr_upper, "frr_upper_95")):
            value = details.get(key)
            gauge.set(float(value) if isinstance(value, (int, float)) else math.nan)
        with self._flags_lock:  # a new model's rate starts afresh
            self._flags.clear()
            self._flagged = 0
            self.recent_flag_rate.set(math.nan)
        if self._loaded:
            self.swaps.inc()
        self._loaded += 1

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _version_number(version: str | None) -> float:
    try:
        return float(version) if version is not None else 0.0
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------- the poller


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class _Refusal:
    error: str
    failures: int
    retry_at: float


class RegistryWatcher:
    """Follows ``settings.model_uri``: loads it at start (from the cache when the registry is down), re-resolves
    it every ``poll_seconds`` and hot-swaps a new version through the :class:`ModelHolder`.

    A version that cannot be fetched, verified or smoke-tested is refused and retried only after
    ``poll_seconds * 2**failures`` (capped at ``max_backoff``): never a hot loop of downloads. Registry
    health (up, unreachable since, last success, last error) is kept here for ``/readyz`` and ``/metrics``.
    """

    def __init__(
        self,
        holder: ModelHolder,
        metrics: ServiceMetrics,
        uri: str,
        poll_seconds: float,
        *,
        max_backoff: float = 3600.0,
    ) -> None:
        self.holder, self.metrics, self.uri = holder, metrics, uri
        self.poll_seconds = poll_seconds
        self.max_backoff = max(max_backoff, poll_seconds)
        self.up: bool | None = None
        self.unreachable_since: float | None = None
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.latest_version: str | None = None
        self.applied_version: str | None = None
        self.refused: dict[str, _Refusal] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        holder.on_swap(self._swapped)

    def _swapped(self, model: LoadedModel) -> None:
        if model.model_uri == self.uri:  # a reload of our URI counts as applied; a manual bundle does not
            self.applied_version = model.registry_version
            self.refused.pop(model.registry_version or "", None)
            self.metrics.registry_refused.set(0)

    # -- health bookkeeping

    def _reachable(self) -> None:
        if self.up is False:
            log.info("registry reachable again (was unreachable since %s)", _iso(self.unreachable_since))
        self.up, self.unreachable_since, self.last_success = True, None, time.time()
        self.metrics.registry_up.set(1)
        self.metrics.registry_last_success.set(self.last_success)

    def _unreachable(self, exc: Exception) -> None:
        if self.up is not False:
            log.warning("registry unreachable, still serving %s: %s", self._served(), exc)
            self.unreachable_since = time.time()
        self.up = False
        self.last_error = str(exc)
        self.metrics.registry_up.set(0)

    def _served(self) -> str:
        current = self.holder.current
        return describe(current) if current else "nothing"

    # -- loading

    def initial_load(self) -> LoadedModel:
        """Fetch and serve the model at start; if that fails and a verified cached version is known, serve it."""
        try:
            self.holder.load(model_uri=self.uri)
        except InspectorError as exc:
            registry = self.holder.registry
            cached = registry.cached_for(self.uri) if registry is not None else None
            if cached is None:
                where = f" in {registry.cache.root}" if registry is not None else ""
                raise type(exc)(f"{exc}; no verified cached version to fall back on{where}") from exc
            if isinstance(exc, RegistryUnreachable):
                self._unreachable(exc)
            else:  # it answered, but what it points to is bad: serve the last good version, say why
                self._reachable()
                self._note_error(exc)
            self.holder.load_cached(cached)
            log.warning("serving cached version %s of %s: %s", cached.version, self.uri, exc)
        else:
            self._reachable()
        assert self.holder.current is not None
        self.latest_version = self.latest_version or self.holder.current.registry_version
        self.metrics.registry_latest.set(_version_number(self.latest_version))
        return self.holder.current

    def _note_error(self, exc: Exception) -> None:
        if str(exc) != self.last_error:
            log.error("registry model %s not served, still serving %s: %s", self.uri, self._served(), exc)
        self.last_error = str(exc)

    def poll_once(self) -> None:
        """Re-resolve the URI; swap in a new version when it changed and is not waiting out a back-off."""
        client = self.holder.registry.client if self.holder.registry else None
        if client is None:
            return
        try:
            ref = client.resolve(self.uri)
        except RegistryUnreachable as exc:
            self.metrics.registry_polls.labels("unreachable").inc()
            self._unreachable(exc)
            return
        except RegistryError as exc:  # it answered: unknown alias/model now (deleted?). Keep serving, say so.
            self.metrics.registry_polls.labels("error").inc()
            self._reachable()
            self._note_error(exc)
            return
        self.metrics.registry_polls.labels("ok").inc()
        self._reachable()
        self.latest_version = ref.version
        self.metrics.registry_latest.set(_version_number(ref.version))
        if ref.version == self.applied_version:
            self.last_error = None
            self.metrics.registry_refused.set(0)
            return
        refusal = self.refused.get(ref.version)
        if refusal is not None and time.time() < refusal.retry_at:
            return
        try:
            _, new = self.holder.load(model_uri=self.uri, resolved=ref)
        except RegistryUnreachable as exc:  # died mid-download: not the version's fault
            self.metrics.reloads.labels("failed").inc()
            self._unreachable(exc)
            return
        except InspectorError as exc:
            self.metrics.reloads.labels("failed").inc()
            failures = refusal.failures + 1 if refusal else 1
            delay = min(self.poll_seconds * 2**failures, self.max_backoff)
            self.refused[ref.version] = _Refusal(str(exc), failures, time.time() + delay)
            self.metrics.registry_refused.set(_version_number(ref.version))
            self.last_error = f"version {ref.version} refused (attempt {failures}, next try in {delay:.0f} s): {exc}"
            log.error("%s; still serving %s", self.last_error, self._served())
            return
        self.metrics.reloads.labels("ok").inc()
        self.last_error = None
        log.info("registry: now serving %s", describe(new))

    # -- the thread

    def start(self) -> None:
        if self.poll_seconds <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # the poller must outlive any surprise; the model keeps serving
                log.exception("registry poll failed unexpectedly")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def report(self) -> "RegistryReport":
        current = self.holder.current
        if self.up is False:
            state, detail = "unreachable", f"unreachable since {_iso(self.unreachable_since)}"
        else:
            state, detail = ("reachable", "ok") if self.up else ("unknown", "not asked yet")
        if self.last_error and self.up is not False:
            detail = f"{detail}; {self.last_error}"
        return RegistryReport(
            uri=self.uri,
            status=state,
            detail=detail,
            unreachable_since=_iso(self.unreachable_since),
            last_success=_iso(self.last_success),
            latest_version=self.latest_version,
            served_version=current.registry_version if current else None,
            error=self.last_error,
            refused_versions=sorted(self.refused, key=_version_number),
        )


# ------------------------------------------------------------------------------------------ ASGI middlewares


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:

    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: declared (Content-Length) or counted as it streams (chunked uploads).

    The rest of an oversized body is read and dropped (up to ``drain_bytes``) before answering, so an ordinary
    client that writes its whole request before reading sees the 413 instead of a reset connection.
    """

    def __init__(
        self, app: Callable[..., Awaitable[None]], max_bytes: int, drain_bytes: int = 64 * 1024 * 1024
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes

    def _detail(self, size: str) -> dict[str, Any]:
        return {
            "detail": f"request body {size} is over the limit of {self.max_bytes} bytes",
            "errors": None,
            "model_version": None,
        }

    async def _drain(self, receive: Receive, more: bool) -> None:
        drained = 0
        while more and drained < self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(
                    send, 400, {"detail": "invalid Content-Length header", "errors": None, "model_version": None}
                )
                return
            if int(declared) > self.max_bytes:
                await self._drain(receive, True)
                await _send_json(send, 413, self._detail(f"of {int(declared)} bytes"))
                return

        received = 0
        responded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, responded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not responded:
                        await self._drain(receive, message.get("more_body", False))
                        responded = True
                        await _send_json(send, 413, self._detail(f"of more than {self.max_bytes} bytes"))
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if responded:
                return  # the 413 has gone out: whatever the app makes of the aborted body is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not responded:
                raise


class MetricsMiddleware:
    """Counts every request by status (413s and 401s included) and times it."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in _ROUTES else "other"
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


# ----------------------------------------------------------------------------------------- request / response


class ImageScore(_Model):
    """The verdict for one image; ``error`` (naming the image) is set and score/verdict are null when it failed."""

    name: str
    score: float | None
    threshold: float
    verdict: Literal["good", "anomalous"] | None
    error: str | None = None
    views: dict[str, float] | None = None  # with a whole-part score: "patch" and "part", in the threshold's units


class ScoreResponse(_Model):
    model_version: str
    latency_ms: float
    results: list[ImageScore]
    registry_version: str | None = None  # the registry version that scored, when served from the registry


class ErrorResponse(_Model):
    detail: str
    errors: list[ImageScore] | None = None
    model_version: str | None = None


class ReloadRequest(_Model):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    bundle: str | None = Field(
        None, description="bundle directory; omitted (with model_uri): re-load from where the served model came from"
    )
    model_uri: str | None = Field(
        None, description="registry model (models:/<name>@<alias> or models:/<name>/<version>)"
    )


class ReloadResponse(_Model):
    model_version: str
    previous_version: str | None
    bundle: str
    registry_version: str | None = None


class HealthResponse(_Model):
    status: Literal["ok"]


class RegistryReport(_Model):
    """The registry as this service last saw it; ``status`` unreachable does not make the service unready."""

    uri: str
    status: Literal["reachable", "unreachable", "unknown"]
    detail: str
    unreachable_since: str | None = None
    last_success: str | None = None
    latest_version: str | None = None
    served_version: str | None = None
    error: str | None = None
    refused_versions: list[str] = []


class ReadyResponse(_Model):
    status: Literal["ready", "not ready"]
    model_version: str | None = None
    bundle: str | None = None
    error: str | None = None
    model_uri: str | None = None
    registry_version: str | None = None
    registry: RegistryReport | None = None


# ------------------------------------------------------------------------------------------------ dependencies


def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


def get_model(holder: ModelHolder = Depends(get_holder)) -> LoadedModel:
    """The model for this request: read once, kept to the end even if a reload swaps the holder meanwhile."""
    model = holder.current
    if model is None:
        raise HTTPException(503, detail="no model loaded yet")
    return model


def require_token(request: Request) -> None:
    token: SecretStr | None = request.app.state.settings.token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise HTTPException(401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def _error(
    status: int,
    detail: str,
    *,
    errors: list[ImageScore] | None = None,
    model_version: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(detail=detail, errors=errors, model_version=model_version)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------- scoring


@dataclass
class _Upload:
    name: str
    data: bytes | None
    error: str | None = None


def _score_uploads(model: LoadedModel, uploads: list[_Upload], batcher: RequestBatcher) -> list[ImageScore]:
    """Decode and score (synchronous: runs in the threadpool), with other requests' images when they queue up
    together (``batcher``). Every upload gets a result, in order."""
    inspector = model.inspector
    threshold = inspector.threshold
    results: list[ImageScore | None] = [None] * len(uploads)
    decoded: list[tuple[int, Image.Image]] = []
    for i, up in enumerate(uploads):
        if up.error is None:
            try:
                decoded.append((i, inspector.embedder.preprocessor.load(up.data or b"", name=up.name, keep_gray=True)))
                continue
            except ImageError as exc:
                up.error = str(exc)
        results[i] = ImageScore(name=up.name, score=None, threshold=threshold, verdict=None, error=up.error)

    def fill(index: int, r: Any) -> None:
        name = uploads[index].name
        if r.error is not None or r.score is None:
            reason = (r.error or "no score").split(": ", 1)[-1]
            results[index] = ImageScore(
                name=name, score=None, threshold=threshold, verdict=None, error=f"{name}: {reason}"
            )
        else:
            results[index] = ImageScore(
                name=name,
                score=r.score,
                threshold=threshold,
                verdict="anomalous" if r.anomalous else "good",
                views=r.views,
            )

    if decoded:
        try:
            for (i, _), r in zip(decoded, batcher.score(inspector, [img for _, img in decoded])):
                fill(i, r)
        except Exception:  # one odd image must not sink the others: score them one by one to find it
            for i, img in decoded:
                try:
                    fill(i, inspector.score([img])[0])
                except Exception as exc:
                    name = uploads[i].name
                    results[i] = ImageScore(
                        name=name,
                        score=None,
                        threshold=threshold,
                        verdict=None,
                        error=f"{name}: cannot score image ({type(exc).__name__}: {exc})",
                    )
    return [r for r in results if r is not None]


async def _read_uploads(request: Request, settings: ServiceSettings) -> list[_Upload] | JSONResponse:
    """The images of a request: multipart field ``files`` (one or many), or one raw ``image/*`` body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [_Upload(name=request.query_params.get("name") or "<body>", data=await request.body())]
    if content_type != "multipart/form-data":
        return _error(415, "send images as multipart/form-data (field 'files') or one raw image/* body")
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images + 16)
    except StarletteHTTPException as exc:
        status = 413 if "too many files" in str(exc.detail).lower() else 400
        detail = (
            f"{exc.detail} (at most {settings.max_images} images per request)"
            if status == 413
            else f"malformed multipart body: {exc.detail}"
        )
        return _error(status, detail)
    uploads: list[_Upload] = []
    try:
        for i, item in enumerate(form.getlist("files")):
            if isinstance(item, UploadFile):
                name = item.filename or f"<file {i}>"
                uploads.append(_Upload(name=name, data=await item.read()))
            else:
                uploads.append(
                    _Upload(
                        name=f"<field {i}>",
                        data=None,
                        error=f"<field {i}>: not a file upload (send the image as a file)",
                    )
                )
    finally:
        await form.close()
    if not uploads:
        return _error(422, "no images: send one or more files in the multipart field 'files'")
    if len(uploads) > settings.max_images:
        return _error(413, f"{len(uploads)} images is over the limit of {settings.max_images} per request")
    return uploads


# -------------------------------------------------------------------------------------------------- the app


def create_app(settings: ServiceSettings, holder: ModelHolder | None = None) -> FastAPI:
    """The service for ``settings``; the model is loaded at startup (lifespan) unless ``holder`` already has one."""
    settings.check_source()
    holder = holder or ModelHolder(settings)
    metrics = ServiceMetrics()
    holder.on_swap(metrics.model_loaded)
    batcher = RequestBatcher(settings.combine_images, on_batch=metrics.batch_scored)
    watcher = (
        RegistryWatcher(holder, metrics, settings.model_uri, settings.poll_seconds) if settings.model_uri else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if holder.current is None:
            await run_in_threadpool(load_initial_model, app)
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            if watcher is not None:
                await run_in_threadpool(watcher.stop, settings.registry_timeout * 3)

    app = FastAPI(title="inspector", summary="Score part images against golden references", lifespan=lifespan)
    app.state.settings = settings
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.watcher = watcher
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: sees the 413s too

    multipart_doc: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["files"],
                        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    },
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }
    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)
    }

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=error_responses,
        openapi_extra=multipart_doc,
        dependencies=[Depends(require_token)],
    )
    async def score(request: Request, model: LoadedModel = Depends(get_model)) -> Any:
        """Score one or many images; a bad image gets an error naming it, the others are scored."""
        start = time.perf_counter()
        uploads = await _read_uploads(request, settings)
        if isinstance(uploads, JSONResponse):
            return uploads
        results = await run_in_threadpool(_score_uploads, model, uploads, batcher)
        scored = [r for r in results if r.error is None]
        metrics.images.inc(len(scored))
        metrics.image_errors.inc(len(results) - len(scored))
        metrics.anomalies.inc(sum(r.verdict == "anomalous" for r in scored))
        metrics.parts_scored([r.verdict == "anomalous" for r in scored])
        if not scored:
            reasons = "; ".join(r.error or "" for r in results)
            return _error(422, f"no image could be scored: {reasons}", errors=results, model_version=model.version)
        return ScoreResponse(
            model_version=model.version,
            latency_ms=round((time.perf_counter() - start) * 1000, 3),
            results=results,
            registry_version=model.registry_version,
        )

    @app.post(
        "/v1/reload", response_model=ReloadResponse, responses=error_responses, dependencies=[Depends(require_token)]
    )
    async def reload(body: ReloadRequest | None = None) -> Any:
        """Load and verify a bundle or registry model off to the side, then swap it in; on failure the old model
        keeps serving (422 bad model, 503 registry unreachable)."""
        body = body or ReloadRequest()
        if body.bundle is not None and body.model_uri is not None:
            return _error(422, "give either bundle or model_uri, not both")
        try:
            previous, new = await run_in_threadpool(lambda: holder.load(body.bundle, model_uri=body.model_uri))
        except InspectorError as exc:
            metrics.reloads.labels("failed").inc()
            current = holder.current
            log.warning("reload failed, still serving %s: %s", describe(current) if current else "nothing", exc)
            status = 503 if isinstance(exc, RegistryUnreachable) else 422
            return _error(
                status,
                f"reload failed, still serving the previous model: {exc}",
                model_version=current.version if current else None,
            )
        metrics.reloads.labels("ok").inc()
        return ReloadResponse(
            model_version=new.version,
            previous_version=previous.version if previous else None,
            bundle=str(new.bundle),
            registry_version=new.registry_version,
        )

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def readyz() -> Any:
        model = holder.current
        registry = watcher.report() if watcher is not None else None
        if model is None:
            body = ReadyResponse(
                status="not ready", error=holder.last_error or "model not loaded yet", registry=registry
            )
            return JSONResponse(body.model_dump(), status_code=503)
        return ReadyResponse(
            status="ready",
            model_version=model.version,
            bundle=str(model.bundle),
            model_uri=model.model_uri,
            registry_version=model.registry_version,
            registry=registry,
            error=registry.error if registry is not None else None,
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        payload, content_type = metrics.render()
        return PlainTextResponse(payload, media_type=content_type)

    return app


def load_initial_model(app: FastAPI) -> LoadedModel:
    """Load the model the settings name (the registry's, with the cache as fallback); count it in the metrics."""
    holder: ModelHolder = app.state.holder
    watcher: RegistryWatcher | None = app.state.watcher
    metrics: ServiceMetrics = app.state.metrics
    try:
        model = watcher.initial_load() if watcher is not None else holder.load()[1]
    except InspectorError:
        metrics.reloads.labels("failed").inc()
        raise
    metrics.reloads.labels("ok").inc()
    return model


def _configure_logging(level: str) -> None:
    """Swaps, refusals and registry outages go to stderr (journald under systemd) beside uvicorn's own log."""
    logger = logging.getLogger("inspector")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level.upper())


def serve(settings: ServiceSettings) -> int:
    """Load and verify the model (fail fast with a clear error), then run uvicorn until stopped."""
    import uvicorn

    _configure_logging(settings.log_level)
    app = create_app(settings, ModelHolder(settings))
    model = load_initial_model(app)
    if settings.token is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a bearer token: anyone who can reach it can score and reload", settings.host)
    note = ""
    if app.state.watcher is not None and app.state.watcher.up is False:
        note = f" (registry unreachable: serving the cached version; {app.state.watcher.last_error})"
    print(
        f"inspector: serving {describe(model)} from {model.bundle} on http://{settings.host}:{settings.port}{note}",
        file=sys.stderr,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,
        timeout_graceful_shutdown=30,
        server_header=False,
    )
    return 0
