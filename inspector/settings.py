"""The line's one configuration mechanism: typed pydantic models, ``INSPECTOR_<FIELD>`` variables, read once.

Why a module of its own: the engine takes every setting as an argument and reads no environment, so a notebook,
the CLI and the service get the same engine; the entry points (``inspector score``, ``inspector serve``) build a
settings model here from the defaults, then ``INSPECTOR_<FIELD>`` variables, then their flags, and pass it down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inspector.errors import InspectorError

#: the one environment prefix of the ``inspector`` program
ENV_PREFIX = "INSPECTOR_"


class RuntimeSettings(BaseModel):
    """How the line runs its model on this machine: what ``inspector score`` and the service share."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    threads: int | None = Field(None, ge=0, description="onnxruntime intra-op threads (None or 0: all cores)")
    streams: int | None = Field(
        None, ge=1, description="batches scored side by side, one core each (None: the cores; 1: one at a time)"
    )
    ort_spin: bool = Field(
        False, description="let onnxruntime's idle threads busy-wait (off: they take the cores from decode and search)"
    )

    @classmethod
    def environment_values(cls, environ: Mapping[str, str]) -> dict[str, Any]:
        """This model's fields as set in ``environ`` (``INSPECTOR_<FIELD>``; empty values count as unset)."""
        return {
            name: environ[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if environ.get(ENV_PREFIX + name.upper(), "").strip()
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults, then ``INSPECTOR_<FIELD>`` variables, then the non-None ``overrides`` (the CLI's flags)."""
        values = cls.environment_values(os.environ if environ is None else environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
            raise InspectorError(f"invalid {ENV_PREFIX}* settings: {problems}") from None

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments :class:`inspector.engine.Inspector` takes from these settings."""
        return {"threads": self.threads, "streams": self.streams, "spinning": self.ort_spin}
