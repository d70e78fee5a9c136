"""``pipelines score-batch``: the batch-scoring flow, thin over :mod:`pipelines.batch`'s pure functions.

plan (sources → shards → the run manifest, resumed when it is the same run) → one ``score-shard`` task per shard not
yet done, on ``prefect_dask.DaskTaskRunner`` or ``prefect_ray.RayTaskRunner`` (a local cluster by default, an
existing one by address) → summary (``summary.json``, the score histogram; MLflow beside the model version when the
model came from a registry). Progress shows in the Prefect UI as one task run per shard and a progress artifact.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner

from inspector.bundle import load_bundle
from inspector.registry import parse_model_uri
from pipelines.batch.plan import (
    DEFAULT_SHARD_SIZE,
    RunManifest,
    Shard,
    pending_shards,
    read_run_manifest,
    remove_stale_temp_files,
    resume_or_start,
    shard_file,
    write_run_manifest,
)
from pipelines.batch.sources import collect_images
from pipelines.batch.summary import BatchSummary, histogram_plot, log_to_mlflow, summarize, write_summary
from pipelines.batch.worker import EngineOptions, ModelSource, ShardJob, ShardReport, score_shard

Engine = Literal["dask", "ray"]
ENGINES: tuple[Engine, ...] = ("dask", "ray")


@dataclass(frozen=True)
class BatchRequest:
    """One ``score-batch`` invocation: what to score, with which model, where results go, how each worker runs."""

    sources: list[str]
    model: str  # models:/name@alias, models:/name/N, or a bundle folder
    out: str
    shard_size: int = DEFAULT_SHARD_SIZE
    heatmaps: str | None = None
    threads: int | None = None
    streams: int | None = None
    registry_uri: str | None = None
    cache_dir: str | None = None


@dataclass
class BatchResult:
    out: str
    manifest: RunManifest
    scored_now: list[ShardReport] = field(default_factory=list)
    skipped_shards: int = 0
    summary: BatchSummary | None = None
    mlflow_run_id: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    source: ModelSource
    version: str  # what the rows record: the bundle's model version, or name/N of a registry version
    registry: tuple[str, str] | None = None  # (name, version) when it came from a registry


def resolve_model(model: str, registry_uri: str | None, cache_dir: str | None, pinned: str | None) -> ResolvedModel:
    """A bundle folder as it is; a registry URI pinned to one version (``pinned``, the version a resumed run already
    scores with, else the version the alias points to now), so every worker loads the same version."""
    if Path(model).is_dir():
        bundle = load_bundle(model)  # verified here first: a bad bundle stops the run before any worker starts
        return ResolvedModel(ModelSource(bundle=str(Path(model).absolute())), bundle.model_version)
    from pipelines.line_registry import registry_reader

    uri = parse_model_uri(model)
    version = pinned.rsplit("/", 1)[-1] if pinned else None
    if version is None:
        if registry_uri is None:
            raise ValueError("a registry model needs a registry URI")
        version = registry_reader(registry_uri).resolve(uri).version
    source = ModelSource(uri=f"models:/{uri.name}/{version}", registry_uri=registry_uri, cache_dir=cache_dir)
    return ResolvedModel(source, f"{uri.name}/{version}", (uri.name, version))


def local_workers(requested: int | None) -> int:
    return requested or max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def make_task_runner(
    engine: Engine, workers: int | None = None, dask_address: str | None = None, ray_address: str | None = None
) -> TaskRunner[Any]:
    """Prefect's runner for ``engine``: an existing cluster by address, else a local one of ``workers`` processes
    on 127.0.0.1 (Dask ``LocalCluster``, one thread a worker; a local Ray with ``workers`` CPUs)."""
    if engine == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": local_workers(workers),
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": None,  # no dashboard: None turns it off
            }
        )
    if engine == "ray":
        from prefect_ray import RayTaskRunner

        if ray_address:
            return RayTaskRunner(address=ray_address)
        return RayTaskRunner(
            init_kwargs={
                "num_cpus": local_workers(workers),
                "include_dashboard": False,
                "object_store_memory": 128 * 1024**2,  # shards move paths and small reports, never images
            }
        )
    raise ValueError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")


@task(name="score-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def score_shard_task(job: ShardJob) -> ShardReport:
    """Score one shard on this worker (its engine loaded once per process) and write its Parquet file."""
    report = score_shard(job)
    get_run_logger().info(
        "%s: %d images, %d errors, %d flagged in %.1f s (pid %d)",
        job.shard.name,
        report.images,
        report.errors,
        report.flagged,
        report.seconds,
        report.pid,
    )
    return report


@flow(name="score-batch", log_prints=True, validate_parameters=False)
def score_batch_flow(request: BatchRequest) -> BatchResult:
    """Score every image of ``request.sources`` in shards on the flow's task runner; resumes a killed run."""
    logger = get_run_logger()
    out = Path(request.out).absolute()
    scan = collect_images(request.sources)
    if scan.missing:
        raise FileNotFoundError(f"no such file, folder or matching glob: {', '.join(scan.missing)}")
    if not scan.paths:
        raise ValueError("no images to score")
    for path, why in scan.skipped[:10]:
        logger.warning("skipped %s: %s", path, why)
    previous = read_run_manifest(out)
    pinned = previous.model_version if previous is not None and previous.model == request.model else None
    model = resolve_model(request.model, request.registry_uri, request.cache_dir, pinned)
    planned, shards = RunManifest.plan(
        request.model, model.version, scan.paths, request.shard_size, request.heatmaps is not None
    )
    manifest = resume_or_start(out, planned, previous)
    write_run_manifest(out, manifest)
    remove_stale_temp_files(out)
    todo = pending_shards(out, manifest, shards)
    logger.info(
        "%d images in %d shards with %s: %d shards to score, %d done before",
        manifest.images,
        len(shards),
        model.version,
        len(todo),
        len(shards) - len(todo),
    )
    result = BatchResult(str(out), manifest, skipped_shards=len(shards) - len(todo))
    options = EngineOptions(request.threads, request.streams)
    jobs = [
        ShardJob(
            shard=s,
            result_file=str(shard_file(out, s)),
            run_key=manifest.run_key,
            model=model.source,
            options=options,
            heatmap_dir=str(Path(request.heatmaps).absolute()) if request.heatmaps else None,
            model_version=model.version,
        )
        for s in todo
    ]
    result.scored_now, failed = _run_shards(jobs, len(shards))
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(shards)} shards failed ({', '.join(failed[:5])}); the others are written: "
            "start the run again with the same arguments to score what is missing"
        )
    files = [shard_file(out, s) for s in shards]
    summary, scores = summarize(files, request.model, model.version)
    result.summary = summary
    artifacts = [
        write_summary(out, summary),
        histogram_plot(
            scores, summary.threshold, out / "score_histogram.png", f"{model.version}: {summary.images} images"
        ),
        out / "run.json",
    ]
    if model.registry is not None:
        result.mlflow_run_id = log_to_mlflow(
            summary, *model.registry, artifacts, {"batch.out": str(out), "batch.run_key": manifest.run_key}
        )
    logger.info("summary: %s", summary.to_dict())
    return result


def _run_shards(jobs: list[ShardJob], total: int) -> tuple[list[ShardReport], list[str]]:
    """Submit every job, follow them in the Prefect UI (a progress artifact), collect reports and failures."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    if not jobs:
        return [], []
    done_before = total - len(jobs)
    progress = create_progress_artifact(100.0 * done_before / total, key="score-batch-progress")
    assert isinstance(progress, UUID)  # called from a sync flow: the id, not a coroutine
    futures = score_shard_task.map(jobs)
    reports: list[ShardReport] = []
    failed: list[str] = []
    for job, future in zip(jobs, futures):
        try:
            reports.append(future.result())
        except Exception as exc:  # a shard that failed twice; the rest go on
            failed.append(f"{job.shard.name}: {exc}")
        update_progress_artifact(progress, 100.0 * (done_before + len(reports) + len(failed)) / total)
    return reports, failed


@contextlib.contextmanager
def prefect_api_for_workers() -> Iterator[str | None]:
    """Every worker process reports to one Prefect API: the configured one, else a temporary server started here
    (Prefect would otherwise start one inside each worker that asks)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url  # local Dask and Ray workers are started from this environment
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        _drain_prefect_clients()
        server.stop()


def _drain_prefect_clients() -> None:
    """Send the logs and events still queued before the temporary server stops (else the exit waits on retries)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for drain in (APILogWorker.drain_all, EventsWorker.drain_all):
        with contextlib.suppress(Exception):
            drain()


def run_score_batch(
    request: BatchRequest,
    engine: Engine = "dask",
    workers: int | None = None,
    dask_address: str | None = None,
    ray_address: str | None = None,
) -> BatchResult:
    """Run the flow on ``engine``. On a local cluster each worker gets an equal share of the cores unless
    ``request.threads`` says otherwise; on a cluster by address each worker uses its own settings."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
    remote = dask_address if engine == "dask" else ray_address
    if remote:
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ValueError(
                f"scoring on the cluster at {remote} needs a Prefect server its workers reach: set PREFECT_API_URL "
                "(a temporary server on this host is reachable from local workers only)"
            )
    if request.threads is None and not remote:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        request = _with(request, threads=max(1, cores // local_workers(workers)))
    runner = make_task_runner(engine, workers, dask_address, ray_address)
    with prefect_api_for_workers():
        return score_batch_flow.with_options(task_runner=runner)(request)


@flow(name="score-batch-job", log_prints=True)
def score_batch_deployment(
    sources: list[str],
    model: str,
    out: str,
    engine: str = "dask",
    dask_address: str | None = None,
    ray_address: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    heatmaps: str | None = None,
    threads: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """The scoring deployment (``deploy/prefect-scoring.yaml``): ``pipelines score-batch`` run by a Prefect worker,
    on the Dask or Ray cluster at ``dask_address``/``ray_address`` (a local one when empty). The registry is the
    worker's ``MLFLOW_TRACKING_URI``."""
    import mlflow

    registry_uri = None if Path(model).is_dir() else mlflow.get_registry_uri()
    request = BatchRequest(
        sources=list(sources),
        model=model,
        out=out,
        shard_size=shard_size,
        heatmaps=heatmaps or None,
        threads=threads,
        registry_uri=registry_uri,
    )
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
    result = run_score_batch(request, engine, workers, dask_address or None, ray_address or None)
    assert result.summary is not None
    return {"out": result.out, "summary": result.summary.to_dict(), "mlflow_run_id": result.mlflow_run_id}


def _with(request: BatchRequest, **changes: Any) -> BatchRequest:
    from dataclasses import replace

    return replace(request, **changes)


__all__ = ["BatchRequest", "BatchResult", "Shard", "make_task_runner", "run_score_batch", "score_batch_flow"]
