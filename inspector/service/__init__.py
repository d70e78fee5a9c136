"""The production-line HTTP service (FastAPI + uvicorn, one process for one or several part types):
``inspector serve --bundle PATH``, ``inspector serve --model-uri models:/<name>@champion --tracking-uri URL``, or
several part types with ``--bundles-dir DIR`` or repeated ``--part [NAME=]SOURCE``.

```
POST /v1/score    one or many images (multipart field ``files``, or one raw ``image/*`` body) -> verdicts
POST /v1/reload   load + verify a bundle or registry model off to the side, then swap it in atomically
POST /v1/parts/{part}/score, /v1/parts/{part}/reload   the same for one of several part types
GET  /healthz     the process is alive
GET  /readyz      200 only while a verified model is loaded (reports its version and the registry's state)
GET  /metrics     Prometheus text: requests by status, latency, images scored, anomalies, model version, registry
```

Rules (``DESIGN.md``, "Reliability rules"): a bad image fails that item with an error naming it, never the
request; a request where every image is bad is a 422 with the reasons; too big is a 413; nothing here turns bad
input into a 500; a reload never serves a half-loaded model and never drops a request; the line never stops
because the registry blinked, and a bad version never reaches it.

One concept a module:

- :mod:`~inspector.service.settings`: ``ServiceSettings``, flags and ``INSPECTOR_*`` variables
- :mod:`~inspector.service.app`: ``create_app`` wires one app's parts; ``serve`` runs it under uvicorn
- :mod:`~inspector.service.routes`: the HTTP API; :mod:`~inspector.service.schemas`: its request/response models
- :mod:`~inspector.service.dependencies`: what a route is given (FastAPI ``Depends``)
- :mod:`~inspector.service.auth`: the bearer token; :mod:`~inspector.service.limits`: the body size limit
- :mod:`~inspector.service.uploads`: a request's images read, decoded and scored one result each
- :mod:`~inspector.service.batching`: requests that queue behind a running batch scored together
- :mod:`~inspector.service.holder`: the model served, swapped in whole
- :mod:`~inspector.service.parts`: the part types served, each with its own holder and watcher
- :mod:`~inspector.service.watcher`: following a registry alias, with the cache as fallback
- :mod:`~inspector.service.metrics`: Prometheus metrics and the middleware that counts requests

This package is the only part of ``inspector`` that needs the ``serve`` extra (fastapi, uvicorn,
prometheus-client, python-multipart); ``import inspector`` and the CLI import it only when serving.
"""

from inspector.service.app import create_app, load_initial_model, serve
from inspector.service.batching import RequestBatcher
from inspector.service.holder import LoadedModel, ModelHolder, describe
from inspector.service.metrics import FLAG_WINDOW, ServiceMetrics
from inspector.service.settings import ServiceSettings
from inspector.service.watcher import RegistryWatcher

__all__ = [
    "FLAG_WINDOW",
    "LoadedModel",
    "ModelHolder",
    "RegistryWatcher",
    "RequestBatcher",
    "ServiceMetrics",
    "ServiceSettings",
    "create_app",
    "describe",
    "load_initial_model",
    "serve",
]
