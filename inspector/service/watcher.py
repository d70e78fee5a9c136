"""Following a registry alias: the model at ``models:/<name>@champion`` is served, and kept current.

Why: the line must pick up a newly promoted champion without a restart, and never stop because the registry
blinked or serve a version that is broken. At start the alias is resolved and the version downloaded, verified
and cached; with the registry down, the version last served from the cache is served and ``/readyz`` says so.
A thread re-resolves the alias every ``poll_seconds``; a new version is fetched, verified and smoke-tested off to
the side by the :class:`~inspector.service.holder.ModelHolder`, then swapped in; a version that fails is refused
(the old model keeps serving) and retried only after an exponential back-off.
"""

import logging
import threading
import time
from dataclasses import dataclass

from inspector.errors import InspectorError
from inspector.registry import RegistryError, RegistryUnreachable
from inspector.service.holder import LoadedModel, ModelHolder, describe
from inspector.service.metrics import ServiceMetrics, version_number
from inspector.service.schemas import RegistryReport

log = logging.getLogger("inspector.service")


def _iso(ts: float | None) -> str | None:
    """A timestamp as ``/readyz`` reports it (UTC, ISO 8601)."""
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class _Refusal:
    """A version that failed: how often, and when it may be tried again."""

    failures: int
    retry_at: float


class RegistryWatcher:
    """Follows the registry model ``uri``: loads it at start (from the cache when the registry is down), re-resolves
    it every ``poll_seconds`` and hot-swaps a new version through the :class:`ModelHolder`.

    A version that cannot be fetched, verified or smoke-tested is refused and retried only after
    ``poll_seconds * 2**failures`` (capped at ``max_backoff``): never a hot loop of downloads. Registry
    health (up, unreachable since, last success, last error) is kept here for ``/readyz`` and ``/metrics``.
    """

    def __init__(
        self,
        holder: ModelHolder,
        metrics: ServiceMetrics,
        uri: str,
        poll_seconds: float,
        *,
        max_backoff: float = 3600.0,
    ) -> None:
        self.holder, self.metrics, self.uri = holder, metrics, uri
        self.poll_seconds = poll_seconds
        self.max_backoff = max(max_backoff, poll_seconds)
        self.up: bool | None = None
        self.unreachable_since: float | None = None
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.latest_version: str | None = None
        self.applied_version: str | None = None
        self.refused: dict[str, _Refusal] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        holder.on_swap(self._swapped)

    def _swapped(self, model: LoadedModel) -> None:
        if model.model_uri == self.uri:  # a reload of our URI counts as applied; a manual bundle does not
            self.applied_version = model.registry_version
            self.refused.pop(model.registry_version or "", None)
            self.metrics.registry_refused.set(0)

    # -- health bookkeeping

    def _reachable(self) -> None:
        if self.up is False:
            log.info("registry reachable again (was unreachable since %s)", _iso(self.unreachable_since))
        self.up, self.unreachable_since, self.last_success = True, None, time.time()
        self.metrics.registry_up.set(1)
        self.metrics.registry_last_success.set(self.last_success)

    def _unreachable(self, exc: Exception) -> None:
        if self.up is not False:
            log.warning("registry unreachable, still serving %s: %s", self._served(), exc)
            self.unreachable_since = time.time()
        self.up = False
        self.last_error = str(exc)
        self.metrics.registry_up.set(0)

    def _served(self) -> str:
        current = self.holder.current
        return describe(current) if current else "nothing"

    # -- loading

    def initial_load(self) -> LoadedModel:
        """Fetch and serve the model at start; if that fails and a verified cached version is known, serve it."""
        try:
            self.holder.load(model_uri=self.uri)
        except InspectorError as exc:
            registry = self.holder.registry
            cached = registry.cached_for(self.uri) if registry is not None else None
            if cached is None:
                where = f" in {registry.cache.root}" if registry is not None else ""
                raise type(exc)(f"{exc}; no verified cached version to fall back on{where}") from exc
            if isinstance(exc, RegistryUnreachable):
                self._unreachable(exc)
            else:  # it answered, but what it points to is bad: serve the last good version, say why
                self._reachable()
                self._note_error(exc)
            self.holder.load_cached(cached)
            log.warning("serving cached version %s of %s: %s", cached.version, self.uri, exc)
        else:
            self._reachable()
        assert self.holder.current is not None
        self.latest_version = self.latest_version or self.holder.current.registry_version
        self.metrics.registry_latest.set(version_number(self.latest_version))
        return self.holder.current

    def _note_error(self, exc: Exception) -> None:
        if str(exc) != self.last_error:
            log.error("registry model %s not served, still serving %s: %s", self.uri, self._served(), exc)
        self.last_error = str(exc)

    def poll_once(self) -> None:
        """Re-resolve the URI; swap in a new version when it changed and is not waiting out a back-off."""
        client = self.holder.registry.client if self.holder.registry else None
        if client is None:
            return
        try:
            ref = client.resolve(self.uri)
        except RegistryUnreachable as exc:
            self.metrics.registry_polls.labels("unreachable").inc()
            self._unreachable(exc)
            return
        except RegistryError as exc:  # it answered: unknown alias/model now (deleted?). Keep serving, say so.
            self.metrics.registry_polls.labels("error").inc()
            self._reachable()
            self._note_error(exc)
            return
        self.metrics.registry_polls.labels("ok").inc()
        self._reachable()
        self.latest_version = ref.version
        self.metrics.registry_latest.set(version_number(ref.version))
        if ref.version == self.applied_version:
            self.last_error = None
            self.metrics.registry_refused.set(0)
            return
        refusal = self.refused.get(ref.version)
        if refusal is not None and time.time() < refusal.retry_at:
            return
        try:
            _, new = self.holder.load(model_uri=self.uri, resolved=ref)
        except RegistryUnreachable as exc:  # died mid-download: not the version's fault
            self.metrics.reloads.labels("failed").inc()
            self._unreachable(exc)
            return
        except InspectorError as exc:
            self.metrics.reloads.labels("failed").inc()
            failures = refusal.failures + 1 if refusal else 1
            delay = min(self.poll_seconds * 2**failures, self.max_backoff)
            self.refused[ref.version] = _Refusal(failures, time.time() + delay)
            self.metrics.registry_refused.set(version_number(ref.version))
            self.last_error = f"version {ref.version} refused (attempt {failures}, next try in {delay:.0f} s): {exc}"
            log.error("%s; still serving %s", self.last_error, self._served())
            return
        self.metrics.reloads.labels("ok").inc()
        self.last_error = None
        log.info("registry: now serving %s", describe(new))

    # -- the thread

    def start(self) -> None:
        if self.poll_seconds <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # the poller must outlive any surprise; the model keeps serving
                log.exception("registry poll failed unexpectedly")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def report(self) -> RegistryReport:
        current = self.holder.current
        if self.up is False:
            state, detail = "unreachable", f"unreachable since {_iso(self.unreachable_since)}"
        else:
            state, detail = ("reachable", "ok") if self.up else ("unknown", "not asked yet")
        if self.last_error and self.up is not False:
            detail = f"{detail}; {self.last_error}"
        return RegistryReport(
            uri=self.uri,
            status=state,
            detail=detail,
            unreachable_since=_iso(self.unreachable_since),
            last_success=_iso(self.last_success),
            latest_version=self.latest_version,
            served_version=current.registry_version if current else None,
            error=self.last_error,
            refused_versions=sorted(self.refused, key=version_number),
        )
