"""MLflow tracking and registry against a real SQLite store in tmp_path: logging, registration, pyfunc, download."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from inspector.bundle import load_bundle, manifest_digest, sha256_file  # noqa: E402
from inspector.engine import Inspector  # noqa: E402
from inspector.errors import BundleError  # noqa: E402
from inspector.registry_contract import BUNDLE_ARTIFACT  # noqa: E402
from pipelines import tracking  # noqa: E402
from pipelines.pyfunc_model import OUTPUT_COLUMNS  # noqa: E402


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A fresh SQLite tracking store and an experiment whose artifacts live in tmp_path (never ./mlruns)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(tmp_path / "data")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment_id = tracking.ensure_experiment("line-7", tmp_path / "artifacts")
    yield {"uri": uri, "experiment_id": experiment_id, "root": tmp_path}
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # forget the global URI (the env var is restored by monkeypatch)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="module")
def part_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(4):
        path = root / f"part_{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 36, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_tracking_uri_default_is_absolute_sqlite_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri(Path("data"))
    assert uri == f"sqlite:///{(tmp_path / 'data' / 'mlflow.db').resolve()}"
    assert uri.startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path / "data") == "http://127.0.0.1:5000"


def test_flatten_params() -> None:
    flat = tracking.flatten_params(
        {"train": {"lr": 0.001, "stages": (2, 3), "opt": {"name": "adam"}}, "seed": 0, "note": None}
    )
    assert flat == {
        "train.lr": "0.001",
        "train.stages": "(2, 3)",
        "train.opt.name": "adam",
        "seed": "0",
        "note": "None",
    }


def test_log_training_run(store: dict, tmp_path: Path) -> None:
    experiment = MlflowClient().get_experiment(store["experiment_id"])
    assert experiment.artifact_location.startswith((tmp_path / "artifacts").as_uri())
    assert tracking.ensure_experiment("line-7", tmp_path / "elsewhere") == store["experiment_id"]  # idempotent

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{"path": "a.png", "sha256": "00", "label": 0}]))
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"\0" * 64)
    plot = tmp_path / "roc.png"
    Image.new("RGB", (8, 8)).save(plot)
    config = {
        "preprocess": {"height": 32, "width": 32},
        "embedder": {"backbone": "tiny_cnn", "feature_stages": (2, 3)},
        "seed": 0,
    }
    history = {
        "epochs": [
            {
                "epoch": e,
                "train_loss": 1.0 / (e + 1),
                "val_auroc": 0.5 + 0.1 * e,
                "embedding_variance": 0.2,
                "seconds": 2.0,
                "images": 10,
                "images_per_second": 5.0,
                "val_views": {"patch": 0.4 + 0.1 * e, "part": 0.6, "fused": 0.5 + 0.1 * e},
            }
            for e in range(3)
        ],
        "best_epoch": 2,
        "best_val_auroc": 0.7,
        "stopped_early": False,
        "collapsed": False,
        "device": "cpu",
        "initial_val_auroc": 0.45,
        "initial_val_views": {"patch": 0.3, "part": 0.6, "fused": 0.45},
    }
    with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
        tracking.log_training_run(
            config,
            history=history,
            metrics={"image_auroc": 0.9, "escape_rate": 0.1, "bad": float("nan")},
            manifest=manifest,
            checkpoint=checkpoint,
            plots=[plot],
            dataset_hash="abc123",
        )

    client = MlflowClient()
    data = client.get_run(run.info.run_id).data
    assert data.params == {
        "preprocess.height": "32",
        "preprocess.width": "32",
        "embedder.backbone": "tiny_cnn",
        "embedder.feature_stages": "(2, 3)",
        "seed": "0",
    }
    assert data.metrics["image_auroc"] == 0.9 and data.metrics["escape_rate"] == 0.1 and "bad" not in data.metrics
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in losses) == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auroc")] == [0, 1, 2]
    patch = client.get_metric_history(run.info.run_id, "val_auroc_patch")  # each view of the fused score, per epoch
    assert sorted((m.step, m.value) for m in patch) == [
        (0, pytest.approx(0.4)),
        (1, pytest.approx(0.5)),
        (2, pytest.approx(0.6)),
    ]
    assert data.metrics["initial_val_auroc_part"] == 0.6 and data.metrics["initial_val_auroc"] == 0.45
    assert {"embedding_variance", "images_per_second", "best_val_auroc"} <= set(data.metrics)
    assert data.tags["dataset_hash"] == "abc123"
    # the project checkout's HEAD where it is a git checkout (here: where git says so), else "unknown"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tracking.PROJECT_ROOT, capture_output=True, text=True)
    assert data.tags["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert tracking.git_commit(tmp_path) == "unknown"  # not a git checkout
    # the run says which versions produced it (its figures move with numpy, Pillow, torch)
    assert data.tags["env.numpy"] == metadata.version("numpy") and data.tags["env.torch"] == metadata.version("torch")
    assert data.tags["env.python"].count(".") == 2 and set(tracking.RESULT_PACKAGES) == {
        k[4:] for k in data.tags if k.startswith("env.")
    } - {"python", "machine"}
    artifacts = {
        a.path
        for d in ("", "dataset", "checkpoint", "plots", "training")
        for a in client.list_artifacts(run.info.run_id, d or None)
    }
    assert {
        "dataset/manifest.json",
        "checkpoint/last.pt",
        "plots/roc.png",
        "config.json",
        "training/history.json",
    } <= artifacts
    assert Path(client.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path)
    assert not any((Path.cwd() / "mlruns").glob(f"{store['experiment_id']}/*"))  # nothing in the working directory


def test_register_needs_a_run(store: dict, tiny_bundle: Path) -> None:
    with pytest.raises(RuntimeError, match="needs a run"):
        tracking.register_bundle(tiny_bundle, "no-run", tags={})
    assert not MlflowClient().search_registered_models(filter_string="name='no-run'")


def test_register_load_predict_download_and_failed_registration(
    store: dict, tiny_bundle: Path, part_images: list[Path], tmp_path: Path
) -> None:
    client = MlflowClient()
    name = "line-7-inspector"
    versions = []
    for _ in range(2):
        with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
            versions.append(
                tracking.register_bundle(
                    tiny_bundle, name, run_id=run.info.run_id, tags={"dataset_hash": "abc123", "image_auroc": 0.91}
                )
            )
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["dataset_hash"] == "abc123" and tags["image_auroc"] == "0.91" and tags["run_id"] == run.info.run_id
    assert tags["bundle_sha256.model"] == load_bundle(tiny_bundle).manifest["files"]["model.onnx"]

    # the registered pyfunc scores exactly like the line's Inspector
    model = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    missing = tmp_path / "missing.png"
    frame = model.predict(pd.DataFrame({"path": [str(p) for p in part_images] + [str(missing)]}))
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    expected = Inspector.from_bundle(tiny_bundle).score(part_images)
    np.testing.assert_allclose(frame["score"].to_numpy()[:4], [r.score for r in expected], atol=1e-6, rtol=0)
    assert list(frame["verdict"][:4]) == [r.to_dict()["verdict"] for r in expected]
    assert frame["error"][:4].isna().all() and isinstance(frame["error"][4], str) and np.isnan(frame["score"][4])
    assert (frame["model_version"] == expected[0].model_version).all()

    by_list = model.predict([str(part_images[0])])
    by_str = model.predict(str(part_images[0]))
    assert by_list["score"][0] == by_str["score"][0] == pytest.approx(expected[0].score, abs=1e-6)

    # self-contained: a fresh interpreter loads it with the code shipped in the model, and never imports torch
    probe = (
        "import sys, mlflow, json\n"
        f"m = mlflow.pyfunc.load_model('models:/{name}/1')\n"
        f"s = float(m.predict([{str(part_images[0])!r}])['score'][0])\n"
        "import inspector, pipelines.pyfunc_model\n"
        "print(json.dumps([s, inspector.__file__, pipelines.pyfunc_model.__file__, 'torch' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    score, inspector_file, pyfunc_file, torch_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert score == pytest.approx(expected[0].score, abs=1e-6) and not torch_loaded
    assert "/artifacts/code/inspector/" in inspector_file and "/artifacts/code/pipelines/" in pyfunc_file

    got = tracking.download_bundle(f"models:/{name}@challenger", tmp_path / "downloaded")
    assert load_bundle(got).manifest["files"] == load_bundle(tiny_bundle).manifest["files"]

    # a stored bundle replaced whole (its own manifest agrees with its files): the version's hash tags refuse it
    stored = Path(urllib.parse.urlsplit(client.get_model_version_download_uri(name, "2")).path) / "artifacts"
    stored = stored / BUNDLE_ARTIFACT
    references = np.load(stored / "references.npy")
    np.save(stored / "references.npy", np.concatenate([references, references[:1]]))
    manifest = json.loads((stored / "inspector.json").read_text())
    manifest["files"]["references.npy"] = sha256_file(stored / "references.npy")
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (stored / "inspector.json").write_text(json.dumps(manifest))
    assert load_bundle(stored).references.shape[0] == references.shape[0] + 1  # consistent in itself
    with pytest.raises(BundleError, match="references.npy sha256 in the bundle .* does not match the registry's tag"):
        tracking.download_bundle(f"models:/{name}/2", tmp_path / "replaced")
    assert not (tmp_path / "replaced").exists()

    # a bundle corrupted before registration: raises, no new version, alias unchanged
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    with open(broken / "references.npy", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x01\x02\x03\x04")
    with (
        mlflow.start_run(experiment_id=store["experiment_id"]) as run,
        pytest.raises(BundleError, match="references.npy"),
    ):
        tracking.register_bundle(broken, name, run_id=run.info.run_id, tags={})
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'")) == ["1", "2"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert not client.list_artifacts(run.info.run_id)


def test_the_registered_model_is_code_not_a_pickle_and_serves_image_bytes(
    store: dict, tiny_bundle: Path, part_images: list[Path], tmp_path: Path
) -> None:
    """Loading a registered model runs the shipped code (models from code): no pickle in the artifact store. A remote
    client of ``mlflow models serve`` posts image bytes (base64) and gets the line's scores, a bad row named."""
    import base64

    from tests.servers import VENV_BIN, _env, _stop_process, free_port, wait_http

    with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
        version = tracking.register_bundle(tiny_bundle, "from-code", run_id=run.info.run_id)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/from-code/{version.version}", dst_path=str(tmp_path)))
    assert not list(local.rglob("*.pkl")), "nothing pickled in the logged model"
    assert "model_code_path" in (local / "MLmodel").read_text()

    expected = Inspector.from_bundle(tiny_bundle).score(part_images[:2])
    images = [base64.b64encode(p.read_bytes()).decode() for p in part_images[:2]]
    rows = {"image_b64": [*images, "not base64!"], "name": ["a.png", "b.png", "c.png"]}
    frame = mlflow.pyfunc.load_model(f"models:/from-code/{version.version}").predict(pd.DataFrame(rows))
    assert list(frame["path"]) == ["a.png", "b.png", "c.png"]
    np.testing.assert_allclose(frame["score"][:2], [r.score for r in expected], atol=1e-6, rtol=0)
    assert frame["error"][2].startswith("c.png: image_b64 is not base64")

    port, log = free_port(), tmp_path / "serve.log"
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/from-code/{version.version}"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, log)
        body = json.dumps({"dataframe_split": {"columns": ["image_b64", "name"], "data": [[images[0], "cam1.png"]]}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"][0]
    finally:
        _stop_process(proc)
    assert served["path"] == "cam1.png"
    assert served["score"] == pytest.approx(expected[0].score, abs=1e-6)
