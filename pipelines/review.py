"""The loop closes: what reviewers decided on the line's flagged parts becomes the next model's data.

Confirmed false rejects (flagged, a reviewer said good) become golden references of the champion's bundle through
:func:`inspector.references.add_references` (a new bundle, recalibrated on the line's recent goods), registered as
``challenger``; confirmed defects (flagged or escaped) become a labelled manifest (with the good parts reviewed
too) that scheduled retraining takes as ``manifest``. The promotion gate then decides, as for any challenger.
Each export records a watermark in the review database (no review is taken twice) and writes ``reviews.json``:
who decided what and when, beside the challenger's MLflow run.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from inspector.registry_contract import CHAMPION
from inspector.review.store import ReviewedPart, ReviewStore
from pipelines.data.manifest import build_manifest, read_manifest, write_manifest
from pipelines.data.records import ImageRecord
from pipelines.promotion import GateRules, promote_flow

REVIEW_SOURCE = "review"


@dataclass
class ReviewExport:
    """What one export took from the review database, and where it wrote it."""

    out_dir: Path
    last_review_id: int
    false_rejects: list[ReviewedPart] = field(default_factory=list)
    defects: list[ReviewedPart] = field(default_factory=list)
    goods: list[ReviewedPart] = field(default_factory=list)  # every part a reviewer called good
    purged: list[str] = field(default_factory=list)  # reviewed parts whose image was gone before the export
    manifest: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "last_review_id": self.last_review_id,
            "false_rejects": len(self.false_rejects),
            "defects": len(self.defects),
            "escapes": sum(p.verdict == "good" for p in self.defects),
            "purged": self.purged,
            "manifest": str(self.manifest) if self.manifest else None,
        }


def sort_reviewed(parts: list[ReviewedPart]) -> ReviewExport:
    """Split reviewed parts: goods (false rejects are the flagged ones), defects, and those whose image is gone."""
    export = ReviewExport(Path(), max((p.review_id for p in parts), default=0))
    for p in parts:
        if p.image is None or not p.image.is_file():
            export.purged.append(f"part {p.part_id} ({p.decision}): image {p.image or 'purged'} is gone")
        elif p.decision == "defect":
            export.defects.append(p)
        else:
            export.goods.append(p)
            if p.verdict == "anomalous":
                export.false_rejects.append(p)
    return export


def audit_rows(parts: list[ReviewedPart]) -> list[dict[str, Any]]:
    """Who decided what about which part, and when: the export's ``reviews.json``."""
    return [
        {
            "part_id": p.part_id,
            "review_id": p.review_id,
            "decision": p.decision,
            "defect_type": p.defect_type,
            "reviewer": p.reviewer,
            "decided_at": p.decided_at.isoformat() + "Z",
            "line_verdict": p.verdict,
            "model_version": p.model_version,
            "part_type": p.part_type,
            "image": str(p.image) if p.image else None,
            "image_sha256": p.image_sha256,
        }
        for p in parts
    ]


def export_reviews(store: ReviewStore, out_dir: Path, base_manifest: Path | None = None) -> ReviewExport:
    """The reviews since the last export, written to ``out_dir``: ``reviews.json`` (the audit) and, where there are
    any, ``manifest.json`` (reviewed goods and defects with their types, over ``base_manifest``'s images)."""
    watermark = store.last_export_watermark()
    parts = store.reviewed_after(watermark)
    export = sort_reviewed(parts)
    export.out_dir, export.last_review_id = out_dir, max(export.last_review_id, watermark)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reviews.json").write_text(json.dumps(audit_rows(parts), indent=1), encoding="utf-8")
    labelled = [(p, 0, "good") for p in export.goods] + [(p, 1, p.defect_type or "defect") for p in export.defects]
    if labelled:
        records = [ImageRecord(p.image, label, kind, REVIEW_SOURCE, None) for p, label, kind in labelled if p.image]
        if base_manifest is not None:
            records = read_manifest(base_manifest).records() + records
        manifest = build_manifest(records, source={"layout": REVIEW_SOURCE, "base_manifest": str(base_manifest)})
        export.manifest = write_manifest(manifest, out_dir / "manifest.json")
    return export


@task(cache_policy=NO_CACHE)
def export_task(store: ReviewStore, out_dir: Path, base_manifest: str | None) -> ReviewExport:
    return export_reviews(store, out_dir, Path(base_manifest) if base_manifest else None)


@task(cache_policy=NO_CACHE)
def re_reference_task(
    model_name: str, export: ReviewExport, recent_goods: list[str], target_frr: float, work_dir: str
) -> Path:
    """The champion's bundle with the confirmed false rejects added to its bank, recalibrated on the line's recent
    goods (and the confirmed defects): a new bundle; the champion's is untouched."""
    from inspector.references import add_references
    from pipelines.tracking import download_bundle

    work = Path(work_dir)
    champion = download_bundle(f"models:/{model_name}@{CHAMPION}", work / "champion")
    added = {str(p.image) for p in export.false_rejects}
    goods = [g for g in recent_goods if g not in added]
    return add_references(
        champion,
        [p.image for p in export.false_rejects if p.image],
        work / "bundle",
        recalibrate_good=goods,
        recalibrate_defective=[p.image for p in export.defects if p.image] if goods else [],
        target_false_reject_rate=target_frr,
        skip_bad=True,  # an image already in the bank (added by an earlier export) is skipped, and listed
        ids=[f"review-{p.part_id}" for p in export.false_rejects],
    )


@task(cache_policy=NO_CACHE)
def register_task(bundle: Path, model_name: str, experiment: str, export: ReviewExport) -> str:
    """Register the re-referenced bundle as ``challenger`` in a run that keeps the export (audit and manifest)."""
    import mlflow

    from pipelines.tracking import ensure_experiment, register_bundle

    ensure_experiment(experiment)
    with mlflow.start_run(run_name="review-export") as run:
        mlflow.log_params({f"review.{k}": v for k, v in export.summary().items() if k not in ("purged", "manifest")})
        for name in ("reviews.json", "manifest.json"):
            if (export.out_dir / name).is_file():
                mlflow.log_artifact(str(export.out_dir / name), artifact_path="review")
        version = register_bundle(
            bundle,
            model_name,
            run_id=run.info.run_id,
            tags={"source": "review-export", "review.false_rejects": len(export.false_rejects)},
        )
    return str(version.version)


@flow(name="review-export", log_prints=True)
def review_loop_flow(
    db_url: str,
    record_dir: str,
    model_name: str,
    gate_manifest: str,
    work_dir: str = "runs/review",
    experiment: str = "parts",
    tracking_uri: str | None = None,
    rules: dict[str, Any] | None = None,
    base_manifest: str | None = None,
    recalibrate_good: list[str] | None = None,
    target_frr: float = 0.01,
) -> dict[str, Any]:
    """Export the reviews since the last export; with confirmed false rejects, re-reference the champion, register
    the result as ``challenger`` and run the promotion gate. Returns what was exported, the challenger version,
    the gate's decision and the seconds from export to decision."""
    import mlflow

    from pipelines.tracking import tracking_uri as default_tracking_uri

    start = time.perf_counter()
    rules_obj = GateRules(**(rules or {}))  # bad rules fail before anything is exported
    root = Path(work_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%S-"), dir=root))  # one folder per run
    uri = tracking_uri or default_tracking_uri(Path(work_dir).resolve())
    mlflow.set_tracking_uri(uri)
    store = ReviewStore(db_url, Path(record_dir))
    try:
        export = export_task(store, work / "export", base_manifest)
        outcome: dict[str, Any] = {"export": export.summary(), "challenger": None, "decision": None}
        for line in export.purged:
            get_run_logger().warning("left out: %s", line)
        if export.false_rejects:
            recent = [str(p) for p in store.passed_unchallenged()] + list(recalibrate_good or [])
            bundle = re_reference_task(model_name, export, recent, target_frr, str(work))
            outcome["challenger"] = register_task(bundle, model_name, experiment, export)
            print(f"registered {model_name} v{outcome['challenger']} as challenger; gating it")
            outcome["decision"] = promote_flow(model_name, gate_manifest, rules_obj, tracking_uri=uri)
        else:
            print("no confirmed false rejects since the last export: no new references, no challenger")
        outcome["seconds"] = round(time.perf_counter() - start, 1)
        moved = bool((outcome["decision"] or {}).get("moved"))
        record = {"challenger": outcome["challenger"], "moved": moved, "seconds": outcome["seconds"]}
        store.record_export(export.last_review_id, len(export.false_rejects), len(export.defects), record)
    finally:
        store.close()
    return outcome
