"""Prefect flows: the training run as thin orchestration over the plain functions of ``pipelines`` and ``models``.

ingest (validated manifest, cached by the files' identity) → split → train → bundle (export, parity, golden
references, calibrated threshold) → evaluate through ``inspector`` → MLflow (params, metrics, plots, manifest,
checkpoint) → register the bundle as a model version with alias ``challenger``. Registration is the last step, so
a run that fails anywhere registers nothing and moves no alias.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from inspector.quantize import QuantizeError
from pipelines.bundle_building import build_bundle
from pipelines.data.layouts import scan_dataset
from pipelines.data.manifest import Manifest, build_manifest, read_manifest, reading_code, write_manifest
from pipelines.data.records import capture_groups
from pipelines.data.split import DataSplit, SplitFractions, assign_splits
from pipelines.embedder_training import fit_embedder
from pipelines.evaluation import (
    Evaluation,
    calibration_record,
    calibration_shortfall,
    evaluate_bundle,
    line_views,
    pixel_level_auroc,
    threshold_metrics,
)
from pipelines.line_model import choose_line_model, int8_candidate, int8_refusal, line_metrics, ship
from pipelines.recipe import Recipe, resolve_bit_depth, resolve_input_size
from pipelines.settings import PipelineSettings


@dataclass(frozen=True)
class DataSource:
    """Where the images are: an MVTec-layout ``root``, ``good`` (and optional ``defective``) folders, or a
    ``manifest`` written before (``pipelines.data.manifest.write_manifest``: its images are used as listed)."""

    root: str | None = None
    good: str | None = None
    defective: str | None = None
    manifest: str | None = None


@dataclass
class TrainResult:
    """What a training run produced."""

    run_id: str
    model_version: str
    bundle: Path
    metrics: dict[str, float]
    per_type_auroc: dict[str, float]
    dataset_hash: str
    scores: dict[str, float]


def _ingest_code() -> bytes:
    """The source of the code that reads a dataset: a release that reads layouts, masks or groups differently must
    not be handed a manifest the old code built."""
    return reading_code()


def _files_fingerprint(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key of ingest: every file's path, size and mtime (content hashes are only computed on a miss), the
    grouping asked for and the ingest code itself."""
    source: DataSource = parameters["source"]
    h = hashlib.sha256(
        json.dumps(
            [
                source.root,
                source.good,
                source.defective,
                parameters.get("group_pattern"),
                parameters.get("group_gap"),
                parameters.get("group_by_folder", False),
            ]
        ).encode()
    )
    h.update(hashlib.sha256(_ingest_code()).digest())
    if source.manifest:
        st = Path(source.manifest).stat()
        h.update(f"manifest:{Path(source.manifest).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for folder in [p for p in (source.root, source.good, source.defective) if p]:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                st = path.stat()
                h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"ingest-{h.hexdigest()}"


@task(
    retries=2,
    retry_delay_seconds=2,
    cache_key_fn=_files_fingerprint,
    persist_result=True,
    cache_expiration=timedelta(days=7),
)
def ingest_task(
    source: DataSource, group_pattern: str | None = None, group_gap: int = 0, group_by_folder: bool = False
) -> Manifest:
    """Open and validate every image once; bad files are reported by path and left out."""
    if source.manifest:
        manifest = read_manifest(source.manifest)
        get_run_logger().info("ingest: manifest %s: %s", source.manifest, manifest.summary())
        return manifest
    records = scan_dataset(root=source.root, good=source.good, defective=source.defective)
    groups = capture_groups(records, group_pattern, group_gap, by_folder=group_by_folder)
    manifest = build_manifest(
        records, group_of=groups, source={"root": source.root, "good": source.good, "defective": source.defective}
    )
    logger = get_run_logger()
    logger.info("ingest: %s", manifest.summary())
    for rejected in manifest.rejected:
        logger.warning("left out %s: %s", rejected.path, rejected.reason)
    return manifest


@task(cache_policy=NO_CACHE)
def split_task(manifest: Manifest, recipe: Recipe) -> DataSplit:
    split = assign_splits(manifest, SplitFractions.from_recipe(recipe), None)
    get_run_logger().info("split: %s", split.summary())
    return split


@task(cache_policy=NO_CACHE)
def train_task(
    split: DataSplit, recipe: Recipe, checkpoint_dir: Path, also: Sequence[DataSplit] = ()
) -> tuple[Any, Any]:
    """The fit, in this process or (``train.devices`` > 1) on that many processes under ``torchrun`` (DDP);
    ``also``: other part types' splits trained on alongside (an embedder for ``new-part``)."""
    if recipe.train.devices > 1:
        if also:
            raise ValueError("training on several part types runs in one process: set train.devices=1")
        from pipelines.ddp import fit_distributed

        get_run_logger().info("training on %d processes (torchrun, DDP)", recipe.train.devices)
        return fit_distributed(split, recipe, checkpoint_dir)
    return fit_embedder(split, recipe, checkpoint_dir=checkpoint_dir, also=also)


@task(cache_policy=NO_CACHE)
def bundle_task(
    embedder: Any, split: DataSplit, recipe: Recipe, out: Path, provenance: dict[str, Any], model_name: str
) -> Path:
    return build_bundle(
        embedder, split, recipe, out, provenance=provenance, model_name=model_name, model_version=provenance["run_id"]
    )


@task(cache_policy=NO_CACHE)
def int8_task(fp32_bundle: Path, split: DataSplit, recipe: Recipe, out: Path) -> Path:
    return int8_candidate(fp32_bundle, split, recipe, out)


@task(cache_policy=NO_CACHE)
def evaluate_task(bundle: Path, split: DataSplit) -> Evaluation:
    return evaluate_bundle(bundle, split.test)


@task(cache_policy=NO_CACHE)
def baseline_task(split: DataSplit, recipe: Recipe, out: Path) -> dict[str, float]:
    """The run's trunk, frozen and pooled (its pretrained global features), on the same split and test images, so
    every run shows what training added; the same trunk, because the recipe's preprocessing is that trunk's."""
    from models.siamese import FrozenGlobalEmbedder

    trunk = recipe.embedder
    baseline = FrozenGlobalEmbedder(trunk.backbone, trunk.weights, allow_download=trunk.allow_download)
    bundle = build_bundle(baseline, split, recipe, out, model_name="frozen-baseline")
    evaluation = evaluate_bundle(bundle, split.test)
    return {f"baseline_{k}": v for k, v in _float_metrics(evaluation).items()}


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def register_task(bundle: Path, model_name: str, run_id: str, tags: dict[str, Any]) -> str:
    from pipelines.tracking import register_bundle

    return str(register_bundle(bundle, model_name, run_id=run_id, tags=tags).version)


def line_model(
    fp32: Path, split: DataSplit, recipe: Recipe, candidates: Path, out: Path
) -> tuple[Path, Evaluation, dict[str, Any]]:
    """The run's bundle at ``out``: FP32, or its INT8 copy where that holds FP32's verdicts (pipelines.line_model),
    with the evaluation of the one shipped and the choice."""
    evaluations = {"fp32": evaluate_task(fp32, split)}
    paths, refusal = {"fp32": fp32}, None
    if recipe.line_precision != "fp32" and not (refusal := int8_refusal(split, recipe)):
        try:
            paths["int8"] = int8_task(fp32, split, recipe, candidates / "int8")
            evaluations["int8"] = evaluate_task(paths["int8"], split)
        except QuantizeError as exc:
            refusal = f"INT8 quantisation failed: {exc}"
    if refusal and recipe.line_precision == "int8":
        raise ValueError(f"line_precision=int8 asked for, but {refusal}")
    groups = split.group_ids([Path(p) for p in evaluations["fp32"].paths])
    record = choose_line_model(evaluations["fp32"], evaluations.get("int8"), recipe, refusal, groups)
    if refusal:
        get_run_logger().warning("line model: FP32 (%s)", refusal)
    else:
        get_run_logger().info("line model: %s (%s)", record["shipped"], record["reason"])
    return ship(paths[record["shipped"]], out, record), evaluations[record["shipped"]], record


def _float_metrics(evaluation: Evaluation) -> dict[str, float]:
    m = {f"test_{k}": float(v) for k, v in evaluation.metrics().items()}
    m.update({f"test_auroc_{t}": float(v) for t, v in evaluation.per_type_auroc().items()})
    return m


@flow(name="train-inspector", log_prints=True)
def train_flow(
    source: DataSource,
    recipe: Recipe | None = None,
    settings: PipelineSettings | None = None,
    also: list[DataSource] | None = None,
) -> TrainResult:
    """Train, export, calibrate, evaluate and register one model version (alias ``challenger``).

    ``also``: other part types whose training images the embedder also learns from (the bundle, its threshold and
    its evaluation stay this ``source``'s part type); an embedder meant to serve part types it never saw through
    ``new-part``. Their dataset hashes are tagged on the run (``also_trained_on``)."""
    import mlflow

    from pipelines.plots import save_evaluation_plots, save_heatmap_examples
    from pipelines.tracking import ensure_experiment, log_training_run, tracking_uri

    recipe = recipe or Recipe()
    settings = settings or PipelineSettings()
    work = Path(settings.work_dir).resolve()
    mlflow.set_tracking_uri(settings.tracking_uri or tracking_uri(work))
    ensure_experiment(settings.experiment, work / "mlartifacts")
    manifest = ingest_task(source, settings.group_pattern, settings.group_gap, settings.group_by_folder)
    recipe = resolve_input_size(recipe, [(e.width, e.height) for e in manifest.entries if e.is_good])
    recipe = resolve_bit_depth(recipe, [e.bits for e in manifest.entries])
    with mlflow.start_run() as run:
        run_dir = work / "training" / run.info.run_id
        manifest_path = write_manifest(manifest, run_dir / "manifest.json")
        split = split_task(manifest, recipe)
        others = [
            ingest_task(o, settings.group_pattern, settings.group_gap, settings.group_by_folder) for o in also or []
        ]
        embedder, history = train_task(split, recipe, run_dir / "checkpoints", [split_task(m, recipe) for m in others])
        provenance = {"run_id": run.info.run_id, "dataset_hash": manifest.dataset_hash}
        candidates = run_dir / "candidates"
        fp32 = bundle_task(embedder, split, recipe, candidates / "fp32", provenance, settings.model_name)
        bundle, evaluation, line = line_model(fp32, split, recipe, candidates, run_dir / "bundle")
        metrics = {**_float_metrics(evaluation), **threshold_metrics(bundle), **line_metrics(line)}
        if (
            pixel := pixel_level_auroc(bundle, split.test)
        ) is not None:  # the test defects have masks: where, not only whether
            metrics["test_pixel_auroc"] = pixel
        if settings.baseline:
            metrics.update(baseline_task(split, recipe, run_dir / "baseline_bundle"))
        scores_path = run_dir / "test_scores.json"
        scores_path.write_text(json.dumps(dict(zip(evaluation.paths, evaluation.scores.tolist())), indent=1))
        log_training_run(
            recipe,
            history=history,
            metrics=metrics,
            manifest=manifest_path,
            checkpoint=best
            if (best := run_dir / "checkpoints" / "best.pt").is_file()
            else None,  # none when training was skipped
            plots=save_evaluation_plots(evaluation, run_dir / "plots")
            + save_heatmap_examples(bundle, evaluation, run_dir / "plots"),
            dataset_hash=manifest.dataset_hash,
            tags={
                "settings": json.dumps(settings.model_dump(mode="json")),
                **({"calibration_shortfall": note} if (note := calibration_shortfall(bundle)) else {}),
                **({"also_trained_on": json.dumps([m.dataset_hash for m in others])} if others else {}),
                **({"line_views": views} if (views := line_views(bundle)) else {}),
            },
        )
        mlflow.log_artifact(str(scores_path), "evaluation")
        mlflow.log_dict(calibration_record(bundle), "calibration/threshold.json")
        mlflow.log_dict(line, "line_model.json")
        mlflow.set_tag("line_precision", line["shipped"])
        key = {
            k: round(v, 4)
            for k, v in metrics.items()
            if k in ("test_image_auroc", "test_false_reject_rate", "test_escape_rate")
        }
        version = register_task(
            bundle, settings.model_name, run.info.run_id, {"dataset_hash": manifest.dataset_hash, **key}
        )
    return TrainResult(
        run.info.run_id,
        version,
        bundle,
        metrics,
        evaluation.per_type_auroc(),
        manifest.dataset_hash,
        dict(zip(evaluation.paths, evaluation.scores.tolist())),
    )
