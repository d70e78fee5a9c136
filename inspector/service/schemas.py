"""What the service's routes accept and answer: typed request and response models.

Why: the HTTP API is a contract with the line's PLCs and dashboards; one module holds every shape it can answer
with, so the OpenAPI page, the routes and the middlewares that answer early (413, 400) agree on each of them.
"""

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(protected_namespaces=())  # fields named model_version / model_uri are ours


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
    part: str | None = None  # the part type scored (the service's only one, or the one the request named)


class ErrorResponse(_Model):
    detail: str
    errors: list[ImageScore] | None = None
    model_version: str | None = None


def error_response(
    status: int,
    detail: str,
    *,
    errors: list[ImageScore] | None = None,
    model_version: str | None = None,
) -> JSONResponse:
    """An :class:`ErrorResponse` with ``status``."""
    body = ErrorResponse(detail=detail, errors=errors, model_version=model_version)
    return JSONResponse(body.model_dump(), status_code=status)


class ReloadRequest(_Model):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    bundle: str | None = Field(
        None, description="bundle directory; omitted (with model_uri): re-load from where the served model came from"
    )
    model_uri: str | None = Field(
        None, description="registry model (models:/<name>@<alias> or models:/<name>/<version>)"
    )
    part: str | None = Field(None, description="the part type to reload (needed where several are served)")


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
    parts: dict[str, str | None] | None = None  # several part types: each one's model version (None: not loaded)
