"""Probe: a *supervised* whole-part view (a classifier of defect photos against goods on the part descriptors) beside
the unsupervised Gaussian and the patch score. Frozen Lite0 features, no product training.

Why: with a few hundred defect photos the product could learn, on top of "how far is this part from the golden
parts" (the Gaussian), "does this part look like the defects we have seen". Measured two ways, so that no test
image shares a physical tile with a training defect: a 2-fold split of the defects by capture group within each
type (seen types), and leave-one-type-out (unseen types). Logistic regression on the descriptors standardised by
the fit goods (balanced classes, L2 strength ``--c``).

    .venv/bin/python benchmarks/part_classifier_probe.py ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 --cache runs/probe_cache
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from density_probe import pooled
from feature_probe import aggregate, cached_stage_maps, content_masks, fuse, nearest, probe_split, standardised

from inspector.density import GaussianDensity
from inspector.metrics import roc_auc
from inspector.preprocess import PreprocessConfig, Preprocessor
from pipelines.datasets import group_by_number_gaps, scan_mvtec

DENSITY_STAGES = (5, 6, 7, 8)
STRIDE_OF = {1: 2, 2: 4, 3: 8, 4: 16, 5: 16, 6: 32, 7: 32}


def zmax(*members: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The line's fusion: each view standardised on its calibration goods (median, IQR), the largest taken."""
    return np.maximum.reduce([standardised(test, cal) for test, cal in members])


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--size", default="320x256")
    p.add_argument("--fit-images", type=int, default=400)
    p.add_argument("--cal-images", type=int, default=140)
    p.add_argument("--bank", type=int, default=16384)
    p.add_argument("--c", default="0.001,0.01,0.1", help="comma-separated inverse L2 strengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--group-pattern", default=r"num_(\d+)")
    p.add_argument("--group-gap", type=int, default=2000)
    args = p.parse_args()

    records = scan_mvtec(args.root)
    rng = np.random.default_rng(args.seed)
    fit, cal, test = probe_split(records, rng, args.fit_images, args.cal_images)
    h, w = (int(v) for v in args.size.lower().split("x"))
    pre = Preprocessor(PreprocessConfig(height=h, width=w))
    sets = {"fit": fit, "cal": cal, "test": test}
    paths = {k: [r.path for r in v] for k, v in sets.items()}
    maps = {k: cached_stage_maps(paths[k], pre, [3, 4, *DENSITY_STAGES], args.cache) for k in sets}
    desc = {
        k: np.concatenate(
            [
                pooled(maps[k][s], content_masks(paths[k], pre, maps[k][s].shape[-2:]), "meanstd")
                for s in DENSITY_STAGES
            ],
            axis=1,
        ).astype(np.float64)
        for k in sets
    }
    gauss = GaussianDensity(desc["fit"], [2 * maps["fit"][s].shape[1] for s in DENSITY_STAGES])
    part = {k: gauss.distances(desc[k]) for k in ("cal", "test")}
    grid = maps["test"][4].shape[-2:]
    content = {k: content_masks(paths[k], pre, grid) for k in sets}
    feats = {k: fuse(maps[k], (3, 4), STRIDE_OF, "coarse") for k in sets}
    bank = feats["fit"][content["fit"]]
    bank = np.ascontiguousarray(bank[rng.choice(len(bank), min(args.bank, len(bank)), replace=False)])
    patch = {
        k: aggregate(
            nearest(feats[k].reshape(-1, feats[k].shape[-1]), bank)[0].reshape(len(feats[k]), -1), "coff0.5", content[k]
        )
        for k in ("cal", "test")
    }

    mu, sd = desc["fit"].mean(axis=0), desc["fit"].std(axis=0) + 1e-6
    z = {k: (desc[k] - mu) / sd for k in sets}
    good = np.array([r.is_good for r in test])
    types = np.array([r.defect_type or "good" for r in test])
    group_of = group_by_number_gaps([r.path for r in records], args.group_pattern, args.group_gap)
    groups = np.array([group_of.get(r.path, str(r.path)) for r in test])
    fold = np.zeros(len(test), dtype=int)
    for t in sorted(set(types[~good])):  # whole capture groups on one side, each type split in two
        names = sorted(set(groups[types == t]))
        for j, gi in enumerate(np.random.default_rng(1).permutation(len(names))):
            fold[(types == t) & (groups == names[gi])] = j % 2

    def auc(scores: np.ndarray, chosen: np.ndarray) -> float:
        return roc_auc(np.r_[np.zeros(good.sum()), np.ones(chosen.sum())], np.r_[scores[good], scores[chosen]])

    for c in (float(v) for v in args.c.split(",")):

        def classifier(train_defects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
            clf.fit(
                np.r_[z["fit"], z["test"][train_defects]], np.r_[np.zeros(len(z["fit"])), np.ones(len(train_defects))]
            )
            return clf.decision_function(z["test"]), clf.decision_function(z["cal"])

        rows: dict[str, dict[str, list[float]]] = {}
        for f in (0, 1):
            sup = classifier(np.flatnonzero(~good & (fold == f)))
            held = ~good & (fold != f)
            views = {
                "patch": patch["test"],
                "part (Gaussian)": part["test"],
                "classifier": sup[0],
                "zmax(patch, part)": zmax((patch["test"], patch["cal"]), (part["test"], part["cal"])),
                "zmax(patch, part, classifier)": zmax((patch["test"], patch["cal"]), (part["test"], part["cal"]), sup),
            }
            for name, scores in views.items():
                cells = rows.setdefault(name, {})
                cells.setdefault("all", []).append(auc(scores, held))
                for t in sorted(set(types[~good])):
                    cells.setdefault(t, []).append(auc(scores, held & (types == t)))
        print(f"C={c}: seen types, 2-fold split of the defects by capture group (mean of the two folds)")
        for name, cells in rows.items():
            print(f"  {name:<30} " + " ".join(f"{k}={np.mean(v):.3f}" for k, v in cells.items()), flush=True)
        loto: dict[str, list[float]] = {}
        for t in sorted(set(types[~good])):
            sup = classifier(np.flatnonzero(~good & (types != t)))
            chosen = types == t
            loto.setdefault("classifier", []).append(auc(sup[0], chosen))
            loto.setdefault("zmax(patch, part)", []).append(
                auc(zmax((patch["test"], patch["cal"]), (part["test"], part["cal"])), chosen)
            )
            loto.setdefault("zmax(patch, part, classifier)", []).append(
                auc(zmax((patch["test"], patch["cal"]), (part["test"], part["cal"]), sup), chosen)
            )
        print(f"C={c}: leave one type out ({', '.join(sorted(set(types[~good])))})")
        for name, vals in loto.items():
            print(f"  {name:<30} " + " ".join(f"{v:.3f}" for v in vals) + f"  mean {np.mean(vals):.3f}", flush=True)


if __name__ == "__main__":
    main()
