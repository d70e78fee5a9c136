"""MLflow tracking and registry for a training run: params, metrics, artifacts, and the bundle as a model version.

Plain functions (no Prefect here) so a flow, the CLI and the tests call the same code:

- :func:`tracking_uri` / :func:`ensure_experiment`: where runs go (SQLite under the data directory by default,
  ``MLFLOW_TRACKING_URI`` wins) and an experiment per product line whose artifacts never land in the cwd.
- :func:`log_training_run`: the whole config as params, per-epoch history, final metrics, artifacts, tags.
- the registered model is :class:`pipelines.pyfunc_model.InspectorModel`, logged as code (models from code), so
  ``mlflow.pyfunc.load_model("models:/<name>@challenger")`` and ``mlflow models serve`` give the line's scores and
  never unpickle anything.
- :func:`register_bundle`: verify the bundle, log it, and only then create the model version and move the
  ``challenger`` alias; anything that raises before leaves the registry untouched.
- :func:`download_bundle`: fetch a registered version's bundle the way the line fetches it, verified.

The names registration shares with the gate and the line (artifact, aliases, version tags, the hash check) are
:mod:`inspector.registry_contract`'s.

This module imports only mlflow, pandas and ``inspector`` (no torch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from inspector.bundle import Bundle, load_bundle
from inspector.engine import Inspector
from inspector.registry_contract import (
    BUNDLE_ARTIFACT,
    BUNDLE_MODEL_VERSION_TAG,
    CHALLENGER,
    DATASET_HASH_TAG,
    GIT_COMMIT_TAG,
    RUN_ID_TAG,
    THRESHOLD_RULE_TAG,
    THRESHOLD_TAG,
    WHOLE_PART_SCORE_TAG,
    bundle_hash_tags,
    slug,
)
from pipelines.pyfunc_model import ENTRY_FILE, model_signature, serving_requirements, stage_code

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRACKING_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MODEL_NAME_IN_RUN = "model"
EPOCH_METRICS = ("train_loss", "val_auroc", "embedding_variance", "images_per_second")
#: Packages whose version can move a run's figures (numerics, image decoding and resizing, augmentation, export):
#: tagged on every training run as ``env.<package>``
RESULT_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "albumentations",
    "scikit-learn",
    "onnx",
    "onnxruntime",
)
MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value


# --------------------------------------------------------------------------------------------- where runs go


def tracking_uri(data_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite store ``<data_dir>/mlflow.db`` (absolute: 4 slashes)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(data_dir / TRACKING_DB).as_posix()}"  # as_posix() starts with "/" → sqlite:////abs/...


def _local_sqlite_file(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :].split("?", 1)[0]
        if rest and rest != ":memory:":
            return Path(rest if rest.startswith("/") else Path.cwd() / rest)
    return None


def ensure_experiment(name: str, artifact_root: Path | None = None) -> str:
    """Get or create the experiment ``name`` (one per product line), make it the active one, return its id.

    A new experiment stores its artifacts under ``artifact_root/<name>``; with no ``artifact_root`` and a local
    SQLite store, under ``mlartifacts/`` beside the database; with a tracking server, where the server says.
    Never the cwd's ``./mlruns``. An existing experiment keeps its artifact location (``artifact_root`` is ignored).
    """
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        if artifact_root is None:
            db = _local_sqlite_file(mlflow.get_tracking_uri())
            artifact_root = db.parent / ARTIFACTS_DIR if db is not None else None
        location = None
        if artifact_root is not None:
            path = Path(artifact_root).expanduser().resolve() / slug(name, fallback="experiment")
            path.mkdir(parents=True, exist_ok=True)
            location = path.as_uri()
        try:
            experiment_id = client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:  # created concurrently by another process
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment_id = client.get_experiment_by_name(name).experiment_id  # type: ignore[union-attr]
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# --------------------------------------------------------------------------------------------- logging a run


def _param_value(value: Any) -> str:
    if isinstance(value, Path):
        text = value.as_posix()
    elif isinstance(value, (list, tuple, set, frozenset)):
        text = str(tuple(value)) if isinstance(value, tuple) else str(list(value))
    else:
        text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 1] + "…"


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}, "seed": 0}`` → ``{"train.lr": "0.001", "seed": "0"}``; tuples as ``"(2, 3)"``."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = _param_value(value if not isinstance(value, Mapping) else "{}")
    return flat


def git_commit(repo_dir: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repository (the project's own by default), or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir or PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_mapping(obj: Any) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"expected a mapping or an object with to_dict(), got {type(obj).__name__}")


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call this inside `with mlflow.start_run():`")
    return run.info.run_id


def log_training_run(
    config: Mapping[str, Any] | Any,
    *,
    history: Mapping[str, Any] | Any | None = None,
    metrics: Mapping[str, Any] | None = None,
    manifest: Path | Mapping[str, Any] | Sequence[Any] | None = None,
    checkpoint: Path | None = None,
    plots: Iterable[Path] = (),
    dataset_hash: str | None = None,
    tags: Mapping[str, Any] | None = None,
    repo_dir: Path | None = None,
) -> str:
    """Log one training run into the active MLflow run and return its id.

    - ``config`` (a dict like ``Recipe.to_dict()``, or anything with ``to_dict()``): every leaf as a param with a
      dotted key, and the whole dict as ``config.json``;
    - ``history`` (``TrainHistory.to_dict()``): train_loss, val_auroc, embedding_variance, images_per_second per
      epoch with ``step=epoch`` (and ``val_auroc_<view>`` for each view of a fused score), best_epoch /
      best_val_auroc, and ``training/history.json``;
    - ``metrics``: final metrics (non-finite and None values are skipped);
    - ``manifest`` (a JSON file, or the manifest itself), ``checkpoint`` and ``plots`` (PNG files) as artifacts;
    - tags: ``dataset_hash``, ``git_commit`` (or ``"unknown"``), ``env.*`` (:func:`environment_tags`), plus ``tags``.
    """
    run_id = _active_run_id()
    client = MlflowClient()
    config_dict = dict(_as_mapping(config))
    history_dict = dict(_as_mapping(history))

    metric_rows: list[Metric] = []
    now = _now_ms()
    for record in history_dict.get("epochs", []) or []:
        step = int(record.get("epoch", len(metric_rows)))
        for key in EPOCH_METRICS:
            value = _finite(record.get(key))
            if value is not None:
                metric_rows.append(Metric(key, value, now, step))
        for view, raw in (record.get("val_views") or {}).items():  # what each view of the line's score says alone
            value = _finite(raw)
            if value is not None:
                metric_rows.append(Metric(f"val_auroc_{view}", value, now, step))
    for view, raw in (history_dict.get("initial_val_views") or {}).items():
        value = _finite(raw)
        if value is not None:
            metric_rows.append(Metric(f"initial_val_auroc_{view}", value, now, 0))
    for key in ("best_epoch", "best_val_auroc", "initial_val_auroc"):
        value = _finite(history_dict.get(key))
        if value is not None:
            metric_rows.append(Metric(key, value, now, 0))
    for key, raw in (metrics or {}).items():
        value = _finite(raw)
        if value is None:
            log.warning("metric %s=%r is not a finite number: not logged", key, raw)
            continue
        metric_rows.append(Metric(str(key), value, now, 0))

    all_tags = {"dataset_hash": dataset_hash or "unknown", "git_commit": git_commit(repo_dir), **environment_tags()}
    for key in ("stopped_early", "collapsed", "device", "skipped"):
        if history_dict.get(key) is not None:
            all_tags[f"training.{key}"] = history_dict[key]
    all_tags.update(tags or {})
    client.log_batch(
        run_id,
        metrics=metric_rows,
        params=[Param(k, v) for k, v in flatten_params(config_dict).items()],
        tags=[RunTag(str(k), _param_value(v)) for k, v in all_tags.items()],
    )

    mlflow.log_dict(config_dict, "config.json")
    if history_dict:
        mlflow.log_dict(history_dict, "training/history.json")
    if isinstance(manifest, (str, Path)):
        mlflow.log_artifact(str(_existing_file(manifest, "manifest")), "dataset")
    elif manifest is not None:
        mlflow.log_text(json.dumps(manifest, indent=2, sort_keys=True, default=str), "dataset/manifest.json")
    if checkpoint is not None:
        mlflow.log_artifact(str(_existing_file(checkpoint, "checkpoint")), "checkpoint")
    for plot in plots:
        mlflow.log_artifact(str(_existing_file(plot, "plot")), "plots")
    return run_id


def environment_tags() -> dict[str, str]:
    """What a run ran on: Python, the machine, and the version of each result-moving package (``"absent"`` when it
    is not installed). Why: the same code and data can score differently under another numpy, Pillow or CPU, and
    a run that does not say what it ran on cannot be reproduced or compared."""
    tags = {"env.python": platform.python_version(), "env.machine": f"{platform.machine()} {platform.system()}"}
    for package in RESULT_PACKAGES:
        try:
            tags[f"env.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"env.{package}"] = "absent"
    return tags


def _now_ms() -> int:
    return int(time.time() * 1000)


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    return path


# --------------------------------------------------------------------------------------------- the registry


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        try:
            client.create_registered_model(
                name, description="Siamese part inspector: an ONNX bundle scored by `inspector`."
            )
        except MlflowException as exc2:
            if exc2.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise


def _version_tags(bundle: Bundle, run_id: str, tags: Mapping[str, Any]) -> dict[str, str]:
    derived: dict[str, Any] = {
        RUN_ID_TAG: run_id,
        BUNDLE_MODEL_VERSION_TAG: bundle.model_version,
        **bundle_hash_tags(bundle),
        THRESHOLD_TAG: bundle.spec.threshold.value,
        THRESHOLD_RULE_TAG: bundle.spec.threshold.rule,
        WHOLE_PART_SCORE_TAG: "on" if bundle.spec.density is not None else "off",
        DATASET_HASH_TAG: bundle.spec.provenance.get("dataset_hash", "unknown"),
        GIT_COMMIT_TAG: git_commit(),
    }
    derived.update(tags)
    return {str(k): _param_value(v) for k, v in derived.items()}


def register_bundle(
    bundle_dir: Path,
    model_name: str,
    *,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    alias: str = CHALLENGER,
) -> ModelVersion:
    """Log the verified bundle as a pyfunc in the run and register it as a new version of ``model_name``.

    Order matters: (1) copy the bundle to a staging dir and verify the copy (hashes, schema, and that
    onnxruntime loads it), (2) log the pyfunc from that copy, (3) only then create the version, with tags
    (run id, bundle hashes, threshold, dataset hash, git commit, and ``tags`` such as key metrics), and move
    ``alias`` onto it. If (1) or (2) raises, the registry is untouched; if setting the alias fails, the new
    version is deleted again. Logs into the active run, or reopens ``run_id``.
    """
    bundle_dir = Path(bundle_dir)
    active = mlflow.active_run()
    if run_id is None and active is None:
        raise RuntimeError("register_bundle needs a run: pass run_id or call it inside `with mlflow.start_run():`")
    if active is not None and run_id is not None and active.info.run_id != run_id:
        raise RuntimeError(f"run {run_id} is not the active run ({active.info.run_id})")
    run_id = run_id or active.info.run_id  # type: ignore[union-attr]

    with tempfile.TemporaryDirectory(prefix="register-bundle-") as staging:
        staged = Path(staging) / BUNDLE_ARTIFACT
        shutil.copytree(bundle_dir, staged)
        bundle = load_bundle(staged)  # raises BundleError on a tampered, incomplete or unknown bundle
        Inspector(bundle)  # and the model must load in onnxruntime with references of the right width
        code_paths = stage_code(Path(staging) / "code")
        log_kwargs = dict(
            name=MODEL_NAME_IN_RUN,
            python_model=str(ENTRY_FILE),  # models from code: MLflow runs the file, nothing is pickled
            artifacts={BUNDLE_ARTIFACT: str(staged)},
            code_paths=code_paths,
            pip_requirements=serving_requirements(),
            signature=model_signature(),
            metadata={"bundle_model_version": bundle.model_version, "threshold": bundle.spec.threshold.value},
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")  # paths: no portable example
            if active is not None:
                info = mlflow.pyfunc.log_model(**log_kwargs)
            else:
                with mlflow.start_run(run_id=run_id):
                    info = mlflow.pyfunc.log_model(**log_kwargs)

    client = MlflowClient()
    _ensure_registered_model(client, model_name)
    version = client.create_model_version(
        model_name,
        source=info.model_uri,
        run_id=run_id,
        tags=_version_tags(bundle, run_id, tags or {}),
        model_id=info.model_id,
    )
    try:
        client.set_registered_model_alias(model_name, alias, version.version)
    except BaseException:
        client.delete_model_version(model_name, version.version)
        raise
    log.info("registered %s version %s (%s) from run %s", model_name, version.version, alias, run_id)
    return client.get_model_version(model_name, version.version)


def download_bundle(model_uri: str, dst: Path) -> Path:
    """Fetch the bundle of a registered version (``models:/name@challenger``, ``models:/name/3``) into ``dst``.

    Fetched as the line fetches it (:func:`pipelines.line_registry.line_registry_source`): verified against its
    manifest and its version's hash tags before it is moved into place; ``dst`` must not exist yet.
    """
    from pipelines.line_registry import line_registry_source

    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as cache:
        fetched = line_registry_source(Path(cache)).fetch(model_uri)
        fetched.path.rename(dst)
    return dst
