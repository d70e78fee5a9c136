"""``pipelines new-part``: the line's few-shot bundle (:func:`inspector.new_part.new_part`), registered in MLflow as
its own registered model, one per part type, with the embedder it borrows recorded on the version.

Why a registered model per part type: each part type is promoted, rolled back and served (``models:/<part>@champion``)
on its own, while the embedder stays one artefact; the version's tags say which embedder and how many goldens, and
the run records what so few photos can promise, so the gate and the line read it where they read everything else.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

from inspector.bundle import load_bundle
from inspector.new_part import NEW_PART_KEY, new_part
from inspector.registry_contract import CHALLENGER
from pipelines.tracking import download_bundle, ensure_experiment, register_bundle

#: the experiment few-shot part types are made in
EXPERIMENT = "new-parts"


def parent_bundle(source: str | Path, scratch: Path) -> Path:
    """The bundle whose embedder the new part borrows: a bundle folder as it is, or a registered version
    (``models:/<name>@champion``) fetched and verified as the line fetches it."""
    path = Path(source)
    if path.is_dir():
        return path
    return download_bundle(str(source), scratch / "parent")


def register_new_part(
    source: str | Path,
    goldens: Sequence[Path],
    out: Path,
    part: str,
    *,
    goods: Sequence[Path] = (),
    target_false_reject_rate: float = 0.01,
    promise: str = "expected",
    alias: str = CHALLENGER,
) -> ModelVersion:
    """Make the few-shot bundle at ``out`` from ``source``'s embedder and register it as a new version of the
    registered model ``part`` (created on first use) with ``alias`` on it, in a run of the ``new-parts`` experiment."""
    with tempfile.TemporaryDirectory(prefix="new-part-") as scratch:
        parent = parent_bundle(source, Path(scratch))
        new_part(
            parent,
            goldens,
            out,
            goods=goods,
            name=part,
            target_false_reject_rate=target_false_reject_rate,
            promise=promise,
        )
    bundle = load_bundle(out)
    made = bundle.spec.provenance[NEW_PART_KEY]
    ensure_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"new-part {part}"):
        mlflow.log_params(
            {
                "part": part,
                "embedder_source": str(source),
                "embedder": made["embedder"],
                "goldens": made["goldens"],
                "extra_goods": len(goods),
                "target_false_reject_rate": target_false_reject_rate,
                "promise": promise,
            }
        )
        details = bundle.spec.threshold.details
        mlflow.log_metrics({"threshold": bundle.spec.threshold.value, "frr_upper_95": details["frr_upper_95"]})
        mlflow.set_tag("few_shot_promise", made["promise"])
        tags = {
            "part": part,
            "embedder": made["embedder"],
            "goldens": made["goldens"],
            "few_shot_promise": made["promise"],
        }
        return register_bundle(out, part, tags=tags, alias=alias)
