"""The service's settings model: what ``inspector serve`` needs, with defaults that work.

Why a module of its own: the CLI builds the settings from flags and ``INSPECTOR_*`` variables before anything is
served, and the deploy files are checked against the same model, so it must stand apart from the app. It extends
the line's :class:`inspector.settings.RuntimeSettings` and reads the environment the same way (``INSPECTOR_<FIELD>``);
``MLFLOW_TRACKING_URI`` is honoured for the registry.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from inspector.errors import InspectorError
from inspector.registry import BundleCache, RegistryClient, RegistrySource, default_cache_dir, parse_model_uri
from inspector.review.settings import RecordingSettings


class ServiceSettings(RecordingSettings):
    """Everything ``inspector serve`` needs; defaults work, env vars (``INSPECTOR_*``) and CLI flags override."""

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
    def environment_values(cls, environ: Mapping[str, str]) -> dict[str, Any]:
        """``INSPECTOR_<FIELD>`` variables, over ``MLFLOW_TRACKING_URI`` for the registry when it is an http(s) server
        (a local sqlite/file store there is the training stack's, not ours)."""
        values: dict[str, Any] = {}
        mlflow_uri = environ.get("MLFLOW_TRACKING_URI", "").strip()
        if mlflow_uri.startswith(("http://", "https://")):
            values["tracking_uri"] = mlflow_uri
        return values | super().environment_values(environ)

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
