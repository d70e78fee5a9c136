"""The model the line runs: FP32, or a static INT8 copy where it holds the FP32 model's verdicts.

Why INT8 is bundled anew, not copied: INT8 moves every embedding a little the same way, so a bank, whole-part
statistics and threshold measured with the FP32 model no longer fit its scores (kept as they were, the goods'
whole-part score rose by about one IQR and verdicts flipped; docs/decisions.md). The INT8 candidate is quantised on
golden goods through the bundle's own preprocessing, then goes through :func:`bundle_from_onnx` exactly as the FP32
model did: its own bank, offset, views and threshold on its own out-of-fold scores. Both are scored on the test
parts through the line's code; the INT8 one ships when its image AUROC loss and its share of changed verdicts are
within the recipe's tolerances (``int8_max_auroc_loss``, ``int8_max_flip_rate``), else the FP32 one, the reason
recorded in the bundle (``provenance.line_model``) and in MLflow, with the loss's interval over the test parts'
capture groups.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from inspector.bundle import MODEL_FILE, load_bundle, write_bundle
from inspector.engine import OnnxEmbedder
from inspector.metrics import Interval, grouped_bootstrap, roc_auc
from inspector.quantize import (
    MIN_CALIBRATION_IMAGES,
    QUANTIZED_TAG,
    images_per_second,
    load_calibration_batch,
    quantize_model,
)
from pipelines.bundle_building import bundle_from_onnx, golden_goods
from pipelines.data.split import DataSplit
from pipelines.evaluation import Evaluation
from pipelines.recipe import Recipe

#: golden goods the INT8 activation ranges are calibrated on (a seeded draw)
INT8_CALIBRATION_GOODS = 64
LINE_MODEL = "line_model"


def int8_candidate(fp32_bundle: Path, split: DataSplit, recipe: Recipe, out: Path) -> Path:
    """The FP32 bundle's model quantised to static INT8 and bundled on its own scores (see the module)."""
    parent = load_bundle(fp32_bundle)
    fp32 = OnnxEmbedder(parent.model_path, parent.spec.preprocessing)
    goods = golden_goods(split, recipe)
    rng = np.random.default_rng([recipe.seed, 8])
    picks = sorted(rng.choice(len(goods), min(INT8_CALIBRATION_GOODS, len(goods)), replace=False).tolist())
    batch, used, problems, sizes = load_calibration_batch(fp32, [goods[i] for i in picks], INT8_CALIBRATION_GOODS)
    with tempfile.TemporaryDirectory(prefix="line-int8-") as tmp:
        q_path = Path(tmp) / MODEL_FILE
        settings = quantize_model(fp32, batch, sizes, q_path)
        int8 = OnnxEmbedder(q_path, parent.spec.preprocessing)
        report = {
            **settings,
            "calibration": {"images": len(used), "skipped": problems},
            "model_bytes": {"fp32": parent.model_path.stat().st_size, "int8": q_path.stat().st_size},
            "forward_images_per_second": {
                "fp32": images_per_second(fp32, batch),
                "int8": images_per_second(int8, batch),
            },
            "bank": "embedded by the INT8 model; offset, views and threshold calibrated on its own scores",
        }
        model = {
            **parent.spec.model,
            "quantization": QUANTIZED_TAG,
            "version": f"{parent.spec.model.get('version', 'unversioned')}+int8",
        }
        provenance = {k: v for k, v in parent.spec.provenance.items() if k != "created_at"}
        provenance.update(quantized=QUANTIZED_TAG, quantization=report)
        return bundle_from_onnx(q_path, split, recipe, out, model, provenance)


def int8_refusal(split: DataSplit, recipe: Recipe) -> str | None:
    """Why no INT8 candidate can be built for this split, or None."""
    if not split.calibration_good:
        return "no calibration goods: an INT8 copy could not be calibrated or checked"
    if len(golden_goods(split, recipe)) < MIN_CALIBRATION_IMAGES:
        return f"fewer than {MIN_CALIBRATION_IMAGES} golden goods to calibrate INT8 activation ranges on"
    return None


def _at_threshold(evaluation: Evaluation) -> dict[str, float]:
    m = evaluation.metrics()
    return {k: float(m[k]) for k in ("image_auroc", "false_reject_rate", "escape_rate") if k in m}


def both_scored(fp32_paths: Sequence[str], int8_paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the FP32 and of the INT8 scores that hold the same parts, in the same order (a part one model
    could not read is left out of both)."""
    theirs = {p: i for i, p in enumerate(int8_paths)}
    mine = [i for i, p in enumerate(fp32_paths) if p in theirs]
    return np.asarray(mine, dtype=np.int64), np.asarray([theirs[fp32_paths[i]] for i in mine], dtype=np.int64)


def verdict_flips(fp32: Evaluation, int8: Evaluation) -> tuple[int, int]:
    """How many of the parts both scored get another verdict from the INT8 model at its own threshold, of how many."""
    mine, theirs = both_scored(fp32.paths, int8.paths)
    changed = (fp32.scores[mine] > fp32.threshold) != (int8.scores[theirs] > int8.threshold)
    return int(changed.sum()), len(mine)


def auroc_loss_interval(
    fp32: Evaluation, int8: Evaluation, groups: Sequence[str], *, resamples: int = 1000, seed: int = 0
) -> Interval:
    """FP32's image AUROC minus INT8's on the parts both scored, with a 95 % interval over resamples of whole capture
    groups (``groups``: each of ``fp32``'s parts' group), paired: both models score the same parts in every resample.

    Why: the tolerance is a few thousandths of AUROC and a test split holds tens of parts, so the point loss alone
    cannot say whether INT8 lost anything; the interval says how much the test parts could have moved it."""
    mine, theirs = both_scored(fp32.paths, int8.paths)
    labels = fp32.labels[mine]
    s32, s8 = fp32.scores[mine], int8.scores[theirs]

    def loss(rows: np.ndarray) -> float:
        return roc_auc(labels[rows], s32[rows]) - roc_auc(labels[rows], s8[rows])

    return grouped_bootstrap(
        loss, np.asarray(groups, dtype=object)[mine], strata=labels, resamples=resamples, seed=seed
    )


def choose_line_model(
    fp32: Evaluation,
    int8: Evaluation | None,
    recipe: Recipe,
    refusal: str | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Which model ships and why: INT8 under ``line_precision="auto"`` when its image AUROC loss and its share of
    changed verdicts on the test parts are within the recipe's tolerances; what each scored, either way. With
    ``groups`` (each of ``fp32``'s parts' capture group) the loss is recorded with its interval
    (:func:`auroc_loss_interval`); the rule reads the loss itself."""
    record: dict[str, Any] = {"precision_asked": recipe.line_precision, "fp32": _at_threshold(fp32)}
    if int8 is None:
        reason = refusal or "INT8 not asked for (line_precision=fp32)"
        return {**record, "shipped": "fp32", "reason": reason}
    flips, parts = verdict_flips(fp32, int8)
    scored = _at_threshold(int8)
    loss = record["fp32"].get("image_auroc", float("nan")) - scored.get("image_auroc", float("nan"))
    record.update(
        int8=scored,
        auroc_loss=loss,
        verdict_flips=flips,
        parts=parts,
        tolerances={"max_auroc_loss": recipe.int8_max_auroc_loss, "max_flip_rate": recipe.int8_max_flip_rate},
    )
    within = ""
    if groups is not None:
        spread = auroc_loss_interval(fp32, int8, groups, seed=recipe.seed)
        record["auroc_loss_interval"] = [spread.low, spread.high]
        within = f" (95 % interval {spread.low:+.4f} to {spread.high:+.4f})"
    misses = []
    if not loss <= recipe.int8_max_auroc_loss:  # a NaN loss (one class only in the test) is no evidence either
        misses.append(f"image AUROC {loss:+.4f} below FP32{within} (tolerance {recipe.int8_max_auroc_loss})")
    if parts == 0 or flips / parts > recipe.int8_max_flip_rate:
        misses.append(f"{flips} of {parts} verdicts changed (tolerance {recipe.int8_max_flip_rate:.1%})")
    if recipe.line_precision == "int8":
        return {**record, "shipped": "int8", "reason": "asked for (line_precision=int8)", "outside_tolerance": misses}
    if misses:
        return {**record, "shipped": "fp32", "reason": "INT8 outside tolerance: " + "; ".join(misses)}
    drift = f"image AUROC {loss:+.4f} below FP32{within}, {flips} of {parts} verdicts changed"
    return {**record, "shipped": "int8", "reason": f"INT8 within tolerance: {drift}"}


def ship(candidate: Path, out: Path, record: dict[str, Any]) -> Path:
    """The chosen candidate written as the run's bundle, with the choice in its provenance."""
    bundle = load_bundle(candidate)
    spec = replace(bundle.spec, provenance={**bundle.spec.provenance, LINE_MODEL: record})
    return write_bundle(out, bundle.model_path, bundle.references, spec, overwrite=True, descriptors=bundle.descriptors)


def line_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The choice as MLflow metrics: which shipped, and INT8's drift where it was measured."""
    out = {"line_int8": float(record["shipped"] == "int8")}
    if "int8" in record:
        out.update(
            int8_auroc_loss=float(record["auroc_loss"]),
            int8_verdict_flips=float(record["verdict_flips"]),
            **dict(zip(("int8_auroc_loss_low", "int8_auroc_loss_high"), record.get("auroc_loss_interval", ()))),
            **{f"int8_test_{k}": v for k, v in record["int8"].items()},
            **{f"fp32_test_{k}": v for k, v in record["fp32"].items()},
        )
    return out
