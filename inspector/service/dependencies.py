"""What a route is given, by FastAPI dependency injection: the parts of the app that serves it.

Why: the settings, model holder, metrics, batcher and registry watcher belong to the app :func:`create_app` built
(``app.state``), never to a module, so several apps can live in one process and a route names what it uses in its
signature. :data:`Model` is read once per request: a reload that swaps the holder meanwhile does not change the
model a running request scores with.
"""

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from inspector.service.batching import RequestBatcher
from inspector.service.holder import LoadedModel, ModelHolder
from inspector.service.metrics import ServiceMetrics
from inspector.service.parts import PartSet
from inspector.service.settings import ServiceSettings
from inspector.service.watcher import RegistryWatcher


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_parts(request: Request) -> PartSet:
    return request.app.state.parts


def get_batcher(request: Request) -> RequestBatcher:
    return request.app.state.batcher


def get_watcher(request: Request) -> RegistryWatcher | None:
    return request.app.state.watcher


def get_model(holder: Annotated[ModelHolder, Depends(get_holder)]) -> LoadedModel:
    """The model for this request: read once, kept to the end even if a reload swaps the holder meanwhile."""
    model = holder.current
    if model is None:
        raise HTTPException(503, detail="no model loaded yet")
    return model


Settings = Annotated[ServiceSettings, Depends(get_settings)]
Holder = Annotated[ModelHolder, Depends(get_holder)]
Metrics = Annotated[ServiceMetrics, Depends(get_metrics)]
Batcher = Annotated[RequestBatcher, Depends(get_batcher)]
Parts = Annotated[PartSet, Depends(get_parts)]
Watcher = Annotated[RegistryWatcher | None, Depends(get_watcher)]
Model = Annotated[LoadedModel, Depends(get_model)]
