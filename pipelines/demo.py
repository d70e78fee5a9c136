"""The demo: generate a synthetic part dataset, run the training flow, make the first version champion, summarise.

It runs on data it makes itself (``models.demo_data``), so a fresh clone shows the whole job — Prefect flow,
MLflow run and registered model, ONNX bundle scored by ``inspector`` — without any images of its own. It prints
only what was actually measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from inspector.registry_contract import CHALLENGER, CHAMPION
from models.demo_data import generate_demo_dataset
from pipelines.recipe import Recipe, tiny_recipe
from pipelines.settings import PipelineSettings


def demo_recipe(fast: bool = False) -> Recipe:
    """The demo's settings: the small recipe (pretrained Lite0 patch embedder, 128 px); ``fast`` trains 2 epochs."""
    recipe = tiny_recipe()
    return replace(recipe, train=replace(recipe.train, epochs=2 if fast else recipe.train.epochs, progress=True))


def promote_first_version(model_name: str, version: str) -> bool:
    """Give ``champion`` to ``version`` when the model has no champion yet (later versions go through the gate)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.get_model_version_by_alias(model_name, CHAMPION)
        return False
    except MlflowException:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        return True


def run_demo(workdir: Path, *, seed: int = 0, fast: bool = False) -> dict[str, object]:
    """Run the demo end to end under ``workdir``; returns the summary it prints."""
    from inspector.bundle import load_bundle
    from pipelines.flows import DataSource, train_flow

    t0 = time.perf_counter()
    workdir = workdir.resolve()
    data_root = workdir / "demo_data"
    info = generate_demo_dataset(data_root, seed=seed, n_train_good=100, n_test_good=30, n_test_per_defect=12)
    print(
        f"[1/3] demo data: {info.n_train_good} train good, {info.n_test_good} test good, "
        f"{sum(info.defect_counts.values())} defective ({', '.join(info.defect_counts)}) in {data_root}"
    )
    recipe = replace(demo_recipe(fast), seed=seed)
    settings = PipelineSettings(work_dir=workdir, experiment="demo-flanges", model_name="demo-flange-inspector")
    print(
        f"[2/3] training flow: {recipe.embedder.backbone} patch embedder, "
        f"{recipe.preprocess.height}x{recipe.preprocess.width} px, {recipe.train.epochs} epochs"
    )
    result = train_flow(DataSource(root=str(data_root)), recipe, settings)
    promoted = promote_first_version(settings.model_name, result.model_version)
    m = result.metrics
    line = load_bundle(result.bundle).spec.provenance["line_model"]
    db = workdir / "mlflow.db"
    summary = {
        "registered_model": f"models:/{settings.model_name}/{result.model_version}",
        "aliases": [CHALLENGER, CHAMPION] if promoted else [CHALLENGER],
        "bundle": str(result.bundle),
        "test_images": len(result.scores),
        "image_auroc": round(m["test_image_auroc"], 4),
        "frozen_baseline_auroc": round(m["baseline_test_image_auroc"], 4),
        "false_reject_rate": round(m["test_false_reject_rate"], 4),
        "escape_rate": round(m["test_escape_rate"], 4),
        "per_type_auroc": {k: round(v, 4) for k, v in result.per_type_auroc.items()},
        "line_model": f"{line['shipped']} ({line['reason']})",
        "mlflow_run": result.run_id,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print("[3/3] scored the held-out test split through the registered bundle (onnxruntime):")
    print(json.dumps(summary, indent=2))
    print(f"MLflow UI:        .venv/bin/mlflow ui --backend-store-uri sqlite:///{db}")
    print(f"Score new parts:  .venv/bin/inspector score --bundle {result.bundle} PATH...")
    print(
        f"         or:      MLFLOW_TRACKING_URI=sqlite:///{db} .venv/bin/pipelines score PATH... "
        f"--model models:/{settings.model_name}@{CHAMPION}"
    )
    return summary
