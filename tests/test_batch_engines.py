"""Batch scoring on real engines on 127.0.0.1: a Dask LocalCluster and a local Ray, each of 2 worker processes,
score 200 generated images as the single-process ``inspector score`` does; a run killed mid-way and started again
scores every image exactly once; bad images are rows with their errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from inspector.cli import main as inspector_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BAD = ("truncated.png", "empty.png", "notes.png")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def line_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 small generated parts of a few sizes, and three files no decoder reads."""
    root = tmp_path_factory.mktemp("line_images")
    rng = np.random.default_rng(5)
    for i in range(200):
        h, w = (40, 48) if i % 3 else (36, 30)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"part_{i:03d}.png")
    good = (root / "part_000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def cli_scores(line_images: Path, tiny_bundle: Path) -> dict[str, float | None]:
    """What the single-process CLI says about the same images: the reference the workers must match."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
        inspector_main(["score", str(line_images), "--bundle", str(tiny_bundle), "--json"])
    return {row["path"]: row["score"] for row in json.loads(buffer.getvalue())}


def _rows(out: Path) -> list[dict]:
    return [row for f in sorted((out / "shards").glob("shard-*.parquet")) for row in pq.read_table(f).to_pylist()]


def _check_against_cli(rows: list[dict], cli_scores: dict[str, float | None], version: str) -> None:
    assert sorted(r["path"] for r in rows) == sorted(cli_scores)  # every image exactly once
    by_path = {r["path"]: r for r in rows}
    for path, expected in cli_scores.items():
        row = by_path[path]
        assert row["model_version"] == version
        if Path(path).name in BAD:
            assert expected is None and row["score"] is None and row["verdict"] is None
            assert row["error"] and Path(path).name in row["error"]
        else:
            assert row["error"] is None and row["score"] == pytest.approx(expected, abs=1e-5)
            assert row["verdict"] == ("anomalous" if row["score"] > row["threshold"] else "good")
            assert row["sha256"] == _sha256(path)


def _sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_engine_per_worker(reports: list) -> set[int]:
    """Each worker process loaded the engine once, whatever number of shards it scored."""
    assert all(r.engine_loads == 1 for r in reports), [(r.pid, r.engine_loads) for r in reports]
    return {r.pid for r in reports}


def test_dask_local_cluster_scores_as_the_cli(
    prefect_api: str, line_images: Path, tiny_bundle: Path, cli_scores: dict, tmp_path: Path
) -> None:
    from pipelines.batch.flow import BatchRequest, run_score_batch

    request = BatchRequest(
        sources=[str(line_images)],
        model=str(tiny_bundle),
        out=str(tmp_path / "out"),
        shard_size=16,
        heatmaps=str(tmp_path / "maps"),
    )
    result = run_score_batch(request, "dask", workers=2)

    rows = _rows(tmp_path / "out")
    _check_against_cli(rows, cli_scores, "tiny:1")
    pids = _one_engine_per_worker(result.scored_now)
    assert len(result.scored_now) == 13 and len(pids) == 2 and os.getpid() not in pids
    assert all(Path(r["heatmap"]).is_file() for r in rows if r["error"] is None)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["images"], summary["scored"], summary["errors"]) == (203, 200, 3)
    assert summary["flagged"] == sum(r["verdict"] == "anomalous" for r in rows)
    assert (tmp_path / "out" / "score_histogram.png").stat().st_size > 0


def test_ray_scores_a_registry_version_as_the_cli_and_logs_beside_it(
    prefect_api: str,
    line_images: Path,
    tiny_bundle: Path,
    cli_scores: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from pipelines import tracking
    from pipelines.batch.flow import BatchRequest, run_score_batch

    uri = tracking.tracking_uri(tmp_path / "mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    tracking.ensure_experiment("line-9", tmp_path / "artifacts")
    with mlflow.start_run() as run:
        version = tracking.register_bundle(tiny_bundle, "tiny-batch").version
    request = BatchRequest(
        sources=[str(line_images)],
        model="models:/tiny-batch@challenger",
        out=str(tmp_path / "out"),
        shard_size=32,
        registry_uri=uri,
        cache_dir=str(tmp_path / "cache"),
    )
    result = run_score_batch(request, "ray", workers=2)

    _check_against_cli(_rows(tmp_path / "out"), cli_scores, f"tiny-batch/{version}")
    pids = _one_engine_per_worker(result.scored_now)
    assert len(result.scored_now) == 7 and 1 <= len(pids) <= 2 and os.getpid() not in pids
    assert [p.name for p in (tmp_path / "cache" / "tiny-batch").iterdir() if not p.name.startswith("_")] == [
        str(version)
    ]  # fetched into the line's cache as the pinned version, verified there
    assert result.mlflow_run_id is not None
    logged = MlflowClient(uri).get_run(result.mlflow_run_id)
    assert logged.info.experiment_id == MlflowClient(uri).get_run(run.info.run_id).info.experiment_id
    assert logged.data.tags["model_version"] == str(version) and logged.data.tags["model_name"] == "tiny-batch"
    assert logged.data.metrics["images"] == 203 and logged.data.metrics["errors"] == 3
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(result.mlflow_run_id, "score_batch")}
    assert {"score_batch/summary.json", "score_batch/score_histogram.png", "score_batch/run.json"} <= artifacts


def test_a_killed_run_started_again_scores_every_image_exactly_once(
    prefect_api: str, line_images: Path, tiny_bundle: Path, cli_scores: dict, tmp_path: Path
) -> None:
    """A file that hangs every read (a FIFO no one writes: a stuck network share) holds one shard forever; the run is
    killed (SIGKILL to its whole process group: the flow and its Dask workers) once other shards are written, then
    the FIFO is replaced by the real image and the run started again with the same arguments."""
    images = sorted(str(p) for p in line_images.iterdir())
    stuck = tmp_path / "stuck.png"
    os.mkfifo(stuck)
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join([images[0], str(stuck), *images[1:]]) + "\n")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "pipelines.cli", "score-batch", str(listing), "--model", str(tiny_bundle),
        "--out", str(out), "--shard-size", "16", "--workers", "2", "--engine", "dask",
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "shards").glob("shard-*.parquet")) and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        assert list((out / "shards").glob("shard-*.parquet")), "no shard was written in time"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (out / "shards").glob("shard-*.parquet")}
    assert "shard-00000.parquet" not in before  # the stuck shard never finished
    stuck.unlink()
    stuck.write_bytes(Path(images[0]).read_bytes())

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    report = json.loads(second.stdout[second.stdout.index("{") :])
    shards = len(json.loads((out / "run.json").read_text())["shards"])
    assert report["shards_done_before"] == len(before) and report["shards_scored_now"] == shards - len(before)
    after = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (out / "shards").glob("shard-*.parquet")}
    assert {k: after[k] for k in before} == before  # nothing written before the kill was written again
    rows = _rows(out)
    assert len(rows) == len(images) + 1 == len({r["path"] for r in rows})  # every image exactly once
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(stuck)]["score"] == pytest.approx(cli_scores[images[0]], abs=1e-5)
    _check_against_cli([r for r in rows if r["path"] != str(stuck)], cli_scores, "tiny:1")
    assert not [f for f in (out / "shards").iterdir() if f.name.startswith(".")]  # no temp file left behind
