"""The production-line HTTP service: ``inspector serve --bundle PATH`` (FastAPI + uvicorn, one model per process).

```
POST /v1/score    one or many images (multipart field ``files``, or one raw ``image/*`` body) -> verdicts
POST /v1/reload   load + verify a bundle off to the side, then swap it in atomically (bearer token when set)
GET  /healthz     the process is alive
GET  /readyz      200 only while a verified model is loaded (reports its version)
GET  /metrics     Prometheus text: requests by status, latency, images scored, anomalies, model version
```

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

from inspector.engine import Inspector
from inspector.errors import BundleError, ImageError, InspectorError
from inspector.preprocess import load_image

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
    model_uri: str | None = Field(None, description="registry URI (models:/<name>@champion); not available yet")
    token: SecretStr | None = Field(None, description="bearer token required on /v1/score and /v1/reload")
    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest request body accepted (413 above)")
    max_images: int = Field(64, gt=0, description="most images in one request (413 above)")
    threads: int | None = Field(None, ge=0, description="onnxruntime intra-op threads (None: INSPECTOR_THREADS or all cores)")
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
        if self.bundle is None and self.model_uri is not None:
            raise RegistryUnavailable(
                f"model_uri {self.model_uri!r}: loading from the model registry is not available yet; "
                "pass --bundle PATH (a bundle directory) instead"
            )
        if self.bundle is None:
            raise InspectorError("no model to serve: pass --bundle PATH (or set INSPECTOR_BUNDLE)")


class RegistryUnavailable(InspectorError):
    """A registry model URI was given, but this inspector only loads bundle directories so far."""


# ------------------------------------------------------------------------------------------------ model holder


@dataclass(frozen=True)
class LoadedModel:
    """One verified, ready-to-score model and where it came from; replaced as a whole, never mutated."""

    inspector: Inspector
    bundle: Path
    loaded_at: float

    @property
    def version(self) -> str:
        return self.inspector.model_version


class ModelHolder:
    """Holds the model being served and swaps in a new one atomically.

    ``current`` is a single reference: a request reads it once and scores with that object to the end, so a
    reload never changes the model under a running request. :meth:`load` builds and smoke-tests the new model
    completely before the one assignment that publishes it; if anything fails, the old model keeps serving.
    """

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
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

    def _build(self, path: Path) -> LoadedModel:
        inspector = Inspector.from_bundle(path, threads=self.settings.threads)  # verifies hashes, schema, dims
        pre = inspector.bundle.spec.preprocessing
        probe = Image.new("RGB", (pre.width, pre.height), tuple(int(round(m * 255)) for m in pre.mean))
        result = inspector.score([probe])[0]  # the whole path once: decode-free preprocess, ORT run, kNN
        if result.error is not None or result.score is None or not math.isfinite(result.score):
            raise BundleError(f"{path}: smoke inference failed ({result.error or f'score {result.score!r}'})")
        return LoadedModel(inspector=inspector, bundle=path, loaded_at=time.time())

    def load(self, bundle: str | Path | None = None, *, model_uri: str | None = None) -> tuple[LoadedModel | None, LoadedModel]:
        """Load ``bundle`` (default: the one being served, re-read from disk), verify it, then swap it in.

        Returns (previous, new). Raises :class:`InspectorError` (old model untouched) when the new one is bad.
        """
        if model_uri is not None:
            raise RegistryUnavailable(f"model_uri {model_uri!r}: loading from the model registry is not available yet; pass a bundle path")
        with self._load_lock:
            current = self._current
            path = Path(bundle) if bundle is not None else (current.bundle if current else self.settings.bundle)
            if path is None:
                raise InspectorError("no bundle to load: give a bundle path")
            try:
                new = self._build(path)
            except InspectorError as exc:
                self.last_error = str(exc)
                raise
            except Exception as exc:  # onnxruntime / numpy errors on a bad model file: still the bundle's fault
                self.last_error = f"{path}: cannot load model ({type(exc).__name__}: {exc})"
                raise BundleError(self.last_error) from exc
            with self._swap_lock:
                previous, self._current = self._current, new
            self.last_error = None
            for listener in self._listeners:  # still under the load lock: metrics follow swaps in order
                listener(new)
        log.info("serving %s from %s (was %s)", new.version, new.bundle, previous.version if previous else "nothing")
        return previous, new


# ---------------------------------------------------------------------------------------------------- metrics


class ServiceMetrics:
    """Prometheus metrics in a registry of their own (one per app, so several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("inspector_http_requests", "HTTP requests by method, path and status", ["method", "path", "status"], registry=r)
        self.latency = Histogram(
            "inspector_http_request_duration_seconds", "HTTP request latency", ["method", "path"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.images = Counter("inspector_images_scored", "images scored (a score was produced)", registry=r)
        self.image_errors = Counter("inspector_image_errors", "images that could not be scored (per-item errors)", registry=r)
        self.anomalies = Counter("inspector_anomalies_flagged", "images scored above the threshold", registry=r)
        self.model = Info("inspector_model", "the model being served", registry=r)
        self.ready = Gauge("inspector_model_ready", "1 while a verified model is loaded", registry=r)
        self.reloads = Counter("inspector_model_reloads", "model (re)loads by result", ["result"], registry=r)

    def model_loaded(self, model: LoadedModel) -> None:
        self.model.info({"version": model.version, "bundle": str(model.bundle)})
        self.ready.set(1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------------------ ASGI middlewares


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:

    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": payload})


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: declared (Content-Length) or counted as it streams (chunked uploads).

    The rest of an oversized body is read and dropped (up to ``drain_bytes``) before answering, so an ordinary
    client that writes its whole request before reading sees the 413 instead of a reset connection.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int, drain_bytes: int = 64 * 1024 * 1024) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes

    def _detail(self, size: str) -> dict[str, Any]:
        return {"detail": f"request body {size} is over the limit of {self.max_bytes} bytes", "errors": None, "model_version": None}

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
                await _send_json(send, 400, {"detail": "invalid Content-Length header", "errors": None, "model_version": None})
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


class ScoreResponse(_Model):
    model_version: str
    latency_ms: float
    results: list[ImageScore]


class ErrorResponse(_Model):
    detail: str
    errors: list[ImageScore] | None = None
    model_version: str | None = None


class ReloadRequest(_Model):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    bundle: str | None = Field(None, description="bundle directory; omitted: re-read the bundle being served")
    model_uri: str | None = Field(None, description="registry URI (not available yet)")


class ReloadResponse(_Model):
    model_version: str
    previous_version: str | None
    bundle: str


class HealthResponse(_Model):
    status: Literal["ok"]


class ReadyResponse(_Model):
    status: Literal["ready", "not ready"]
    model_version: str | None = None
    bundle: str | None = None
    error: str | None = None


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


def _error(status: int, detail: str, *, errors: list[ImageScore] | None = None, model_version: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(detail=detail, errors=errors, model_version=model_version)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------- scoring


@dataclass
class _Upload:
    name: str
    data: bytes | None
    error: str | None = None


def _score_uploads(model: LoadedModel, uploads: list[_Upload]) -> list[ImageScore]:
    """Decode and score (synchronous: runs in the threadpool). Every upload gets a result, in order."""
    inspector = model.inspector
    threshold = inspector.threshold
    max_pixels = inspector.bundle.spec.preprocessing.max_pixels
    results: list[ImageScore | None] = [None] * len(uploads)
    decoded: list[tuple[int, Image.Image]] = []
    for i, up in enumerate(uploads):
        if up.error is None:
            try:
                decoded.append((i, load_image(up.data or b"", max_pixels=max_pixels, name=up.name)))
                continue
            except ImageError as exc:
                up.error = str(exc)
        results[i] = ImageScore(name=up.name, score=None, threshold=threshold, verdict=None, error=up.error)

    def fill(index: int, r: Any) -> None:
        name = uploads[index].name
        if r.error is not None or r.score is None:
            reason = (r.error or "no score").split(": ", 1)[-1]
            results[index] = ImageScore(name=name, score=None, threshold=threshold, verdict=None, error=f"{name}: {reason}")
        else:
            results[index] = ImageScore(name=name, score=r.score, threshold=threshold, verdict="anomalous" if r.anomalous else "good")

    if decoded:
        try:
            for (i, _), r in zip(decoded, inspector.score([img for _, img in decoded])):
                fill(i, r)
        except Exception:  # one odd image must not sink the others: score them one by one to find it
            for i, img in decoded:
                try:
                    fill(i, inspector.score([img])[0])
                except Exception as exc:
                    name = uploads[i].name
                    results[i] = ImageScore(name=name, score=None, threshold=threshold, verdict=None,
                                            error=f"{name}: cannot score image ({type(exc).__name__}: {exc})")
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
        detail = f"{exc.detail} (at most {settings.max_images} images per request)" if status == 413 else f"malformed multipart body: {exc.detail}"
        return _error(status, detail)
    uploads: list[_Upload] = []
    try:
        for i, item in enumerate(form.getlist("files")):
            if isinstance(item, UploadFile):
                name = item.filename or f"<file {i}>"
                uploads.append(_Upload(name=name, data=await item.read()))
            else:
                uploads.append(_Upload(name=f"<field {i}>", data=None, error=f"<field {i}>: not a file upload (send the image as a file)"))
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

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if holder.current is None:
            try:
                await run_in_threadpool(holder.load)
                metrics.reloads.labels("ok").inc()
            except InspectorError:
                metrics.reloads.labels("failed").inc()
                raise
        yield

    app = FastAPI(title="inspector", summary="Score part images against golden references", lifespan=lifespan)
    app.state.settings = settings
    app.state.holder = holder
    app.state.metrics = metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: sees the 413s too

    multipart_doc: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["files"],
                               "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}},
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }
    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)
    }

    @app.post("/v1/score", response_model=ScoreResponse, responses=error_responses, openapi_extra=multipart_doc,
              dependencies=[Depends(require_token)])
    async def score(request: Request, model: LoadedModel = Depends(get_model)) -> Any:
        """Score one or many images; a bad image gets an error naming it, the others are scored."""
        start = time.perf_counter()
        uploads = await _read_uploads(request, settings)
        if isinstance(uploads, JSONResponse):
            return uploads
        results = await run_in_threadpool(_score_uploads, model, uploads)
        scored = [r for r in results if r.error is None]
        metrics.images.inc(len(scored))
        metrics.image_errors.inc(len(results) - len(scored))
        metrics.anomalies.inc(sum(r.verdict == "anomalous" for r in scored))
        if not scored:
            reasons = "; ".join(r.error or "" for r in results)
            return _error(422, f"no image could be scored: {reasons}", errors=results, model_version=model.version)
        return ScoreResponse(model_version=model.version, latency_ms=round((time.perf_counter() - start) * 1000, 3), results=results)

    @app.post("/v1/reload", response_model=ReloadResponse, responses=error_responses | {501: {"model": ErrorResponse}},
              dependencies=[Depends(require_token)])
    async def reload(body: ReloadRequest | None = None) -> Any:
        """Load and verify a bundle off to the side, then swap it in; on failure the old model keeps serving."""
        body = body or ReloadRequest()
        try:
            previous, new = await run_in_threadpool(holder.load, body.bundle, model_uri=body.model_uri)
        except RegistryUnavailable as exc:
            metrics.reloads.labels("failed").inc()
            return _error(501, str(exc), model_version=holder.current.version if holder.current else None)
        except InspectorError as exc:
            metrics.reloads.labels("failed").inc()
            current = holder.current
            log.warning("reload failed, still serving %s: %s", current.version if current else "nothing", exc)
            return _error(422, f"reload failed, still serving the previous model: {exc}", model_version=current.version if current else None)
        metrics.reloads.labels("ok").inc()
        return ReloadResponse(model_version=new.version, previous_version=previous.version if previous else None, bundle=str(new.bundle))

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def readyz() -> Any:
        model = holder.current
        if model is None:
            body = ReadyResponse(status="not ready", error=holder.last_error or "model not loaded yet")
            return JSONResponse(body.model_dump(), status_code=503)
        return ReadyResponse(status="ready", model_version=model.version, bundle=str(model.bundle))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        payload, content_type = metrics.render()
        return PlainTextResponse(payload, media_type=content_type)

    return app


def serve(settings: ServiceSettings) -> int:
    """Load and verify the model (fail fast with a clear error), then run uvicorn until stopped."""
    import uvicorn

    holder = ModelHolder(settings)
    settings.check_source()
    holder.load()
    app = create_app(settings, holder)
    if settings.token is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a bearer token: anyone who can reach it can score and reload", settings.host)
    model = holder.current
    assert model is not None
    print(f"inspector: serving {model.version} from {model.bundle} on http://{settings.host}:{settings.port}", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, workers=1,
                timeout_graceful_shutdown=30, server_header=False)
    return 0
