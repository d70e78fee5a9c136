"""The part types one service serves: each its own model holder (hot-swapped alone) and, from the registry, its own
watcher; a request names its part, and an unknown part is answered with the parts there are.

Why: a high-mix line inspects many part types on one PC; one process with one request queue and one set of cores
serves them all, while each part type's model is loaded, verified, swapped and rolled back on its own (a new
champion of one part never touches another's). A service started with one ``--bundle`` or ``--model-uri`` is the
same thing with one part type, which a request need not name.
"""

from collections.abc import Iterator
from dataclasses import dataclass

from inspector.errors import InspectorError
from inspector.service.holder import LoadedModel, ModelHolder
from inspector.service.metrics import ServiceMetrics
from inspector.service.settings import ServiceSettings
from inspector.service.watcher import RegistryWatcher


class UnknownPart(InspectorError):
    """A request named a part type this service does not serve (or named none where several are served)."""


@dataclass(frozen=True)
class ServedPart:
    """One part type: its name, the holder of its model, and the watcher that follows its registry alias."""

    name: str
    holder: ModelHolder
    watcher: RegistryWatcher | None = None

    def load_initial(self, metrics: ServiceMetrics) -> LoadedModel:
        """Load this part's model as the settings name it (the registry's, with the cache as fallback)."""
        try:
            model = self.watcher.initial_load() if self.watcher is not None else self.holder.load()[1]
        except InspectorError:
            metrics.reloads.labels("failed").inc()
            raise
        metrics.reloads.labels("ok").inc()
        return model


class PartSet:
    """The part types served, by name, in the order given; the first one is the one a lone-part request uses."""

    def __init__(self, parts: list[ServedPart]) -> None:
        if not parts:
            raise InspectorError("no part type to serve")
        self._parts = {p.name: p for p in parts}

    @classmethod
    def from_settings(
        cls, settings: ServiceSettings, metrics: ServiceMetrics, holder: ModelHolder | None = None
    ) -> "PartSet":
        """One holder (and, for a registry URI, one watcher) a part type; the metrics hear each one's swaps.
        ``holder``: the one part type's holder, already made (a service of one ``--bundle`` or ``--model-uri``)."""
        sources = settings.part_sources()
        if holder is not None and len(sources) != 1:
            raise InspectorError(f"a given model holder serves one part type, not {len(sources)}")
        parts = []
        for name, source in sources.items():
            own = settings.for_part(source)
            holder = holder or ModelHolder(own)
            holder.on_swap(lambda model, name=name: metrics.part_loaded(name, model))  # type: ignore[misc]
            watcher = (
                RegistryWatcher(holder, metrics, own.model_uri, own.poll_seconds) if own.model_uri is not None else None
            )
            parts.append(ServedPart(name, holder, watcher))
            holder = None
        return cls(parts)

    def __iter__(self) -> Iterator[ServedPart]:
        return iter(self._parts.values())

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def names(self) -> list[str]:
        return list(self._parts)

    @property
    def first(self) -> ServedPart:
        return next(iter(self._parts.values()))

    def choose(self, name: str | None) -> ServedPart:
        """The part a request names; with one part type served, naming none means it. Raises :class:`UnknownPart`
        naming the known parts otherwise."""
        known = ", ".join(self._parts)
        if name is None or name == "":
            if len(self._parts) == 1:
                return self.first
            raise UnknownPart(
                f"this service serves several part types ({known}): name one with the 'part' field or query "
                "parameter, or POST /v1/parts/{part}/score"
            )
        part = self._parts.get(name)
        if part is None:
            raise UnknownPart(f"unknown part type {name!r}: this service serves {known}")
        return part
