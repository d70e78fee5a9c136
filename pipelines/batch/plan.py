"""Shards, the run manifest and what is left to do: the pure logic that makes a batch run resumable.

A run is planned from its arguments alone: the ordered image list is cut into shards of ``shard_size``, and each
shard is named by its index and identified by a digest of its paths. ``<out>/run.json`` (the run manifest) records
the run key (the model as asked for, the image list, the shard size and whether heatmaps are drawn), the model
version the run scores with (an alias is resolved once, at the first start, and pinned), and every shard's digest.

A shard is done when ``<out>/shards/shard-NNNNN.parquet`` exists and carries this run's key and its own digest in
its metadata (:mod:`pipelines.batch.rows` writes it atomically, so a file that exists is whole). Started again with
the same arguments, a run scores only the shards that are not done: an image is never written twice, and a killed
shard is scored again from its start. Different arguments against the same ``--out`` are refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inspector.durable import replace_durably

RUN_MANIFEST = "run.json"
SHARDS_DIR = "shards"
RUN_SCHEMA = 1
DEFAULT_SHARD_SIZE = 256


def _digest(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


@dataclass(frozen=True)
class Shard:
    """One unit of work: consecutive images of the run's list."""

    index: int
    paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    @property
    def digest(self) -> str:
        return _digest(self.paths)


def plan_shards(paths: Sequence[str], shard_size: int = DEFAULT_SHARD_SIZE) -> list[Shard]:
    """The ordered image list cut into shards of ``shard_size`` (the last may be smaller)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be 1 or more, got {shard_size}")
    return [
        Shard(i, tuple(paths[start : start + shard_size])) for i, start in enumerate(range(0, len(paths), shard_size))
    ]


def run_key(model: str, paths: Sequence[str], shard_size: int, heatmaps: bool) -> str:
    """What makes two starts the same run: the model as asked for, the images in order, the shard size, heatmaps."""
    head = json.dumps({"model": model, "shard_size": shard_size, "heatmaps": heatmaps, "images": len(paths)})
    return hashlib.sha256(f"{head}\n{_digest(paths)}".encode()).hexdigest()


@dataclass(frozen=True)
class RunManifest:
    """``<out>/run.json``: what this output folder is a run of, with the model version it is pinned to."""

    run_key: str
    model: str  # as asked for: models:/name@alias, models:/name/N, or a bundle folder
    model_version: str  # the version it scores with (pinned at the first start)
    shard_size: int
    images: int
    heatmaps: bool
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"index", "name", "count", "digest"}
    schema_version: int = RUN_SCHEMA

    @classmethod
    def plan(
        cls, model: str, model_version: str, paths: Sequence[str], shard_size: int, heatmaps: bool
    ) -> tuple[RunManifest, list[Shard]]:
        shards = plan_shards(paths, shard_size)
        manifest = cls(
            run_key=run_key(model, paths, shard_size, heatmaps),
            model=model,
            model_version=model_version,
            shard_size=shard_size,
            images=len(paths),
            heatmaps=heatmaps,
            shards=[{"index": s.index, "name": s.name, "count": len(s.paths), "digest": s.digest} for s in shards],
        )
        return manifest, shards

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunManifest:
        if data.get("schema_version") != RUN_SCHEMA:
            raise ValueError(f"run manifest schema {data.get('schema_version')!r} is not {RUN_SCHEMA}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def read_run_manifest(out: Path) -> RunManifest | None:
    """The run manifest in ``out``, or None when the folder holds no run yet."""
    path = Path(out) / RUN_MANIFEST
    if not path.is_file():
        return None
    try:
        return RunManifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: unreadable run manifest ({exc}); use another --out") from None


def write_run_manifest(out: Path, manifest: RunManifest) -> Path:
    """Write ``<out>/run.json`` atomically and durably."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_MANIFEST}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(manifest.to_json())
        os.chmod(tmp, 0o644)
        replace_durably(tmp, out / RUN_MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out / RUN_MANIFEST


def resume_or_start(out: Path, planned: RunManifest, previous: RunManifest | None) -> RunManifest:
    """The manifest this start runs under: the previous one when it is the same run (its pinned model version kept),
    else the new plan when the folder holds no run; a folder that holds another run is refused."""
    if previous is None:
        return planned
    if previous.run_key != planned.run_key:
        raise ValueError(
            f"{Path(out) / RUN_MANIFEST}: this folder holds another run (model {previous.model}, "
            f"{previous.images} images, shard size {previous.shard_size}, heatmaps {previous.heatmaps}); "
            "start it again with the same arguments to resume it, or choose another --out"
        )
    return previous


def shard_file(out: Path, shard: Shard | str) -> Path:
    name = shard if isinstance(shard, str) else shard.name
    return Path(out) / SHARDS_DIR / f"{name}.parquet"


def pending_shards(out: Path, manifest: RunManifest, shards: Sequence[Shard]) -> list[Shard]:
    """The shards without a whole result file of this run (a stale temp file of a killed shard does not count)."""
    from pipelines.batch.rows import shard_is_done

    return [s for s in shards if not shard_is_done(shard_file(out, s), manifest.run_key, s.digest, len(s.paths))]


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Temp files left by shards that were killed before their rename: never read, removed at the next start."""
    folder = Path(out) / SHARDS_DIR
    stale = sorted(folder.glob(".*.tmp*")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
