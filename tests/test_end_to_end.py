"""One small real run of the whole job: generate demo parts → train → export ONNX → bundle → score through inspector.

Asserts a *measured* image AUROC on held-out synthetic parts (defect instances never used in training), and that
the line's scores reproduce exactly from the bundle in a fresh process-free reload.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inspector.engine import Inspector
from inspector.metrics import roc_auc
from models.demo_data import generate_demo_dataset
from pipelines.bundle_building import build_bundle
from pipelines.data.manifest import ingest
from pipelines.data.split import SplitFractions, assign_splits
from pipelines.embedder_training import fit_embedder
from pipelines.evaluation import evaluate_bundle
from pipelines.recipe import tiny_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    work = tmp_path_factory.mktemp("e2e")
    generate_demo_dataset(work / "data", seed=0, n_train_good=100, n_test_good=30, n_test_per_defect=12)
    recipe = replace(tiny_recipe(), seed=0)
    split = assign_splits(ingest(root=work / "data"), SplitFractions.from_recipe(recipe))
    embedder, history = fit_embedder(split, recipe, checkpoint_dir=work / "ckpt")
    bundle = build_bundle(embedder, split, recipe, work / "bundle")
    return {"split": split, "history": history, "bundle": bundle, "evaluation": evaluate_bundle(bundle, split.test)}


def test_trained_model_detects_unseen_defects(trained: dict[str, object]) -> None:
    evaluation = trained["evaluation"]
    split = trained["split"]
    test_defects = {str(r.path) for r in split.test if not r.is_good}
    assert not test_defects & {str(r.path) for r in split.train_defective}, "test defects must never be trained on"
    assert not test_defects & {str(p) for p in split.validation_defective}
    assert len(evaluation.scores) == len(split.test) and not evaluation.errors
    auroc = evaluation.metrics()["image_auroc"]
    print(f"e2e image AUROC {auroc:.3f} per type {evaluation.per_type_auroc()}")
    assert auroc >= 0.9


def test_training_ran_and_checkpointed(trained: dict[str, object], tmp_path: Path) -> None:
    history = trained["history"]
    assert len(history.epochs) >= 2 and not history.collapsed
    assert all(np.isfinite(e.train_loss) for e in history.epochs)
    ckpt_dir = Path(trained["bundle"]).parent / "ckpt"
    assert (ckpt_dir / "last.pt").is_file() and (ckpt_dir / "best.pt").is_file()


def test_bundle_scores_reproduce(trained: dict[str, object]) -> None:
    """Reloading the bundle and scoring the same files gives the same scores (the line == the evaluation)."""
    evaluation = trained["evaluation"]
    results = Inspector.from_bundle(trained["bundle"]).score(evaluation.paths)
    rescored = np.array([r.score for r in results])
    assert np.max(np.abs(rescored - evaluation.scores)) <= 1e-5
    assert roc_auc(evaluation.labels, rescored) == pytest.approx(evaluation.metrics()["image_auroc"])
