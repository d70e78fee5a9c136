"""What runs inside a worker process: the bundle fetched and verified once, the engine loaded once, shards scored.

A Dask or Ray worker process runs many shards. The first shard it gets fetches the bundle (from the registry
through the line's own client and verified cache, :mod:`pipelines.line_registry`, or a bundle folder the worker can
read), verifies it and loads the line's engine (:class:`inspector.engine.Inspector`); every later shard in that
process reuses it (:func:`engine_for`, a per-process cache). Scoring is the line's: ``Inspector.score_paths``, or
``inspector.heatmap.write_heatmaps`` when heatmaps are asked for; no second scoring path.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from inspector.engine import Inspector, ScoreResult
from inspector.settings import RuntimeSettings
from pipelines.batch.plan import Shard
from pipelines.batch.rows import Hashed, result_row, write_shard


@dataclass(frozen=True)
class ModelSource:
    """Where a worker gets the bundle: a folder it can read, or a pinned registry version (``models:/name/N``) read
    through the line's registry client into ``cache_dir`` (the worker's default cache when None)."""

    bundle: str | None = None
    uri: str | None = None
    registry_uri: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.bundle is None) == (self.uri is None):
            raise ValueError("a model source is a bundle folder or a registry URI, exactly one of them")


@dataclass(frozen=True)
class EngineOptions:
    """How each worker runs the engine: onnxruntime threads and side-by-side batches (None: the worker's
    ``INSPECTOR_THREADS``/``INSPECTOR_STREAMS``, else its cores)."""

    threads: int | None = None
    streams: int | None = None


@dataclass(frozen=True)
class ShardJob:
    """One shard to score and where its results go."""

    shard: Shard
    result_file: str
    run_key: str
    model: ModelSource
    options: EngineOptions = EngineOptions()
    heatmap_dir: str | None = None
    #: what the rows record as the model version: ``name/N`` for a registry version, else the bundle's own
    model_version: str | None = None


@dataclass(frozen=True)
class ShardReport:
    """What a shard came to, and which process scored it (with how many engines that process has loaded)."""

    index: int
    images: int
    errors: int
    flagged: int
    seconds: float
    pid: int
    host: str
    engine_loads: int
    model_version: str
    load_seconds: float = 0.0  # fetching, verifying and loading the engine (its first shard in a process only)
    started: float = 0.0  # wall clock (time.time()) when the shard began and ended: the run's scoring span
    finished: float = 0.0
    peak_rss_mb: float = 0.0  # the worker process's peak resident memory so far


_LOCK = threading.Lock()
_ENGINES: dict[tuple[ModelSource, EngineOptions], Inspector] = {}
_LOADS = 0


def bundle_path(model: ModelSource) -> Path:
    """The verified bundle folder for ``model`` on this host (a registry version fetched into the cache once)."""
    if model.bundle is not None:
        return Path(model.bundle)
    from inspector.registry import BundleCache, default_cache_dir
    from pipelines.line_registry import line_registry_source

    assert model.uri is not None
    cache = Path(model.cache_dir) if model.cache_dir else default_cache_dir()
    source = line_registry_source(cache, model.registry_uri)
    assert isinstance(source.cache, BundleCache)
    return source.fetch(model.uri).path


def engine_for(model: ModelSource, options: EngineOptions) -> Inspector:
    """This process's engine for ``model``: fetched, verified and loaded on first use, then reused."""
    global _LOADS
    key = (model, options)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            runtime = RuntimeSettings.from_env(threads=options.threads, streams=options.streams)
            engine = Inspector(runtime.trusted_bundle(bundle_path(model)), **runtime.engine_options())
            _ENGINES[key] = engine
            _LOADS += 1
        return engine


def engine_loads() -> int:
    """How many engines this process has loaded (1 for a worker that scored any number of shards of one run)."""
    return _LOADS


def file_sha256(path: str) -> Hashed:
    try:
        with open(path, "rb") as fh:
            return Hashed(hashlib.file_digest(fh, "sha256").hexdigest())
    except OSError as exc:
        return Hashed(None, f"{path}: cannot read ({exc.strerror or exc})")


def score_shard(job: ShardJob) -> ShardReport:
    """Score one shard with this process's engine and write its Parquet file atomically; a bad image is a row with
    its error, never a failed shard."""
    started, t0 = time.time(), time.perf_counter()
    engine = engine_for(job.model, job.options)
    load_seconds = time.perf_counter() - t0
    paths = list(job.shard.paths)
    hashes = [file_sha256(p) for p in paths]
    pairs: list[tuple[ScoreResult, Path | None]]
    if job.heatmap_dir is not None:
        from inspector.heatmap import write_heatmaps

        pairs = list(write_heatmaps(engine, paths, Path(job.heatmap_dir) / job.shard.name))
    else:
        pairs = [(r, None) for r in engine.score_paths(paths)]
    version = job.model_version or engine.model_version
    rows = [result_row(result, hashed, heatmap, version) for (result, heatmap), hashed in zip(pairs, hashes)]
    write_shard(Path(job.result_file), rows, job.run_key, job.shard.digest)
    return ShardReport(
        index=job.shard.index,
        images=len(rows),
        errors=sum(r["error"] is not None for r in rows),
        flagged=sum(r["verdict"] == "anomalous" for r in rows),
        seconds=time.perf_counter() - t0,
        pid=os.getpid(),
        host=socket.gethostname(),
        engine_loads=engine_loads(),
        model_version=version,
        load_seconds=load_seconds,
        started=started,
        finished=time.time(),
        peak_rss_mb=_peak_rss_mb(),
    )


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # not on POSIX
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
