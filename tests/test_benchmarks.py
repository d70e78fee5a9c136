"""Smoke tests of the product benchmarks: each runs for real (generated images, real onnxruntime, the product's
training and bundle code) with its smallest settings, so a change to the product that breaks one fails here."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import (
    batch_scoring,
    decode_resize,
    few_shot,
    inspector_speed,
    quality,
    score_memory,
    thresholds,
    train_throughput,
    whole_part_view,
)

#: the smallest patch model with a whole-part view: a tiny CNN at 64 px, one short epoch
TINY_MODEL = [
    "--set=embedder.backbone=tiny_cnn",
    "--set=embedder.weights=null",
    "--set=embedder.feature_stages=2,3",
    "--set=embedder.embedding_dim=8",
    "--set=embedder.density_stages=2",
]

SMALL_INPUT = ["--set=preprocess.height=64", "--set=preprocess.width=64"]


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """The speed benchmark sets torch's threads for the whole process; put them back for the next test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _sane(figure: dict[str, float]) -> None:
    """A figure with its interval: all within [0, 1], the interval ordered."""
    assert 0.0 <= figure["value"] <= 1.0
    assert 0.0 <= figure["low"] <= figure["high"] <= 1.0


def test_quality_cross_validates_every_defect_once_and_reports_intervals(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quality"
    results = quality.main(
        [
            str(demo_root),
            f"--out={out}",
            "--experiments=product,good-only,few-shot,loto",
            "--folds=2",
            "--int8",
            "--no-baseline",
            "--group-pattern=(\\d+)",  # demo files share numbers across folders: groups mix types and labels
            "--group-gap=0",
            "--size=64x64",
            "--epochs=1",
            "--epoch-size=8",
            "--set=train.batch_size=4",
            "--resamples=40",
            "--few-shot=2",
            "--loto-types=crack",
            "--loto-frozen-only",
            *TINY_MODEL,
        ]
    )
    assert json.loads((out / "results.json").read_text())["product"]["folds"] == 2
    n_defects = results["defect_images"]
    assert n_defects == 36
    product = results["product"]
    assert product["defects_scored"] == n_defects  # every defect image tested ...
    assert product["defect_rows"] == n_defects  # ... exactly once
    assert product["counts"]["overall"] == n_defects
    fused = {"frozen patch", "trained", "trained, INT8"}
    columns = set(product["auroc"])
    assert {c for c in columns if ":" not in c} == fused
    assert {f"{c}: patch" for c in fused} <= columns  # each view alone beside the fused score
    assert columns - fused - {f"{c}: patch" for c in fused} <= {f"{c}: part" for c in fused}  # where every fold kept it
    for column in product["auroc"].values():
        assert len(column) == 7  # overall and the six defect types
        for figure in column.values():
            _sane(figure)
    trained_escape = product["escape"]["trained"]
    for rate in ("0.5", "1", "2", "5"):
        _sane(trained_escape[f"escape at FRR {rate} %"])
    _sane(trained_escape["false-reject rate"])
    assert sum(info["images"] for info in product["int8"]) == 2 * 16 + n_defects  # both folds' test images
    assert len(product["calibration"]["trained"]) == 2
    assert product["images_per_second"]["trained"] > 0
    good_only = results["good-only"]
    assert good_only["counts"]["overall"] == n_defects  # with folds: every defect, none trained on
    _sane(good_only["auroc"]["trained on synthetic"]["overall"])
    assert set(results["few-shot"]["auroc"]) == {"2 photos"}
    loto = results["loto"]
    assert loto["counts"] == {"overall": 6, "crack": 6}
    assert set(loto["auroc"]["frozen patch"]) == {"overall", "crack", "mean of types"}
    printed = capsys.readouterr().out
    assert "2-fold cross-validation by capture group: 36 defects" in printed
    assert "escape at FRR 1 %" in printed


def test_inspector_speed_measures_every_stage_and_the_service(tmp_path: Path) -> None:
    figures = inspector_speed.main(
        [
            "--images=32",
            "--requests=8",
            "--rounds=1",
            "--size=64",
            "--no-patch-only",
            "--no-global",
            f"--json={tmp_path / 'speed.json'}",
            *TINY_MODEL,
        ]
    )
    assert json.loads((tmp_path / "speed.json").read_text())["size"] == 64
    model = figures["models"]["patch (default)"]
    assert set(model["images_per_second"]) == {
        "ort",
        "ort_spinning",
        "ort_side_by_side",
        "score",
        "stream",
        "stream_one_at_a_time",
    }
    assert min(model["images_per_second"].values()) > 0
    assert "whole-part Gaussian" in model["stage_ms"]
    assert min(model["stage_ms"].values()) > 0
    assert model["eager"]["ort_32"] > 0
    assert 0 < model["latency_ms"]["p50"] <= model["latency_ms"]["p99"]
    assert model["service"]["errors"] == 0
    assert model["service"]["combined"] > 0


def test_inspector_speed_compares_trunks_in_fp32_and_int8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = inspector_speed.main(
        [
            "--images=32",
            "--rounds=1",
            "--size=64",
            "--backbones=tiny_cnn",
            "--also-set=embedder.density_skip=1",
            f"--json={tmp_path / 's.json'}",
            *TINY_MODEL,
        ]
    )
    trunks = json.loads((tmp_path / "s.json").read_text())["trunks"]
    # the recipe's own trunk is measured once, with its own weights, and again with the other settings
    assert set(trunks) == {"tiny_cnn (recipe)", "embedder.density_skip=1"}
    row = trunks["tiny_cnn (recipe)"]
    for precision in ("fp32", "int8"):
        assert set(row[precision]) == {"forward", "search", "end_to_end"}
        assert min(row[precision].values()) > 0
        assert min(row["stage_ms"][precision].values()) > 0  # each stage of the line model, one core's forward too
        assert "ORT forward (1 thread, as batches side by side)" in row["stage_ms"][precision]
    assert row["bank"][1] == 8 + 128 + 256  # the 8-d head beside the features of stages 2+3
    assert figures["models"] == {}  # trunks instead of the product settings
    assert "INT8 forward / search / end to end" in capsys.readouterr().out


def test_train_throughput_times_an_image_and_a_patch_model(tmp_path: Path) -> None:
    figures = train_throughput.main(
        [
            "--steps=1",
            "--batch=4",
            "--cases=tiny,demo",
            "--backbones=mobilenet_v3_small",
            "--gpu",
            f"--json={tmp_path / 't.json'}",
        ]
    )
    if not torch.cuda.is_available():
        assert figures["gpu"] is None  # said so, never timed
    rates = json.loads((tmp_path / "t.json").read_text())["images_per_second"]
    assert rates == figures["images_per_second"]
    assert set(rates) == {"tiny", "demo", "mobilenet_v3_small"}  # a trunk named by --backbones is a case of its own
    assert all(math.isfinite(r) and r > 0 for r in rates.values())


def test_decode_resize_times_each_way_and_mono_keeps_the_same_array(tmp_path: Path) -> None:
    figures = decode_resize.main(["--sizes=96x64,640x480", "--input=32x32", "--repeats=1"])
    rows = figures["rows"]
    assert len(rows) == 2 * 2 * 2  # sizes x formats x colour/mono
    assert all(r["line_ms"] > 0 for r in rows)
    assert [r["same_array"] for r in rows if r["mono"]] == [True] * 4
    big_jpeg = next(r for r in rows if r["photo"] == "640x480" and r["format"] == "JPEG" and not r["mono"])
    assert big_jpeg["max_pixel_difference"] <= 2  # the reduced decode changes pixels by a grey level or two
    assert min(r["resize_opencv_ms"] for r in rows) > 0 and big_jpeg["opencv_max_diff"] > 0  # other pixels


@pytest.mark.parametrize("one_batch", [False, True])
def test_score_memory_scores_the_whole_folder(tiny_bundle: Path, demo_root: Path, one_batch: bool) -> None:
    figures = score_memory.main(
        [str(tiny_bundle), str(demo_root), "--limit=40", *(["--one-batch"] if one_batch else [])]
    )
    assert figures["images"] == 40
    assert figures["scored"] == 40
    assert figures["peak_rss_mb"] >= figures["loaded_rss_mb"] > 0
    assert figures["images_per_second"] > 0


def test_thresholds_calibrates_every_way_and_measures_later_goods(demo_root: Path, tmp_path: Path) -> None:
    results = thresholds.main(
        [
            str(demo_root),
            f"--out={tmp_path / 'thresholds.json'}",
            "--goods=20,all",
            "--draws=2",
            *SMALL_INPUT,
            *TINY_MODEL,
        ]
    )
    assert json.loads((tmp_path / "thresholds.json").read_text())["sizes"].keys() == {"20", "all"}
    small, every = results["sizes"]["20"], results["sizes"]["all"]
    methods = {f"{m}+{p}" for m in ("slice", "crossfit") for p in ("point", "expected", "bound")}
    assert set(small["table"]) == methods and set(every["table"]) == methods
    for row in small["rows"] + every["rows"]:
        assert 0.0 <= row["realised_frr"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
    # cross-fitting calibrates on every good of the draw, the slice on a fifth of them
    assert small["table"]["crossfit+point"]["calibration_goods"] == 20
    assert every["table"]["slice+point"]["calibration_goods"] < every["table"]["crossfit+point"]["calibration_goods"]
    # a stricter promise never sets a lower threshold on the same evidence
    for rows in (small["rows"], every["rows"]):
        by = {(r["draw"], r["method"], r["promise"]): r["threshold"] for r in rows}
        for draw, method, _ in by:
            assert by[(draw, method, "point")] <= by[(draw, method, "expected")] <= by[(draw, method, "bound")]
    assert {"patch", "part", "fused", "chosen"} <= set(every["views"])


def test_whole_part_view_times_and_scores_each_choice_of_stages(demo_root: Path, tmp_path: Path) -> None:
    results = whole_part_view.main(
        [str(demo_root), f"--out={tmp_path / 'w.json'}", "--draws=1", "--rounds=1", *SMALL_INPUT, *TINY_MODEL]
    )
    choices = results["choices"]
    # the recipe's own stages first (tiny_cnn: 2, 3), then each cheaper choice the trunk's four stages allow
    assert {name: c["stages"] for name, c in choices.items()} == {
        "stages 2,3": [2, 3],
        "stages 0,1,2": [0, 1, 2],
        "stages 0": [0],
    }
    assert set(results["images_per_second"]) == {"patch view only", *choices}
    assert min(results["images_per_second"].values()) > 0
    for c in choices.values():  # every defect, and each of the demo's defect types
        assert 0.0 <= c["all defects"]["mean"] <= 1.0 and {"crack", "scratch"} <= set(c)
    assert choices["stages 2,3"]["all defects"]["diff_mean"] == 0.0  # each draw is paired with the default's


@pytest.mark.slow
def test_batch_scoring_runs_the_cli_and_a_local_cluster_on_the_same_images(tiny_bundle: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
    figures = batch_scoring.main(
        [
            str(tiny_bundle),
            str(folder),
            "--limit=24",
            "--engines=dask",
            "--workers=1",
            "--shard-size=8",
            "--gpu",
            f"--json={tmp_path / 'batch.json'}",
        ]
    )
    assert json.loads((tmp_path / "batch.json").read_text())["rows"] == json.loads(json.dumps(figures["rows"]))
    rows = {(r["engine"], r["workers"]): r for r in figures["rows"]}
    assert set(rows) == {("cli", 1), ("dask", 1)}
    for row in rows.values():
        assert row["images"] == row["scored"] == 24
        assert row["images_per_second"] > 0 and row["wall_seconds"] > 0 and row["peak_rss_mb_per_worker"] > 0
    assert rows[("dask", 1)]["engine_loads_per_worker"] == 1 and rows[("dask", 1)]["scaling_efficiency"] == 1.0
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert figures["gpu"] is None  # said so, never timed


def test_few_shot_measures_each_k_on_later_goods(demo_root: Path, tmp_path: Path) -> None:
    results = few_shot.main(
        [
            str(demo_root),
            f"--out={tmp_path / 'few_shot.json'}",
            "--shots=1,2,4",
            "--draws=2",
            "--test-goods=8",
            "--test-defects=8",
            *SMALL_INPUT,
            *TINY_MODEL,
        ]
    )
    table = results["table"]
    assert set(table) == {"1", "2", "4"} and all(t["draws"] == 2 for t in table.values())
    assert "realised_frr" not in table["1"]  # one golden: no threshold, as new-part refuses it
    assert table["4"]["frr_upper_95"]["mean"] == pytest.approx(1 - 0.05 ** (1 / 4))  # no golden flagged of 4
    for row in results["rows"]:
        assert 0.0 <= row["auroc"] <= 1.0 and (row["k"] == 1 or 0.0 <= row["realised_frr"] <= 1.0)


def test_few_shot_borrows_a_bundles_embedder_as_new_part_does(
    demo_root: Path, density_bundle: tuple[Path, dict[str, list[Path]]], tmp_path: Path
) -> None:
    """``--embedder BUNDLE``: the bundle's export (fixed at 32x32: the parts letterboxed into it, as ``new-part``
    keeps it) and its whole-part view, instead of the frozen trunk."""
    bundle, _ = density_bundle
    argv = [str(demo_root), "--shots=2,4", "--draws=1", "--test-goods=8", "--test-defects=8", *SMALL_INPUT]
    results = few_shot.main([*argv, f"--embedder={bundle}"])
    assert results["embedder"] == str(bundle)
    assert [r["k"] for r in results["rows"]] == [2, 4]
    assert all(0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["realised_frr"] <= 1.0 for r in results["rows"])
