"""The HTTP API: score, reload, health, readiness and the Prometheus page.

Why: the routes only translate between HTTP and the service's parts, which they are given by dependency injection
(:mod:`inspector.service.dependencies`): the model a request scores with, the holder that reloads, the metrics.
Scoring and reloading run in the threadpool, so the event loop keeps answering probes while a model works.
"""

import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from inspector.errors import InspectorError
from inspector.registry import RegistryUnreachable
from inspector.review.hook import record_scored
from inspector.service.auth import require_token
from inspector.service.batching import RequestBatcher
from inspector.service.dependencies import Batcher, Holder, Metrics, Parts, Settings, Watcher
from inspector.service.holder import describe
from inspector.service.metrics import ServiceMetrics
from inspector.service.parts import PartSet, UnknownPart
from inspector.service.schemas import (
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    ReloadRequest,
    ReloadResponse,
    ScoreResponse,
    error_response,
)
from inspector.service.settings import ServiceSettings
from inspector.service.uploads import read_uploads, score_uploads

log = logging.getLogger("inspector.service")

router = APIRouter()

#: ``/v1/score`` takes its images from the raw request (multipart or one image body): documented by hand.
_MULTIPART_DOC: dict[str, Any] = {
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
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 503)
}


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses=_ERRORS,
    openapi_extra=_MULTIPART_DOC,
    dependencies=[Depends(require_token)],
)
async def score(
    request: Request, parts: Parts, settings: Settings, batcher: Batcher, metrics: Metrics, part: str | None = None
) -> ScoreResponse | JSONResponse:
    """Score one or many images; a bad image gets an error naming it, the others are scored. Where several part
    types are served, ``part`` (query parameter or multipart field) names the one."""
    return await _score(request, parts, part, settings, batcher, metrics)


@router.post(
    "/v1/parts/{part}/score",
    response_model=ScoreResponse,
    responses=_ERRORS,
    openapi_extra=_MULTIPART_DOC,
    dependencies=[Depends(require_token)],
)
async def score_part(
    part: str, request: Request, parts: Parts, settings: Settings, batcher: Batcher, metrics: Metrics
) -> ScoreResponse | JSONResponse:
    """Score images of the part type ``part`` (404 naming the part types served when it is not one of them)."""
    return await _score(request, parts, part, settings, batcher, metrics)


async def _score(
    request: Request,
    parts: PartSet,
    part: str | None,
    settings: ServiceSettings,
    batcher: RequestBatcher,
    metrics: ServiceMetrics,
) -> ScoreResponse | JSONResponse:
    """Read the images, choose the part type's model (read once: a swap meanwhile does not change it), score."""
    start = time.perf_counter()
    if part is not None:  # an unknown part is refused before its body is read
        try:
            parts.choose(part)
        except UnknownPart as exc:
            return error_response(404, str(exc))
    try:
        uploads = await read_uploads(request, settings)
    except ClientDisconnect:  # a camera dropped its link mid-upload: nothing to answer, nothing broken
        metrics.client_disconnects.inc()
        log.info("client %s disconnected mid-upload; nothing scored", request.client.host if request.client else "?")
        return error_response(400, "client disconnected before the request body was complete")
    if isinstance(uploads, JSONResponse):
        return uploads
    try:
        served = parts.choose(part or getattr(request.state, "part", None))
    except UnknownPart as exc:
        return error_response(404 if part or getattr(request.state, "part", None) else 422, str(exc))
    model = served.holder.current
    if model is None:
        return error_response(503, f"part type {served.name!r}: no model loaded yet")
    results = await run_in_threadpool(score_uploads, model, uploads, batcher)
    scored = [r for r in results if r.error is None]
    flagged = [r.verdict == "anomalous" for r in scored]
    metrics.images.inc(len(scored))
    metrics.image_errors.inc(len(results) - len(scored))
    metrics.anomalies.inc(sum(flagged))
    metrics.parts_scored(flagged)
    metrics.part_scored(served.name, flagged, len(results) - len(scored))
    record_scored(request, model, uploads, results, served.name if len(parts) > 1 else None)
    if not scored:
        reasons = "; ".join(r.error or "" for r in results)
        return error_response(422, f"no image could be scored: {reasons}", errors=results, model_version=model.version)
    return ScoreResponse(
        model_version=model.version,
        latency_ms=round((time.perf_counter() - start) * 1000, 3),
        results=results,
        registry_version=model.registry_version,
        part=served.name,
    )


@router.post("/v1/reload", response_model=ReloadResponse, responses=_ERRORS, dependencies=[Depends(require_token)])
async def reload(parts: Parts, metrics: Metrics, body: ReloadRequest | None = None) -> ReloadResponse | JSONResponse:
    """Load and verify a bundle or registry model off to the side, then swap it in; on failure the old model
    keeps serving (422 bad model, 503 registry unreachable). Where several part types are served, ``part`` names
    the one; the others are untouched."""
    body = body or ReloadRequest()
    return await _reload(parts, body.part, body, metrics)


@router.post(
    "/v1/parts/{part}/reload", response_model=ReloadResponse, responses=_ERRORS, dependencies=[Depends(require_token)]
)
async def reload_part(
    part: str, parts: Parts, metrics: Metrics, body: ReloadRequest | None = None
) -> ReloadResponse | JSONResponse:
    """Swap in a new model for the part type ``part`` alone (as ``/v1/reload``)."""
    body = body or ReloadRequest()
    if body.part is not None and body.part != part:
        return error_response(422, f"the path names part {part!r} but the body names {body.part!r}")
    return await _reload(parts, part, body, metrics)


async def _reload(
    parts: PartSet, part: str | None, body: ReloadRequest, metrics: ServiceMetrics
) -> ReloadResponse | JSONResponse:
    if body.bundle is not None and body.model_uri is not None:
        return error_response(422, "give either bundle or model_uri, not both")
    try:
        holder = parts.choose(part).holder
    except UnknownPart as exc:
        return error_response(404 if part else 422, str(exc))
    try:
        previous, new = await run_in_threadpool(holder.load, body.bundle, model_uri=body.model_uri)
    except InspectorError as exc:
        metrics.reloads.labels("failed").inc()
        current = holder.current
        log.warning("reload failed, still serving %s: %s", describe(current) if current else "nothing", exc)
        return error_response(
            503 if isinstance(exc, RegistryUnreachable) else 422,
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


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(holder: Holder, watcher: Watcher, parts: Parts) -> ReadyResponse | JSONResponse:
    """Ready while every part type's model is loaded; the first (or only) part type's model is described."""
    model = holder.current
    registry = watcher.report() if watcher is not None else None
    versions = {p.name: (p.holder.current.version if p.holder.current else None) for p in parts}
    several = versions if len(parts) > 1 else None
    missing = [name for name, version in versions.items() if version is None]
    if model is None or missing:
        error = holder.last_error or "model not loaded yet"
        if several is not None:
            error = "part types not loaded yet: " + ", ".join(missing)
        body = ReadyResponse(status="not ready", error=error, registry=registry, parts=several)
        return JSONResponse(body.model_dump(), status_code=503)
    return ReadyResponse(
        status="ready",
        model_version=model.version,
        bundle=str(model.bundle),
        model_uri=model.model_uri,
        registry_version=model.registry_version,
        registry=registry,
        error=registry.error if registry is not None else None,
        parts=several,
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(metrics: Metrics) -> PlainTextResponse:
    payload, content_type = metrics.render()
    return PlainTextResponse(payload, media_type=content_type)
