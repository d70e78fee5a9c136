"""The line's one configuration mechanism: typed pydantic models, ``INSPECTOR_<FIELD>`` variables, read once.

Why a module of its own: the engine takes every setting as an argument and reads no environment, so a notebook,
the CLI and the service get the same engine; the entry points (``inspector score``, ``inspector serve``) build a
settings model here from the defaults, then ``INSPECTOR_<FIELD>`` variables, then their flags, and pass it down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inspector.bundle import Bundle, load_bundle
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
    require_signature: bool = Field(False, description="run only bundles signed by the key in public_key")
    public_key: Path | None = Field(None, description="Ed25519 public key (PEM) that signs the bundles this line runs")

    @model_validator(mode="after")
    def _signature_needs_a_key(self) -> Self:
        if self.require_signature and self.public_key is None:
            raise ValueError("require_signature needs public_key (the PEM file of the key that signs bundles)")
        return self

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

    def trusted_bundle(self, path: str | Path) -> Bundle:
        """The bundle at ``path``, verified (hashes, content digest) and, where this line asks for it, signed by its
        key: checked before onnxruntime ever opens the model."""
        bundle = load_bundle(path)
        if self.require_signature:
            from inspector.signing import load_public_key, verify_signature

            assert self.public_key is not None  # the validator's promise
            verify_signature(bundle, load_public_key(self.public_key))
        return bundle

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments :class:`inspector.engine.Inspector` takes from these settings."""
        return {"threads": self.threads, "streams": self.streams, "spinning": self.ort_spin}
