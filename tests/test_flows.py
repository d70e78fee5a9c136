"""One real orchestrated training run: Prefect (test harness) + a real SQLite MLflow store + onnxruntime scoring."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inspector.bundle import load_bundle
from inspector.engine import Inspector
from inspector.metrics import roc_auc
from models.demo_data import generate_demo_dataset
from pipelines.recipe import tiny_recipe
from pipelines.settings import PipelineSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_train_flow_registers_challenger_with_reproducible_scores(prefect_harness: None, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from pipelines.flows import DataSource, train_flow
    from pipelines.tracking import download_bundle

    data = tmp_path / "data"
    generate_demo_dataset(data, seed=3, n_train_good=40, n_test_good=10, n_test_per_defect=4, height=64, width=64)
    (data / "train" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # left out, run goes on
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = PipelineSettings(
        work_dir=tmp_path / "work", tracking_uri=uri, experiment="flanges", model_name="flange-inspector"
    )
    recipe = tiny_recipe()
    recipe = replace(
        recipe,
        preprocess=replace(recipe.preprocess, height=64, width=64),
        train=replace(recipe.train, epochs=2),
        epoch_size=32,
    )

    result = train_flow(DataSource(root=str(data)), recipe, settings)

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("flange-inspector", "challenger")
    assert str(version.version) == result.model_version and version.run_id == result.run_id
    run = client.get_run(result.run_id)
    assert run.data.params["train.epochs"] == "2" and run.data.tags["dataset_hash"] == result.dataset_hash
    assert 0.0 <= run.data.metrics["baseline_test_image_auroc"] <= 1.0  # the frozen baseline, same test images
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/roc.png", "plots/score_histogram.png", "plots/heatmaps.png"} <= artifacts
    # the expected false-reject rate and its 95 % upper bound from calibration travel with the run
    assert (
        0.0 <= run.data.metrics["calibration_false_reject_rate"] <= run.data.metrics["calibration_frr_upper_95"] <= 1.0
    )
    assert run.data.metrics["threshold"] == pytest.approx(load_bundle(result.bundle).spec.threshold.value)
    # the operating points a quality engineer chooses from, and what the calibration goods could not resolve
    assert {f"test_escape_at_frr_{p}pct" for p in ("0.5", "1", "2", "5")} <= set(run.data.metrics)
    n_cal = run.data.metrics["calibration_n_good"]
    assert n_cal < 299 and run.data.metrics["calibration_resolves_target"] == 0.0  # a 1 % target needs 299 goods
    assert run.data.metrics["calibration_goods_to_resolve_target"] == 299
    assert run.data.tags["calibration_shortfall"].startswith(f"{int(n_cal)} calibration goods are too few")

    # the bundle downloaded from the registry scores the test images exactly as the run logged them
    logged = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=result.run_id, artifact_path="evaluation/test_scores.json", dst_path=str(tmp_path / "dl")
            )
        ).read_text()
    )
    bundle = download_bundle("models:/flange-inspector@challenger", tmp_path / "registry_bundle")
    paths = sorted(logged)
    rescored = [r.score for r in Inspector.from_bundle(bundle).score(paths)]
    assert np.max(np.abs(np.array(rescored) - np.array([logged[p] for p in paths]))) <= 1e-5

    # the logged AUROC is the one recomputed from those scores
    labels = np.array([0 if "/good/" in p else 1 for p in paths])
    assert run.data.metrics["test_image_auroc"] == pytest.approx(roc_auc(labels, np.array(rescored)), abs=1e-9)
    # which views score was chosen on the evidence (every good out of fold, the validation defects), and the choice
    # and its evidence travel with the bundle and the run; a bundle that scores whole parts says what each view
    # alone would have scored
    spec = load_bundle(result.bundle).spec
    views = spec.threshold.details["whole_part_score"]
    assert views["views"] in ("fused", "max", "patch", "part")
    assert set(views["wins_over_fused"]) == {"patch", "part", "max"}
    assert (spec.density is None) == (views["views"] == "patch")
    assert run.data.metrics["whole_part_view_used"] == float(views["views"] != "patch")
    assert run.data.tags["line_views"] == views["views"]
    record = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/calibration/threshold.json")
    assert record["value"] == spec.threshold.value and record["evidence"]["calibration"] == "cross_fitted"
    assert record["evidence"]["goods"] == run.data.metrics["calibration_n_good"] and record["promise"] == "expected"
    if spec.density is not None:
        assert {"test_image_auroc_patch", "test_image_auroc_part"} <= set(run.data.metrics)
    # the demo's defects have masks: the run says where on the part, too (pixel AUROC of its heatmaps)
    assert 0.5 < run.data.metrics["test_pixel_auroc"] <= 1.0

    # the line model: an INT8 copy was bundled on its own scores and measured against FP32 on the test parts; the
    # one shipped, and why, is in the bundle, the run's artifact, tag and metrics alike
    line = spec.provenance["line_model"]
    assert line == mlflow.artifacts.load_dict(f"runs:/{result.run_id}/line_model.json")
    assert run.data.tags["line_precision"] == line["shipped"]
    assert run.data.metrics["line_int8"] == float(line["shipped"] == "int8")
    assert line["parts"] == len(paths) and 0 <= line["verdict_flips"] <= line["parts"]
    low, high = line["auroc_loss_interval"]  # the loss over the test parts' capture groups, paired
    assert low <= high
    assert (run.data.metrics["int8_auroc_loss_low"], run.data.metrics["int8_auroc_loss_high"]) == (low, high)
    within = line["auroc_loss"] <= 0.005 and line["verdict_flips"] / line["parts"] <= 0.02
    assert line["shipped"] == ("int8" if within else "fp32")
    int8 = load_bundle(result.bundle.parent / "candidates" / "int8")
    fp32 = load_bundle(result.bundle.parent / "candidates" / "fp32")
    assert int8.spec.provenance["quantized"] == "int8-static" and int8.model_version.endswith("+int8")
    assert int8.references.shape == fp32.references.shape and not np.allclose(int8.references, fp32.references)
    assert run.data.metrics["int8_test_image_auroc"] == pytest.approx(line["int8"]["image_auroc"])
    assert load_bundle(result.bundle).model_version == (int8 if within else fp32).model_version


@pytest.mark.parametrize(
    ("mode", "loss"),
    [("patch", "patch_triplet"), ("image", "in_batch_triplet")],
    ids=["patch-model", "image-level-model"],
)
def test_train_flow_trains_with_the_triplet_loss_when_set(
    prefect_harness: None, tmp_path: Path, mode: str, loss: str
) -> None:
    """``--set train.loss=triplet`` reaches the training loop of the default patch model and of the image-level
    model (``embedder.mode=global``), and each run still yields a verified bundle."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.flows import DataSource, train_flow
    from pipelines.settings import apply_overrides, load_overrides

    data = tmp_path / "data"
    generate_demo_dataset(data, seed=5, n_train_good=16, n_test_good=4, n_test_per_defect=2, height=64, width=64)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = PipelineSettings(
        work_dir=tmp_path / "work", tracking_uri=uri, experiment="triplet", model_name="triplet", baseline=False
    )
    options = ["train.loss=triplet", "train.epochs=1", "epoch_size=16", "preprocess.height=64", "preprocess.width=64"]
    options.append("line_precision=fp32")  # the loss is the point here; the INT8 candidate: the test above
    options.append(f"embedder.mode={'patch' if mode == 'patch' else 'global'}")
    recipe = apply_overrides(tiny_recipe(), load_overrides(None, options))  # as `pipelines train --set ...` reads them

    result = train_flow(DataSource(root=str(data)), recipe, settings)

    assert load_bundle(result.bundle).spec.model["mode"] == mode  # a verified bundle of the model asked for
    assert MlflowClient(uri).get_run(result.run_id).data.params["train.loss"] == "triplet"
    logged = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="training/history.json", dst_path=str(tmp_path / "dl")
    )
    history = json.loads(Path(logged).read_text())
    assert history["skipped"] is None and len(history["epochs"]) == 1
    assert history["loss"] == loss
    assert np.isfinite(history["epochs"][0]["train_loss"])


def test_train_cli_also_learns_from_other_part_types_for_new_parts(
    prefect_harness: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pipelines train --also ROOT``: the embedder trains on another part type's pairs as well (twice the items per
    epoch), the bundle stays the first part type's, the run names what else it learnt from, and ``new-part`` serves
    a third part type from its goldens with that embedder."""
    from mlflow import MlflowClient

    from inspector.cli import main as inspector_main
    from pipelines.cli import main

    flanges, wide, ribbed = tmp_path / "flanges", tmp_path / "wide", tmp_path / "third"
    generate_demo_dataset(flanges, seed=5, n_train_good=16, n_test_good=4, n_test_per_defect=2, height=64, width=64)
    generate_demo_dataset(wide, seed=6, n_train_good=16, n_test_good=2, n_test_per_defect=1, height=48, width=96)
    generate_demo_dataset(ribbed, seed=7, n_train_good=6, n_test_good=2, n_test_per_defect=1, height=64, width=64)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = ["train.epochs=1", "epoch_size=16", "input_pixels=null", "preprocess.height=64", "preprocess.width=64"]
    options.append("line_precision=fp32")
    argv = ["train", "--data", str(flanges), "--also", str(wide), "--tracking-uri", uri, "--no-baseline"]
    argv += ["--work-dir", str(tmp_path / "work"), "--model-name", "transfer", "--experiment", "transfer"]
    assert main([*argv, *[a for o in options for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.index("\n}\n") + 2])
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert len(json.loads(run.data.tags["also_trained_on"])) == 1
    history = json.loads(Path(run.info.artifact_uri.removeprefix("file://"), "training", "history.json").read_text())
    assert history["skipped"] is None and history["epochs"][0]["images"] == 2 * 2 * 16  # both part types' pairs

    goldens = sorted((ribbed / "train" / "good").glob("*.png"))
    new = tmp_path / "third-part"
    assert inspector_main(["new-part", summary["bundle"], *map(str, goldens), "--out", str(new), "--threads", "1"]) == 0
    assert load_bundle(new).spec.provenance["new_part"]["embedder"] == load_bundle(summary["bundle"]).model_version


def test_failed_run_registers_nothing(prefect_harness: None, tmp_path: Path) -> None:
    """A run that dies after training (here: an impossible bank size, caught while building the bundle) leaves the
    registry untouched and the MLflow run marked FAILED."""
    from mlflow import MlflowClient

    from pipelines.flows import DataSource, train_flow

    data = tmp_path / "data"
    generate_demo_dataset(data, seed=4, n_train_good=16, n_test_good=4, n_test_per_defect=2, height=64, width=64)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = PipelineSettings(
        work_dir=tmp_path / "work", tracking_uri=uri, experiment="fail", model_name="never", baseline=False
    )
    recipe = tiny_recipe()
    recipe = replace(
        recipe,
        preprocess=replace(recipe.preprocess, height=64, width=64),
        train=replace(recipe.train, epochs=1),
        epoch_size=16,
        max_bank_patches=0,
    )
    with pytest.raises(ValueError, match="reference bank is empty"):
        train_flow(DataSource(root=str(data)), recipe, settings)
    client = MlflowClient(uri)
    assert client.search_model_versions("name='never'") == []
    runs = client.search_runs([client.get_experiment_by_name("fail").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_ingest_cache_key_follows_the_files_the_grouping_and_the_reading_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest cached by an older release (other layout, mask or group rules) or for other files is never reused."""
    from pipelines import flows
    from pipelines.data import layouts, split

    generate_demo_dataset(
        tmp_path / "data", n_train_good=4, n_test_good=2, n_test_per_defect=1, height=32, width=32, seed=0
    )
    source = flows.DataSource(root=str(tmp_path / "data"))
    key = flows._files_fingerprint(None, {"source": source})
    assert key == flows._files_fingerprint(None, {"source": source})
    assert Path(layouts.__file__).read_bytes() in flows._ingest_code()
    assert Path(split.__file__).read_bytes() in flows._ingest_code()
    assert key != flows._files_fingerprint(None, {"source": source, "group_by_folder": True})
    image = next((tmp_path / "data" / "train" / "good").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    changed = flows._files_fingerprint(None, {"source": source})
    assert changed != key
    # a release whose reading code differs (the one fault here that needs a stand-in: the code on disk is ours)
    monkeypatch.setattr(flows, "_ingest_code", lambda: b"a later release of pipelines/data")
    assert flows._files_fingerprint(None, {"source": source}) != changed
