"""The service assembled: :func:`create_app` wires one app's parts together, :func:`serve` runs it under uvicorn.

Why: each app owns its settings, model holder, metrics, batcher and registry watcher (``app.state``, handed to the
routes by dependency injection), so nothing lives at module level and several apps can share a process. The model
is loaded before uvicorn binds its port (:func:`serve` fails fast with a clear error) or, for an app built by a
test, in the lifespan; the registry watcher's thread runs for exactly the app's lifetime.
"""

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from inspector.errors import InspectorError
from inspector.review.context import open_review
from inspector.review.pages import router as review_router
from inspector.service.batching import RequestBatcher
from inspector.service.holder import LoadedModel, ModelHolder, describe
from inspector.service.limits import BodyLimitMiddleware
from inspector.service.metrics import MetricsMiddleware, ServiceMetrics
from inspector.service.routes import router
from inspector.service.settings import ServiceSettings
from inspector.service.watcher import RegistryWatcher

log = logging.getLogger("inspector.service")


def create_app(settings: ServiceSettings, holder: ModelHolder | None = None) -> FastAPI:
    """The service for ``settings``; the model is loaded at startup (lifespan) unless ``holder`` already has one."""
    settings.check_source()
    holder = holder or ModelHolder(settings)
    metrics = ServiceMetrics()
    holder.on_swap(metrics.model_loaded)
    watcher = (
        RegistryWatcher(holder, metrics, settings.model_uri, settings.poll_seconds) if settings.model_uri else None
    )

    review = open_review(settings, metrics.registry, token=settings.token) if settings.record else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if holder.current is None:
            await run_in_threadpool(load_initial_model, app)
        if watcher is not None:
            watcher.start()
        if review is not None:
            review.start()
        try:
            yield
        finally:
            if watcher is not None:
                await run_in_threadpool(watcher.stop, settings.registry_timeout * 3)
            if review is not None:
                await run_in_threadpool(review.stop)

    app = FastAPI(title="inspector", summary="Score part images against golden references", lifespan=lifespan)
    app.state.settings = settings
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.batcher = RequestBatcher(settings.combine_images, on_batch=metrics.batch_scored)
    app.state.watcher = watcher
    app.state.review = review
    app.include_router(router)
    app.include_router(review_router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: sees the 413s too
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
    app = create_app(settings)
    model = load_initial_model(app)
    if settings.token is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a bearer token: anyone who can reach it can score and reload", settings.host)
    watcher: RegistryWatcher | None = app.state.watcher
    note = ""
    if watcher is not None and watcher.up is False:
        note = f" (registry unreachable: serving the cached version; {watcher.last_error})"
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
