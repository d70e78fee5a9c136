"""One Parquet row per image, one file per shard, written atomically (temp file, fsync, rename).

Columns: ``path``, ``sha256`` (of the file's bytes; null when it could not be read), ``score``, ``patch_view`` and
``part_view`` (each view's score in the threshold's units; a bundle without the whole-part score has the score as
its patch view and no part view), ``threshold``, ``verdict`` (``good``/``anomalous``; null with an error),
``error``, ``model_version``, ``heatmap`` (the overlay's path when heatmaps were asked for). The file's metadata
carries the run key and the shard's digest, which is how a restarted run knows the file is whole and its own.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from inspector.durable import replace_durably
from inspector.engine import ScoreResult
from inspector.scorer import PART_VIEW, PATCH_VIEW

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("score", pa.float64()),
        ("patch_view", pa.float64()),
        ("part_view", pa.float64()),
        ("threshold", pa.float64()),
        ("verdict", pa.string()),
        ("error", pa.string()),
        ("model_version", pa.string()),
        ("heatmap", pa.string()),
    ]
)
RUN_KEY_META = b"inspector.batch.run_key"
SHARD_DIGEST_META = b"inspector.batch.shard_digest"


@dataclass(frozen=True)
class Hashed:
    """A file's sha256, or why its bytes could not be read."""

    sha256: str | None
    error: str | None = None


def result_row(
    result: ScoreResult, hashed: Hashed, heatmap: Path | None = None, model_version: str | None = None
) -> dict[str, Any]:
    """The Parquet row of one scored image (a file that could not be read is an error row, whatever the engine
    said)."""
    error = result.error or (None if hashed.error is None else hashed.error)
    views = result.views or {}
    patch = views.get(PATCH_VIEW, result.score if result.views is None else None)
    return {
        "path": result.source,
        "sha256": hashed.sha256,
        "score": None if error else result.score,
        "patch_view": None if error else patch,
        "part_view": None if error else views.get(PART_VIEW),
        "threshold": result.threshold,
        "verdict": None if error or result.anomalous is None else ("anomalous" if result.anomalous else "good"),
        "error": error,
        "model_version": model_version or result.model_version,
        "heatmap": None if heatmap is None else str(heatmap),
    }


def write_shard(path: Path, rows: Sequence[dict[str, Any]], run_key: str, shard_digest: str) -> Path:
    """Write a shard's rows as Parquet at ``path`` atomically and durably: it exists whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {RUN_KEY_META: run_key.encode(), SHARD_DIGEST_META: shard_digest.encode()}
    table = pa.Table.from_pylist(list(rows), schema=SCHEMA.with_metadata(meta))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o644)  # results are read by others (mkstemp makes 0600)
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def shard_is_done(path: Path, run_key: str, shard_digest: str, rows: int) -> bool:
    """Whether ``path`` is a whole result file of this run's shard (its metadata and row count match)."""
    if not Path(path).is_file():
        return False
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    kv = meta.metadata or {}
    return (
        kv.get(RUN_KEY_META) == run_key.encode()
        and kv.get(SHARD_DIGEST_META) == shard_digest.encode()
        and (meta.num_rows == rows)
    )


def read_results(paths: Sequence[Path], columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of several shard files as one table (``columns`` only, when given)."""
    tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in paths]
    if not tables:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(list(columns))
    return pa.concat_tables(tables)
