"""The service's settings model: what ``inspector serve`` needs, with defaults that work.

Why a module of its own: the CLI builds the settings from flags and ``INSPECTOR_*`` variables before anything is
served, and the deploy files are checked against the same model, so it must stand apart from the app. It extends
the line's :class:`inspector.settings.RuntimeSettings` and reads the environment the same way (``INSPECTOR_<FIELD>``);
``MLFLOW_TRACKING_URI`` is honoured for the registry.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from inspector.bundle import MANIFEST
from inspector.errors import InspectorError
from inspector.registry import BundleCache, RegistryClient, RegistrySource, default_cache_dir, parse_model_uri
from inspector.review.settings import RecordingSettings

#: what a registry source starts with (anything else is a bundle folder)
MODEL_URI_PREFIX = "models:/"


def part_name(source: str | Path) -> str:
    """The part type a source serves when not named: a registry model's name, or a bundle folder's name."""
    text = str(source)
    if text.startswith(MODEL_URI_PREFIX):
        return parse_model_uri(text).name
    return Path(text).name


def parse_part(item: str) -> tuple[str, str]:
    """``NAME=SOURCE`` or a bare SOURCE (a bundle folder or ``models:/<name>@<alias>``) as (name, source)."""
    name, sep, source = item.partition("=")
    if sep and not name.startswith(MODEL_URI_PREFIX) and "/" not in name:
        if not name.strip() or not source.strip():
            raise InspectorError(f"part {item!r}: give NAME=SOURCE with both sides, or a bare bundle path or URI")
        return name.strip(), source.strip()
    return part_name(item.rstrip("/")), item


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
    parts: list[str] = Field(
        default_factory=list,
        description="several part types, each NAME=SOURCE or a bare SOURCE (a bundle folder, or models:/<name>@champion"
        " named after its model); env: comma-separated",
    )
    bundles_dir: Path | None = Field(None, description="a folder of bundles: each sub-folder a part type, named by it")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("parts", mode="before")
    @classmethod
    def _split_parts(cls, value: Any) -> Any:
        """``INSPECTOR_PARTS=a=/b/a,models:/c@champion``: one string from the environment, split on commas."""
        return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value

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

    @property
    def serves_parts(self) -> bool:
        """Whether this service was asked for several part types (``parts`` or ``bundles_dir``)."""
        return bool(self.parts) or self.bundles_dir is not None

    def part_sources(self) -> dict[str, str]:
        """Each part type and where it loads from (a bundle folder or a registry URI), in the order given: the
        single ``bundle``/``model_uri`` as one part named after it, else ``bundles_dir``'s bundles, then ``parts``."""
        if not self.serves_parts:
            source = self.model_uri or (str(self.bundle) if self.bundle is not None else None)
            return {} if source is None else {part_name(source): source}
        found: list[tuple[str, str]] = []
        if self.bundles_dir is not None:
            if not self.bundles_dir.is_dir():
                raise InspectorError(f"{self.bundles_dir}: not a folder of bundles (--bundles-dir)")
            found += [(d.name, str(d)) for d in sorted(self.bundles_dir.iterdir()) if (d / MANIFEST).is_file()]
            if not found:
                raise InspectorError(f"{self.bundles_dir}: holds no bundle (no sub-folder with {MANIFEST})")
        found += [parse_part(item) for item in self.parts]
        sources: dict[str, str] = {}
        for name, source in found:
            if name in sources:
                raise InspectorError(
                    f"part type {name!r} is given twice ({sources[name]} and {source}): name them apart"
                )
            sources[name] = source
        return sources

    def for_part(self, source: str) -> "ServiceSettings":
        """These settings serving one part type's source alone (what its model holder loads from)."""
        uri = source if source.startswith(MODEL_URI_PREFIX) else None
        return self.model_copy(
            update={"bundle": None if uri else Path(source), "model_uri": uri, "parts": [], "bundles_dir": None}
        )

    def check_source(self) -> None:
        """Fail at startup, with a message an operator can act on, when there is nothing we can load."""
        if self.serves_parts:
            if self.bundle is not None or self.model_uri is not None:
                raise InspectorError(
                    "give either --bundle/--model-uri (one part type) or --part/--bundles-dir, not both"
                )
            for source in self.part_sources().values():
                self.for_part(source).check_source()
            return
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
