"""The demo: generate a synthetic part dataset, train, export a bundle, score the test split, print what happened.

It runs on data it makes itself (``models.demo_data``), so a fresh clone shows the whole job without any images.
It prints only what was actually measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from models.demo_data import generate_demo_dataset
from pipelines.datasets import scan_mvtec
from pipelines.recipe import Recipe, build_bundle, evaluate_bundle, fit_embedder, split_records, tiny_recipe


def demo_recipe(fast: bool = False) -> Recipe:
    """The demo's settings: the small recipe (pretrained Lite0 patch embedder, 128 px); ``fast`` trains 2 epochs."""
    recipe = tiny_recipe()
    return replace(recipe, train=replace(recipe.train, epochs=2 if fast else recipe.train.epochs, progress=True))


def run_demo(workdir: Path, *, seed: int = 0, fast: bool = False) -> dict[str, object]:
    """Run the demo end to end under ``workdir``; returns the summary it prints."""
    t0 = time.perf_counter()
    data_root = workdir / "demo_data"
    info = generate_demo_dataset(data_root, seed=seed, n_train_good=100, n_test_good=30, n_test_per_defect=12)
    print(f"[1/4] demo data: {info.n_train_good} train good, {info.n_test_good} test good, "
          f"{sum(info.defect_counts.values())} defective ({', '.join(info.defect_counts)}) in {data_root}")
    recipe = replace(demo_recipe(fast), seed=seed)
    split = split_records(scan_mvtec(data_root), recipe)
    print(f"[2/4] training {recipe.embedder.backbone} on {split.summary()}")
    t_train = time.perf_counter()
    embedder, history = fit_embedder(split, recipe, checkpoint_dir=workdir / "checkpoints")
    train_s = time.perf_counter() - t_train
    bundle = build_bundle(embedder, split, recipe, workdir / "bundle", provenance={"source": "demo", "seed": seed})
    print(f"[3/4] bundle written: {bundle} (ONNX parity checked)")
    evaluation = evaluate_bundle(bundle, split.test)
    metrics = evaluation.metrics()
    summary = {
        "bundle": str(bundle),
        "backbone": recipe.embedder.backbone,
        "epochs_run": len(history.epochs),
        "best_val_auroc": history.best_val_auroc,
        "train_seconds": round(train_s, 1),
        "test_images": len(evaluation.scores),
        "image_auroc": round(metrics["image_auroc"], 4),
        "false_reject_rate": round(metrics["false_reject_rate"], 4),
        "escape_rate": round(metrics["escape_rate"], 4),
        "threshold": round(evaluation.threshold, 4),
        "per_type_auroc": {k: round(v, 4) for k, v in evaluation.per_type_auroc().items()},
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print("[4/4] scored the test split through the bundle (onnxruntime):")
    print(json.dumps(summary, indent=2))
    print(f"Score your own images with:  inspector score --bundle {bundle} PATH...")
    return summary
