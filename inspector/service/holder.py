"""The model being served, and the one place it is replaced.

Why: the line must never score with a half-loaded model, and a reload must not drop or change a request already
running. A new :class:`~inspector.engine.Inspector` is built completely (hashes verified, ORT session created, one
smoke inference) before a single reference assignment publishes it; a request reads that reference once and keeps
the object it got to the end; a failed load leaves the old model serving.
"""

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from inspector.engine import Inspector
from inspector.errors import BundleError, InspectorError
from inspector.registry import FetchedBundle, ModelVersionRef, RegistrySource
from inspector.service.settings import ServiceSettings

log = logging.getLogger("inspector.service")


@dataclass(frozen=True)
class LoadedModel:
    """One verified, ready-to-score model and where it came from; replaced as a whole, never mutated."""

    inspector: Inspector
    bundle: Path
    model_uri: str | None = None  # set when it came from the registry
    registry_version: str | None = None

    @property
    def version(self) -> str:
        return self.inspector.model_version


def describe(model: LoadedModel) -> str:
    """``tiny:run-id`` or, from the registry, ``models:/parts@champion version 3 (parts:run-id)``."""
    if model.model_uri:
        return f"{model.model_uri} version {model.registry_version} ({model.version})"
    return model.version


class ModelHolder:
    """Holds the model being served and swaps in a new one atomically.

    ``current`` is a single reference: a request reads it once and scores with that object to the end, so a
    reload never changes the model under a running request. :meth:`load` builds and smoke-tests the new model
    completely before the one assignment that publishes it; if anything fails, the old model keeps serving.
    """

    def __init__(self, settings: ServiceSettings, registry: RegistrySource | None = None) -> None:
        self.settings = settings
        self.registry = registry or settings.registry_source()
        self._current: LoadedModel | None = None
        self._load_lock = threading.Lock()  # one load (and swap) at a time; scoring never waits on it
        self.last_error: str | None = None
        self._listeners: list[Callable[[LoadedModel], None]] = []

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def on_swap(self, listener: Callable[[LoadedModel], None]) -> None:
        """Call ``listener`` with every model swapped in (and at once with the current one, if any)."""
        self._listeners.append(listener)
        if self._current is not None:
            listener(self._current)

    def load(
        self, bundle: str | Path | None = None, *, model_uri: str | None = None, resolved: ModelVersionRef | None = None
    ) -> tuple[LoadedModel | None, LoadedModel]:
        """Load ``bundle`` or the registry model ``model_uri`` (``resolved``: its version, already looked up),
        verify it, then swap it in. With neither, re-load from where the served model came from.

        Returns (previous, new). Raises :class:`InspectorError` (old model untouched) when the new one is bad, and
        :class:`~inspector.registry.RegistryUnreachable` when the registry cannot be asked.
        """
        with self._load_lock:
            current = self._current
            if bundle is None and model_uri is None:
                if current is not None:
                    model_uri, bundle = current.model_uri, None if current.model_uri else current.bundle
                else:
                    model_uri, bundle = self.settings.model_uri, self.settings.bundle
            fetched = self._fetch(model_uri, resolved) if model_uri is not None else None
            if fetched is not None:
                return self._swap_in(fetched.path, fetched)
            if bundle is None:
                raise InspectorError("no bundle to load: give a bundle path or a model URI")
            return self._swap_in(Path(bundle), None)

    def load_cached(self, fetched: FetchedBundle) -> tuple[LoadedModel | None, LoadedModel]:
        """Serve a version from the local cache (the registry is down at startup)."""
        with self._load_lock:
            return self._swap_in(fetched.path, fetched)

    def _fetch(self, model_uri: str, resolved: ModelVersionRef | None) -> FetchedBundle:
        if self.registry is None:
            raise InspectorError(
                f"{model_uri}: no registry configured: "
                "start the service with --tracking-uri URL (or MLFLOW_TRACKING_URI)"
            )
        try:
            return self.registry.fetch(model_uri, resolved)
        except InspectorError as exc:
            self.last_error = str(exc)
            raise

    def _build(self, path: Path, fetched: FetchedBundle | None) -> LoadedModel:
        bundle = self.settings.trusted_bundle(path)  # hashes, content digest, and the signature where required
        inspector = Inspector(bundle, **self.settings.engine_options())
        pre = inspector.bundle.spec.preprocessing
        probe = Image.new("RGB", (pre.width, pre.height), tuple(int(round(m * 255)) for m in pre.mean))
        result = inspector.score([probe])[0]  # the whole path once: decode-free preprocess, ORT run, kNN
        if result.error is not None or result.score is None or not math.isfinite(result.score):
            raise BundleError(f"{path}: smoke inference failed ({result.error or f'score {result.score!r}'})")
        return LoadedModel(
            inspector=inspector,
            bundle=path,
            model_uri=fetched.uri if fetched else None,
            registry_version=fetched.version if fetched else None,
        )

    def _swap_in(self, path: Path, fetched: FetchedBundle | None) -> tuple[LoadedModel | None, LoadedModel]:
        """Build, then publish (the caller holds the load lock, so swaps and their listeners run in order)."""
        try:
            new = self._build(path, fetched)
        except InspectorError as exc:
            if fetched is None:
                self.last_error = str(exc)
                raise
            self.last_error = f"{fetched.uri} (version {fetched.version}): {exc}"
            raise BundleError(self.last_error) from exc
        except Exception as exc:  # onnxruntime / numpy errors on a bad model file: still the bundle's fault
            self.last_error = f"{path}: cannot load model ({type(exc).__name__}: {exc})"
            raise BundleError(self.last_error) from exc
        previous, self._current = self._current, new
        self.last_error = None
        if fetched is not None and self.registry is not None:
            self.registry.cache.remember(fetched.uri, fetched.version)
        for listener in self._listeners:
            listener(new)
        log.info(
            "serving %s from %s (was %s)", describe(new), new.bundle, describe(previous) if previous else "nothing"
        )
        return previous, new
