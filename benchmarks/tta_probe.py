"""Test-time flips: does scoring each part also mirrored, and averaging, separate defects better on the line?

Why: a part's score is the worst of a few hundred patch distances plus a whole-part distance, so one unlucky good
part sets the threshold. Averaging the part's score over its mirror images (each through the same bundle, golden
bank and Gaussian) smooths that noise, at the cost of one more forward and kNN per flip. Fitted like the line: both
views standardised on the calibration goods (median, IQR) after the same flips, the larger taken. No training: the
bundles a quality run left behind, a minute each on 2 cores.

    .venv/bin/python benchmarks/tta_probe.py ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 --bundle runs/bq_split1/trained_bundle:1

``--bundle PATH:SPLIT_SEED[:HELD_OUT_TYPE]`` as in ``fusion_probe.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
from fusion_probe import bundle_args, bundle_sets, iqr_z, raw_views
from PIL import Image, ImageOps

from inspector.metrics import roc_auc

FLIPS = {
    "none": lambda im: im,
    "h": ImageOps.mirror,
    "v": ImageOps.flip,
    "hv": lambda im: ImageOps.flip(ImageOps.mirror(im)),
}


def flipped_copies(paths: list[Path], flip: str, out: Path) -> list[Path]:
    """Lossless PNG copies of ``paths`` under ``out``, mirrored by ``flip`` (``none``: the same decode path for all)."""
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for i, p in enumerate(paths):
        q = out / f"{i:05d}.png"
        if not q.exists():
            with Image.open(p) as im:
                FLIPS[flip](ImageOps.exif_transpose(im)).save(q)
        copies.append(q)
    return copies


def line_score(cal: tuple[np.ndarray, np.ndarray], x: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return np.maximum(iqr_z(cal[0], x[0]), iqr_z(cal[1], x[1]))


def main() -> None:
    args = bundle_args(__doc__, "runs/tta_cache")
    variants = {"none": ["none"], "h": ["none", "h"], "v": ["none", "v"], "h+v+hv": ["none", "h", "v", "hv"]}
    summary: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for path, seed, held, split, _, test in bundle_sets(args):
            cal_paths, test_paths = list(split.calibration_good), [r.path for r in test]
            views: dict[str, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {}
            for flip in FLIPS:
                cache = (
                    args.cache
                    / f"{Path(path).parent.name}_{Path(path).name}_{seed}{'_' + held[0] if held else ''}_{flip}.npz"
                )
                if not cache.exists():
                    base = Path(tmp) / f"{seed}{held}" / flip
                    c = raw_views(Path(path), flipped_copies(cal_paths, flip, base / "cal"))
                    t = raw_views(Path(path), flipped_copies(test_paths, flip, base / "test"))
                    np.savez(cache, cp=c[0], cd=c[1], tp=t[0], td=t[1])
                z = np.load(cache)
                views[flip] = ((z["cp"], z["cd"]), (z["tp"], z["td"]))
            labels = np.array([0 if r.is_good else 1 for r in test])
            kinds = np.array([r.defect_type for r in test])
            types = sorted(set(kinds[labels == 1]))
            print(
                f"\n{path} (split seed {seed}{', held out ' + held[0] if held else ''}; {len(cal_paths)} cal goods, {len(test)} test)"
            )
            print(
                f"{'flips averaged':16s}{'overall':>9s}" + "".join(f"{t:>10s}" for t in types) + f"{'FRR@cal99':>11s}"
            )
            for name, flips in variants.items():
                cal = tuple(np.mean([views[f][0][i] for f in flips], axis=0) for i in (0, 1))
                x = tuple(np.mean([views[f][1][i] for f in flips], axis=0) for i in (0, 1))
                s, s_cal = line_score(cal, x), line_score(cal, cal)  # type: ignore[arg-type]
                per = [roc_auc(labels[(labels == 0) | (kinds == t)], s[(labels == 0) | (kinds == t)]) for t in types]
                frr = float(np.mean(s[labels == 0] > np.quantile(s_cal, 0.99)))
                overall = roc_auc(labels, s)
                summary[name].append((overall, min(per)))
                print(f"{name:16s}{overall:9.3f}" + "".join(f"{v:10.3f}" for v in per) + f"{frr:11.3f}")
    print("\nmean over bundles: overall AUROC, weakest type")
    for name, rows in summary.items():
        print(f"{name:16s}{np.mean([r[0] for r in rows]):9.3f}{np.mean([r[1] for r in rows]):9.3f}")


if __name__ == "__main__":
    main()
