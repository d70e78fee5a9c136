"""INT8 on real parts: what static quantisation of a product bundle does to its scores, verdicts, AUROC and speed.

``inspector quantize`` writes an INT8 copy of a bundle's model; the golden patches and whole-part descriptors stay
those of the FP32 model. This benchmark quantises a bundle (calibrated on ``--calibration`` goods of the product
split's calibration set), then scores the product split's test images through both bundles with the line's code
(``Inspector.score``) in the same run: the line score's drift (in the threshold's units), verdict flips at the
threshold, image AUROC of each (and of each view), the false-reject and escape rates, and images/s of each.

    .venv/bin/python benchmarks/quantize_drift.py runs/bq_fusedval_s0/trained_bundle \\
        ../shared/data/magnetic_tile_defect/magnetic_tile --group-pattern 'num_(\\d+)' --group-gap 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from inspector.engine import Inspector
from inspector.metrics import roc_auc
from inspector.quantize import quantize_bundle
from pipelines.datasets import group_by_number_gaps, scan_mvtec
from pipelines.ingest import SplitFractions, assign_splits, build_manifest
from pipelines.recipe import Recipe


def scored(bundle: Path, paths: list[Path]) -> tuple[np.ndarray, dict[str, np.ndarray], float, float]:
    """Line scores, each view's scores, the threshold and images/s (end to end, best of two passes)."""
    inspector = Inspector.from_bundle(bundle)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        results = list(inspector.score_paths(paths))
        best = min(best, time.perf_counter() - t0)
    if any(r.error for r in results):
        raise SystemExit(f"{bundle}: could not score {[r.error for r in results if r.error][:3]}")
    views = {k: np.array([r.views[k] for r in results]) for k in (results[0].views or {})}  # type: ignore[index]
    return np.array([r.score for r in results]), views, inspector.threshold, len(paths) / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("root", type=Path)
    p.add_argument("--calibration", type=int, default=64, help="calibration goods the activation ranges are taken from")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--group-pattern", default=None)
    p.add_argument("--group-gap", type=int, default=0)
    args = p.parse_args()

    records = scan_mvtec(args.root)
    groups = (
        group_by_number_gaps([r.path for r in records], args.group_pattern, args.group_gap)
        if args.group_pattern
        else None
    )
    fractions = SplitFractions.from_recipe(Recipe())
    split = assign_splits(build_manifest(records, group_of=groups), replace(fractions, seed=args.split_seed))
    test = split.test
    paths = [r.path for r in test]
    labels = np.array([r.label for r in test])
    types = np.array([r.defect_type for r in test])
    with tempfile.TemporaryDirectory(prefix="quantize-drift-") as tmp:
        t0 = time.perf_counter()
        q = quantize_bundle(args.bundle, split.calibration_good[: args.calibration], Path(tmp) / "int8")
        q_seconds = time.perf_counter() - t0
        fp32, int8 = scored(args.bundle, paths), scored(q, paths)
        from inspector.bundle import load_bundle

        report = load_bundle(q).spec.provenance["quantization"]
    threshold = fp32[2]
    print(
        f"{len(paths)} test images ({int(labels.sum())} defective); quantised in {q_seconds:.0f} s on {args.calibration} calibration goods"
    )
    print("drift recorded in the INT8 bundle (calibration images):", json.dumps(report["drift"], indent=None))
    print("model bytes:", report["model_bytes"], " ORT forward img/s:", report["images_per_second"])
    diff = np.abs(fp32[0] - int8[0])
    flips = int(np.sum((fp32[0] > threshold) != (int8[0] > threshold)))
    print(
        f"test images: |score fp32 - int8| max {diff.max():.4f} mean {diff.mean():.4f} (threshold {threshold:.3f}, "
        f"FP32 scores of the goods: median {np.median(fp32[0][labels == 0]):.3f}, 99th pct {np.percentile(fp32[0][labels == 0], 99):.3f}); "
        f"verdict flips {flips} of {len(paths)}"
    )
    for name, (scores, views, _, rate) in (("fp32", fp32), ("int8", int8)):
        frr = float(np.mean(scores[labels == 0] > threshold))
        escape = float(np.mean(scores[labels == 1] <= threshold))
        per_type = " ".join(
            f"{t}={roc_auc(labels[(labels == 0) | (types == t)], scores[(labels == 0) | (types == t)]):.3f}"
            for t in sorted(set(types[labels == 1]))
        )
        view_cells = " ".join(f"{k}={roc_auc(labels, v):.3f}" for k, v in views.items())
        print(
            f"  {name}: image AUROC {roc_auc(labels, scores):.3f} ({view_cells}) {per_type}; FRR {frr:.3f} escape {escape:.3f}; "
            f"end to end {rate:.1f} img/s"
        )
    print(f"  int8 / fp32 end-to-end speed: x{int8[3] / fp32[3]:.2f}")


if __name__ == "__main__":
    main()
