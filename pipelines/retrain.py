"""Scheduled retraining: new images → train (optionally warm-started from the champion) → challenger → gate.

The flow is what the nightly deployment runs (``deploy/prefect.yaml``, ``pipelines serve-deployments``). It
chains the existing training flow and the promotion gate as subflows, so a run that fails anywhere before the
gate's last step leaves ``champion`` where it was: training registers nothing until its last step, and the gate
moves the alias only after every rule has passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from inspector.registry_contract import CHAMPION
from pipelines.flows import DataSource, train_flow
from pipelines.promotion import GateRules, alias_version, promote_flow
from pipelines.settings import PipelineSettings, apply_overrides


def data_source(
    data: str | None = None, good: str | None = None, defective: str | None = None, manifest: str | None = None
) -> DataSource:
    """Exactly one of: an MVTec-layout folder, good (+ defective) folders, or a manifest file; each must exist."""
    given = [x for x in (data, good, manifest) if x]
    if len(given) != 1:
        raise ValueError("retraining needs exactly one of data (MVTec folder), good (+ defective) folders, or manifest")
    for what, path in (("data", data), ("good", good), ("defective", defective), ("manifest", manifest)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{path}: {what} not found")
    if defective and not good:
        raise ValueError("defective goes with good")
    return DataSource(root=data, good=good, defective=defective, manifest=manifest)


def build_recipe(base: Literal["default", "tiny"] = "default", overrides: dict[str, Any] | None = None) -> Any:
    """The full recipe or the small CPU one, with dotted-key overrides (``{"train.epochs": 3}``)."""
    from pipelines.recipe import Recipe, tiny_recipe

    recipe = tiny_recipe() if base == "tiny" else Recipe()
    return apply_overrides(recipe, overrides or {})


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def champion_checkpoint_task(model_name: str, dst: Path) -> str | None:
    """The champion's ``checkpoint/best.pt`` (logged by its training run), or None when there is no champion."""
    import mlflow

    champion = alias_version(model_name, CHAMPION)
    if champion is None or not champion.run_id:
        get_run_logger().info("no champion: training from the pretrained backbone")
        return None
    dst.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(
        run_id=champion.run_id, artifact_path="checkpoint/best.pt", dst_path=str(dst)
    )
    get_run_logger().info("warm start from champion v%s (run %s)", champion.version, champion.run_id)
    return path


@flow(name="retrain-inspector", log_prints=True)
def retrain_flow(
    gate_manifest: str,
    data: str | None = None,
    good: str | None = None,
    defective: str | None = None,
    manifest: str | None = None,
    model_name: str = "parts-inspector",
    experiment: str = "parts",
    work_dir: str = "runs",
    tracking_uri: str | None = None,
    recipe: Literal["default", "tiny"] = "default",
    recipe_overrides: dict[str, Any] | None = None,
    warm_start: bool = False,
    rules: dict[str, Any] | None = None,
    baseline: bool = False,
    signing_key: str | None = None,
) -> dict[str, Any]:
    """Retrain on the given images, register the result as ``challenger`` and run the promotion gate (which signs
    what it promotes when given ``signing_key``, the path of an Ed25519 private key on the training host).

    Returns ``{"model_version", "run_id", "metrics", "decision"}``. Training failures raise before the gate, so
    ``champion`` never moves on a failed run.
    """
    import mlflow

    from pipelines.tracking import tracking_uri as default_tracking_uri

    source = data_source(data, good, defective, manifest)
    rules_obj = GateRules(**(rules or {}))  # bad rules fail now, not after an hour of training
    if not Path(gate_manifest).is_file():
        raise FileNotFoundError(f"{gate_manifest}: gate manifest not found")
    settings = PipelineSettings(
        work_dir=Path(work_dir),
        experiment=experiment,
        model_name=model_name,
        tracking_uri=tracking_uri,
        baseline=baseline,
    )
    uri = settings.tracking_uri or default_tracking_uri(Path(work_dir).resolve())
    mlflow.set_tracking_uri(uri)
    overrides = dict(recipe_overrides or {})
    if warm_start:
        checkpoint = champion_checkpoint_task(model_name, Path(work_dir).resolve() / "warm_start")
        if checkpoint:
            overrides["train.init_checkpoint"] = checkpoint
    result = train_flow(source, build_recipe(recipe, overrides), settings.model_copy(update={"tracking_uri": uri}))
    print(f"registered {model_name} v{result.model_version} as challenger; gating it")
    decision = promote_flow(model_name, gate_manifest, rules_obj, tracking_uri=uri, signing_key=signing_key)
    return {
        "model_version": result.model_version,
        "run_id": result.run_id,
        "metrics": result.metrics,
        "decision": decision,
    }
