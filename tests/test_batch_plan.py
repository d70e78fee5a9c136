"""Batch scoring's pure parts: what a SOURCE names, shards, the run manifest, resume, and the Parquet rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.engine import ScoreResult
from pipelines.batch.plan import (
    RunManifest,
    pending_shards,
    plan_shards,
    remove_stale_temp_files,
    resume_or_start,
    shard_file,
)
from pipelines.batch.rows import Hashed, read_results, result_row, shard_is_done, write_shard
from pipelines.batch.sources import collect_images


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(path)
    return path


def test_sources_folders_list_files_and_manifests_in_order_once(tmp_path: Path) -> None:
    a = _image(tmp_path / "line" / "a.png")
    b = _image(tmp_path / "line" / "sub" / "b.jpg")
    (tmp_path / "line" / "notes.txt").write_text("not an image")  # in a folder scan: skipped and reported
    listed = tmp_path / "lists" / "more.txt"
    listed.parent.mkdir()
    listed.write_text(f"# a comment\n\n../line/a.png\n{tmp_path / 'gone.png'}\nrel/c.png\n")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"schema_version": 1, "entries": [_entry(str(a))]}))

    scan = collect_images([str(tmp_path / "line"), str(listed), str(manifest), str(tmp_path / "nothing-*.png")])

    assert scan.paths == [
        str(a),
        str(b),
        str(tmp_path / "gone.png"),  # listed files are not checked: an unreadable one becomes an error row
        str(tmp_path / "lists" / "rel" / "c.png"),
    ]  # a.png came three times (folder, list file as ../line/a.png, manifest): kept once, where first seen
    assert scan.missing == [str(tmp_path / "nothing-*.png")]
    assert [Path(p).name for p, _ in scan.skipped] == ["notes.txt"]


def _entry(path: str) -> dict[str, object]:
    return {
        "path": path,
        "sha256": "0" * 64,
        "label": 0,
        "defect_type": "good",
        "source_split": "",
        "mask": None,
        "group": "",
        "width": 10,
        "height": 12,
    }


def test_list_file_paths_relative_to_the_list(tmp_path: Path) -> None:
    listed = tmp_path / "x" / "l.lst"
    listed.parent.mkdir()
    listed.write_text("a.png\n")
    assert collect_images([str(listed)]).paths == [str(tmp_path / "x" / "a.png")]


def test_shards_cover_every_image_once_in_order() -> None:
    paths = [f"/p/{i}.png" for i in range(10)]
    shards = plan_shards(paths, 4)
    assert [len(s.paths) for s in shards] == [4, 4, 2]
    assert [p for s in shards for p in s.paths] == paths
    assert [s.name for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert len({s.digest for s in shards}) == 3
    with pytest.raises(ValueError, match="shard size"):
        plan_shards(paths, 0)


def test_resume_keeps_the_pinned_version_and_refuses_another_run(tmp_path: Path) -> None:
    paths = [f"/p/{i}.png" for i in range(5)]
    first, _ = RunManifest.plan("models:/m@champion", "m/3", paths, 2, False)
    again, _ = RunManifest.plan("models:/m@champion", "m/4", paths, 2, False)  # the alias moved meanwhile
    assert resume_or_start(tmp_path, again, first).model_version == "m/3"  # the run goes on with the version it began
    assert resume_or_start(tmp_path, again, None).model_version == "m/4"
    for other in (
        RunManifest.plan("models:/m@champion", "m/3", paths + ["/p/new.png"], 2, False)[0],
        RunManifest.plan("models:/m@champion", "m/3", paths, 3, False)[0],
        RunManifest.plan("models:/m@champion", "m/3", paths, 2, True)[0],
        RunManifest.plan("models:/m/2", "m/2", paths, 2, False)[0],
    ):
        with pytest.raises(ValueError, match="holds another run"):
            resume_or_start(tmp_path, other, first)


def _result(path: str, score: float | None, error: str | None = None, views: dict | None = None) -> ScoreResult:
    anomalous = None if score is None else score > 0.5
    return ScoreResult(path, score, 0.5, anomalous, "tiny:1", error, views)


def test_rows_of_scored_and_bad_images() -> None:
    ok = result_row(_result("/a.png", 0.7, views={"patch": 0.7, "part": 0.2}), Hashed("ab" * 32), None, "m/3")
    assert ok == {
        "path": "/a.png",
        "sha256": "ab" * 32,
        "score": 0.7,
        "patch_view": 0.7,
        "part_view": 0.2,
        "threshold": 0.5,
        "verdict": "anomalous",
        "error": None,
        "model_version": "m/3",
        "heatmap": None,
    }
    patch_only = result_row(_result("/b.png", 0.3), Hashed("cd" * 32))
    assert (patch_only["patch_view"], patch_only["part_view"], patch_only["verdict"]) == (0.3, None, "good")
    assert patch_only["model_version"] == "tiny:1"
    bad = result_row(_result("/c.png", None, "/c.png: truncated"), Hashed("ef" * 32))
    assert (bad["score"], bad["verdict"], bad["error"]) == (None, None, "/c.png: truncated")
    unreadable = result_row(_result("/d.png", None, "gone"), Hashed(None, "/d.png: cannot read (No such file)"))
    assert unreadable["sha256"] is None and unreadable["error"] == "gone"


def test_a_shard_is_done_only_when_its_file_is_whole_and_its_own(tmp_path: Path) -> None:
    paths = [f"/p/{i}.png" for i in range(5)]
    manifest, shards = RunManifest.plan("/bundle", "tiny:1", paths, 2, False)
    assert pending_shards(tmp_path, manifest, shards) == shards
    rows = [result_row(_result(p, 0.1), Hashed("00" * 32)) for p in shards[0].paths]
    write_shard(shard_file(tmp_path, shards[0]), rows, manifest.run_key, shards[0].digest)
    # another run's file, and a file with the wrong rows, do not count
    write_shard(shard_file(tmp_path, shards[1]), rows, "another-run", shards[1].digest)
    write_shard(shard_file(tmp_path, shards[2]), rows, manifest.run_key, shards[2].digest)  # 2 rows, shard has 1
    stale = shard_file(tmp_path, shards[1]).with_name(".shard-00001.parquet.abc.tmp")
    stale.write_bytes(b"half a file")
    (tmp_path / "shards" / "shard-00003.parquet").write_bytes(b"PAR1 not really")
    assert [s.index for s in pending_shards(tmp_path, manifest, shards)] == [1, 2]
    assert not shard_is_done(tmp_path / "shards" / "shard-00003.parquet", manifest.run_key, "x", 1)
    assert remove_stale_temp_files(tmp_path) == [stale] and not stale.exists()
    assert [f.name for f in (tmp_path / "shards").iterdir() if f.name.startswith(".")] == []
    table = read_results([shard_file(tmp_path, shards[0])])
    assert table.column("path").to_pylist() == list(shards[0].paths)


def test_a_cluster_by_address_needs_a_prefect_server_its_workers_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.batch.flow import BatchRequest, run_score_batch

    request = BatchRequest(sources=["x"], model="y", out="z")
    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(ValueError, match="PREFECT_API_URL"):
        run_score_batch(request, "dask", dask_address="tcp://127.0.0.1:9")
    with pytest.raises(ValueError, match="unknown engine"):
        run_score_batch(request, "spark")  # type: ignore[arg-type]
