"""Batch-scoring throughput: ``pipelines score-batch`` on 1 and 2 workers (Dask, Ray) against the single-process CLI.

The same images and bundle go through ``inspector score`` (one process, all cores) and through the batch flow on
each engine and worker count. For each run: the wall time end to end (process or cluster start, bundle load,
Prefect bookkeeping included), the scoring rate once the engines are loaded (images over the busiest worker's time
in its shards less its one engine load: hashing, decode, forward, search and the Parquet writes; for the CLI,
``Inspector.score_paths`` in this process after the load, the CLI's own path), the scaling efficiency against one
worker, and each worker's peak memory. ``--gpu`` adds onnxruntime's CUDA
execution provider beside the CPU where it is installed and sees a GPU (the ``[gpu]`` extra).

    .venv/bin/python -m benchmarks.batch_scoring BUNDLE FOLDER [--limit 400] [--engines dask,ray] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_json
from inspector.engine import Inspector
from inspector.preprocess import IMAGE_SUFFIXES


def _images(folder: Path, limit: int) -> list[Path]:
    return sorted(q for q in folder.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and "ground_truth" not in q.parts)[
        :limit
    ]


def cli_run(bundle: Path, paths: list[Path]) -> dict[str, Any]:
    """``inspector score`` in its own process: wall time and peak memory; then its scoring path timed in this one."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "inspector.cli", "score", *map(str, paths), "--bundle", str(bundle), "--json"],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if done.returncode not in (0, 2):  # 2: some image was unreadable, which the batch rows report too
        raise RuntimeError(f"inspector score failed: {done.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    inspector = Inspector.from_bundle(bundle)
    list(inspector.score_paths(paths[:32]))  # warm-up
    t0 = time.perf_counter()
    scored = sum(r.error is None for r in inspector.score_paths(paths))
    seconds = time.perf_counter() - t0
    return {
        "engine": "cli",
        "workers": 1,
        "images": len(paths),
        "scored": scored,
        "wall_seconds": wall,
        "images_per_second": len(paths) / seconds,
        "wall_images_per_second": len(paths) / wall,
        "peak_rss_mb_per_worker": peak,
    }


def batch_run(bundle: Path, paths: list[Path], engine: str, workers: int, shard_size: int, work: Path) -> dict:
    """One ``score-batch`` run on a fresh local cluster of ``workers`` processes."""
    from pipelines.batch.flow import BatchRequest, run_score_batch

    listing = work / "images.txt"
    listing.write_text("\n".join(map(str, paths)) + "\n")
    out = work / f"{engine}-{workers}"
    request = BatchRequest(sources=[str(listing)], model=str(bundle), out=str(out), shard_size=shard_size)
    t0 = time.perf_counter()
    result = run_score_batch(request, engine, workers)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    reports = result.scored_now
    per_worker: dict[int, float] = {}
    busy: dict[int, float] = {}
    for r in reports:
        per_worker[r.pid] = max(per_worker.get(r.pid, 0.0), r.peak_rss_mb)
        busy[r.pid] = busy.get(r.pid, 0.0) + r.seconds - r.load_seconds
    span = max(busy.values())
    assert result.summary is not None
    return {
        "engine": engine,
        "workers": workers,
        "images": len(paths),
        "scored": result.summary.scored,
        "wall_seconds": wall,
        "images_per_second": len(paths) / span,
        "wall_images_per_second": len(paths) / wall,
        "peak_rss_mb_per_worker": max(per_worker.values()),
        "worker_processes": len(per_worker),
        "engine_loads_per_worker": max(r.engine_loads for r in reports),
    }


def gpu_rates(bundle: Path, paths: list[Path]) -> dict[str, float] | None:
    """img/s of the line's engine on onnxruntime's CUDA provider beside the CPU, where it exists; else None."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    rates = {}
    for name, providers in (("cpu", ["CPUExecutionProvider"]), ("cuda", ["CUDAExecutionProvider"])):
        inspector = Inspector.from_bundle(bundle, providers=providers)
        list(inspector.score_paths(paths[:32]))
        t0 = time.perf_counter()
        list(inspector.score_paths(paths))
        rates[name] = len(paths) / (time.perf_counter() - t0)
    return rates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("folder", type=Path, help="images anywhere below it (masks under ground_truth/ are not scored)")
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--engines", default="dask,ray")
    p.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated")
    p.add_argument("--shard-size", type=int, default=50)
    p.add_argument("--gpu", action="store_true", help="also time onnxruntime's CUDA provider where it is available")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    paths = _images(args.folder, args.limit)
    if not paths:
        p.error(f"no images under {args.folder}")
    from pipelines import default_env
    from pipelines.batch.flow import prefect_api_for_workers

    default_env()
    rows = [cli_run(args.bundle, paths)]
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp, prefect_api_for_workers():
        for engine in [e for e in args.engines.split(",") if e]:
            for workers in [int(w) for w in args.workers.split(",") if w]:
                rows.append(batch_run(args.bundle, paths, engine, workers, args.shard_size, Path(tmp)))
    for row in rows:
        one = next(
            (r for r in rows if r["engine"] == row["engine"] and r["workers"] == 1), row
        )  # efficiency against the same engine on one worker
        row["scaling_efficiency"] = row["images_per_second"] / (row["workers"] * one["images_per_second"])
    print(f"{len(paths)} images, bundle {args.bundle}")
    head = f"{'engine':<6} {'workers':>7} {'img/s':>8} {'wall s':>7} {'img/s wall':>10} {'efficiency':>10}"
    print(f"{head} {'MB/worker':>9}")
    for r in rows:
        print(
            f"{r['engine']:<6} {r['workers']:>7} {r['images_per_second']:>8.1f} {r['wall_seconds']:>7.1f} "
            f"{r['wall_images_per_second']:>10.1f} {r['scaling_efficiency']:>10.2f} {r['peak_rss_mb_per_worker']:>9.0f}"
        )
    figures: dict[str, Any] = {"images": len(paths), "bundle": str(args.bundle), "rows": rows}
    if args.gpu:
        gpu = gpu_rates(args.bundle, paths)
        figures["gpu"] = gpu
        print(
            "onnxruntime has no CUDA execution provider here (install the [gpu] extra on a CUDA host): GPU not timed"
            if gpu is None
            else f"GPU: {gpu['cuda']:.1f} img/s on CUDA, {gpu['cpu']:.1f} img/s on the CPU (one process)"
        )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
