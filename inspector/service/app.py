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

from inspector.review.context import open_review
from inspector.review.pages import router as review_router
from inspector.service.batching import RequestBatcher
from inspector.service.holder import LoadedModel, ModelHolder, describe
from inspector.service.limits import BodyLimitMiddleware
from inspector.service.metrics import MetricsMiddleware, ServiceMetrics
from inspector.service.parts import PartSet
from inspector.service.routes import router
from inspector.service.settings import ServiceSettings
from inspector.service.watcher import RegistryWatcher

log = logging.getLogger("inspector.service")


def create_app(settings: ServiceSettings, holder: ModelHolder | None = None) -> FastAPI:
    """The service for ``settings``: one part type (``bundle`` or ``model_uri``) or several (``parts``,
    ``bundles_dir``), each with its own holder; models are loaded at startup (lifespan) unless already loaded.
    ``holder``: the one part type's holder, already made."""
    settings.check_source()
    metrics = ServiceMetrics()
    parts = PartSet.from_settings(settings, metrics, holder)
    first = parts.first
    first.holder.on_swap(metrics.model_loaded)  # the unlabelled model gauges: the first (or only) part type
    watchers = [part.watcher for part in parts if part.watcher is not None]

    review = open_review(settings, metrics.registry, token=settings.token) if settings.record else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(load_initial_model, app)
        for watcher in watchers:
            watcher.start()
        if review is not None:
            review.start()
        try:
            yield
        finally:
            for watcher in watchers:
                await run_in_threadpool(watcher.stop, settings.registry_timeout * 3)
            if review is not None:
                await run_in_threadpool(review.stop)

    app = FastAPI(title="inspector", summary="Score part images against golden references", lifespan=lifespan)
    app.state.settings = settings
    app.state.parts = parts
    app.state.holder = first.holder
    app.state.metrics = metrics
    app.state.batcher = RequestBatcher(settings.combine_images, on_batch=metrics.batch_scored)
    app.state.watcher = first.watcher
    app.state.review = review
    app.include_router(router)
    app.include_router(review_router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: sees the 413s too
    return app


def load_initial_model(app: FastAPI) -> LoadedModel:
    """Load every part type's model not loaded yet, as the settings name it (the registry's, with the cache as
    fallback), counted in the metrics; the first part type's model is returned."""
    parts: PartSet = app.state.parts
    metrics: ServiceMetrics = app.state.metrics
    for part in parts:
        if part.holder.current is None:
            part.load_initial(metrics)
    model = parts.first.holder.current
    assert model is not None
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
    parts: PartSet = app.state.parts
    if settings.token is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a bearer token: anyone who can reach it can score and reload", settings.host)
    watcher: RegistryWatcher | None = app.state.watcher
    note = ""
    if watcher is not None and watcher.up is False:
        note = f" (registry unreachable: serving the cached version; {watcher.last_error})"
    served = (
        f"{describe(model)} from {model.bundle}"
        if len(parts) == 1
        else "part types " + ", ".join(f"{p.name} ({describe(p.holder.current)})" for p in parts if p.holder.current)
    )
    print(f"inspector: serving {served} on http://{settings.host}:{settings.port}{note}", file=sys.stderr)
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
