"""The line's registry client and cache, used from the pipelines: what the gate scores is what the line will load.

The promotion gate and ``pipelines score`` fetch a registered bundle through :mod:`inspector.registry`: the same
MLmodel lookup, download, verification against the bundle's manifest and its version's hash tags, and cache the
line uses. Against an MLflow server (``http(s)://``) the line's own REST client asks it, exactly as a line PC
would. A local store (SQLite or a file store, the default on a training host) has no REST API for that client, so
:class:`LocalStoreReader` looks versions and artifact locations up with mlflow and reads the artifacts from disk;
everything after the lookup is still the line's code.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from inspector.registry import (
    ArtifactStore,
    BundleCache,
    ModelUri,
    ModelVersionRef,
    RegistryClient,
    RegistryError,
    RegistryReader,
    RegistrySource,
    local_artifacts,
    parse_model_uri,
)


class LocalStoreReader:
    """A local MLflow store (SQLite, file) seen through the line's registry interface: resolve and locate with
    mlflow, read ``file:`` artifacts from disk."""

    def __init__(self, registry_uri: str) -> None:
        self.registry_uri = registry_uri
        self._client = MlflowClient(registry_uri=registry_uri)

    def resolve(self, uri: str | ModelUri) -> ModelVersionRef:
        """The version an alias points to now (or check that a pinned version exists), with its tags."""
        model = uri if isinstance(uri, ModelUri) else parse_model_uri(uri)
        try:
            if model.alias:
                version = self._client.get_model_version_by_alias(model.name, model.alias)
            else:
                version = self._client.get_model_version(model.name, str(model.version))
        except MlflowException as exc:
            raise RegistryError(f"{model}: not found in the registry {self.registry_uri} ({exc.message})") from None
        return ModelVersionRef(str(model), model.name, str(version.version), dict(version.tags or {}))

    def download_uri(self, ref: ModelVersionRef) -> str:
        return str(self._client.get_model_version_download_uri(ref.name, ref.version))

    def artifacts(self, artifact_uri: str, what: str) -> ArtifactStore:
        return local_artifacts(artifact_uri, what)


def registry_reader(registry_uri: str) -> RegistryReader:
    """The line's REST client for an MLflow server; the local-store lookup for a store on this host."""
    if urllib.parse.urlsplit(registry_uri).scheme in ("http", "https"):
        return RegistryClient(registry_uri)
    return LocalStoreReader(registry_uri)


def line_registry_source(cache_dir: Path, registry_uri: str | None = None) -> RegistrySource:
    """The registry mlflow is pointed at (``registry_uri`` or ``mlflow.get_registry_uri()``) as the line reads it,
    with verified bundles cached under ``cache_dir``."""
    return RegistrySource(registry_reader(registry_uri or mlflow.get_registry_uri()), BundleCache(cache_dir))
