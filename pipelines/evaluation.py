"""Evaluating a bundle on the test split through the line's own code path (``Inspector``): image metrics, the
operating points, per-type AUROC, pixel AUROC of the heatmaps, and what calibration promised."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inspector.bundle import load_bundle
from inspector.calibration import shortfall
from inspector.engine import Inspector
from inspector.metrics import average_precision, operating_points, rates_at_threshold, roc_auc
from pipelines.data.records import ImageRecord


@dataclass
class Evaluation:
    """Scores of the test images through the bundle and the metrics computed from them."""

    paths: list[str]
    defect_types: list[str]
    labels: np.ndarray
    scores: np.ndarray
    threshold: float
    errors: list[str] = field(default_factory=list)
    views: dict[str, np.ndarray] = field(default_factory=dict)  # with a whole-part score: each view's scores alone

    def metrics(self) -> dict[str, float]:
        m = {
            "image_auroc": roc_auc(self.labels, self.scores),
            "average_precision": average_precision(self.labels, self.scores),
        }
        m.update(rates_at_threshold(self.labels, self.scores, self.threshold))
        if (self.labels == 0).any() and (self.labels == 1).any():  # the escape rates a quality engineer picks from
            m.update({p.metric_name: p.escape_rate for p in operating_points(self.labels, self.scores)})
        m.update(
            {f"image_auroc_{name}": roc_auc(self.labels, v) for name, v in self.views.items()}
        )  # what each view adds
        return m

    def per_type_auroc(self) -> dict[str, float]:
        """AUROC of each defect type against all good test images."""
        types = np.asarray(self.defect_types)
        good = self.labels == 0
        return {
            t: roc_auc(self.labels[good | (types == t)], self.scores[good | (types == t)])
            for t in sorted(set(types[~good]))
        }


def calibration_shortfall(bundle: Path) -> str | None:
    """The bundle's calibration shortfall in words (too few goods for its target false-reject rate), else None."""
    return shortfall(load_bundle(bundle).spec.threshold.details)


def line_views(bundle: Path) -> str | None:
    """Which views the bundle scores with, as calibration chose them (``fused``: their mean; ``max``: the larger;
    ``patch`` or ``part`` alone), or None for a bundle without that choice (no whole-part view to choose)."""
    views = load_bundle(bundle).spec.threshold.details.get("whole_part_score") or {}
    return str(views["views"]) if "views" in views else None


def threshold_metrics(bundle: Path) -> dict[str, float]:
    """The threshold and what calibration expects of it, as run metrics: the false-reject rate realised on the
    calibration goods and its one-sided 95 % upper bound (the rate the line should expect, with its uncertainty)."""
    spec = load_bundle(bundle).spec
    threshold, details = spec.threshold, spec.threshold.details
    out = {"threshold": threshold.value, "scoring_offset": spec.scoring.offset}
    for key, name in (
        ("false_reject_rate", "calibration_false_reject_rate"),
        ("frr_upper_95", "calibration_frr_upper_95"),
        ("target_false_reject_rate", "calibration_target_false_reject_rate"),
        ("n_good", "calibration_n_good"),
        ("recall", "calibration_validation_recall"),  # what the promise costs: validation defects caught
    ):
        if isinstance(details.get(key), (int, float)):
            out[name] = float(details[key])
    if isinstance(details.get("goods_to_resolve_target"), int):  # what calibration could and could not resolve
        out["calibration_goods_to_resolve_target"] = float(details["goods_to_resolve_target"])
        out["calibration_resolves_target"] = float(bool(details.get("resolves_target")))
    if "extrapolated" in details:  # too few goods for the promise: a threshold above them all, from a fitted tail
        out["calibration_extrapolated"] = float(bool(details["extrapolated"]))
    evidence = details.get("evidence") or {}
    if evidence:
        out["calibration_cross_fitted"] = float(evidence.get("calibration") == "cross_fitted")
    views = details.get("whole_part_score") or {}
    if "kept" in views:  # the whole-part view scores (fused, or alone) or was left out on the evidence
        out["whole_part_view_used"] = float(bool(views["kept"]))
    return out


def calibration_record(bundle: Path) -> dict[str, Any]:
    """The threshold and everything its calibration recorded (rule, promise, evidence, the offset and view choices
    with what they were measured on), as MLflow keeps it beside the run."""
    threshold = load_bundle(bundle).spec.threshold
    return {"value": threshold.value, "rule": threshold.rule, **threshold.details}


def pixel_level_auroc(bundle: Path, records: Sequence[ImageRecord], limit: int = 400) -> float | None:
    """Pixel AUROC of the bundle's heatmaps against the masks of ``records`` (goods count as all-normal), or None
    when no defective record has a mask or the bundle draws no maps: *where* on the part, not only whether. At
    most ``limit`` images (a second pass over them, with maps)."""
    from inspector.heatmap import score_with_maps
    from inspector.metrics import pixel_auroc
    from inspector.preprocess import open_mask

    chosen = [r for r in records if r.is_good or r.mask is not None][:limit]
    if all(r.is_good for r in chosen):
        return None
    inspector = Inspector.from_bundle(bundle)
    if inspector.bundle.mode != "patch":  # an image-level model draws no maps
        return None
    maps: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    for start in range(0, len(chosen), 32):
        batch = chosen[start : start + 32]
        for record, (_, amap, _) in zip(batch, score_with_maps(inspector, [r.path for r in batch])):
            if amap is not None:
                maps.append(amap)
                masks.append(None if record.is_good else np.asarray(open_mask(record.mask)) > 0)  # type: ignore[arg-type]
    value = pixel_auroc(maps, masks) if maps else float("nan")
    return value if math.isfinite(value) else None


def evaluate_bundle(bundle: Path, test: Sequence[ImageRecord]) -> Evaluation:
    """Score the test images through the line's code path (``Inspector``) and keep per-image results."""
    inspector = Inspector.from_bundle(bundle)
    results = inspector.score([r.path for r in test])
    kept = [(r, res) for r, res in zip(test, results) if res.error is None]
    return Evaluation(
        paths=[str(r.path) for r, _ in kept],
        defect_types=[r.defect_type for r, _ in kept],
        labels=np.array([r.label for r, _ in kept]),
        scores=np.array([res.score for _, res in kept], dtype=np.float64),
        threshold=inspector.threshold,
        errors=[res.error for res in results if res.error],
        views={k: np.array([res.views[k] for _, res in kept]) for k in (kept[0][1].views or {})} if kept else {},  # type: ignore[index]
    )
