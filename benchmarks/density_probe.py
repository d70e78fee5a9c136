"""Training-free probe: a Gaussian fitted to the golden parts' pooled features, scored by Mahalanobis distance.

Why: the product scores a part by its worst patch's distance to the nearest good patch. That finds small local
defects but not a part whose whole surface is off (large low-contrast shading, a fine crack network spread thin):
no single patch is far from *some* good patch. A density over whole-part descriptors (Rippel et al. 2020,
"Modeling the distribution of normal data in pre-trained deep features for anomaly detection") looks at the
statistics of the entire part instead, and it stays a golden-reference model: the mean and covariance are
refitted from the references, so new golden parts need no retraining.

Every defect image is scored (no model here is trained on any of them); goods: fit = a seeded subset of
``train/good``, calibration = ``--cal-images`` other train goods (the 1 % FRR threshold), test = ``test/good``.

    .venv/bin/python benchmarks/density_probe.py ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 --cache runs/probe_cache
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from feature_probe import (
    aggregate,
    cached_stage_maps,
    content_masks,
    ensemble_scores,
    fuse,
    nearest,
    per_type,
    probe_split,
    product_split_defects,
    subset_cells,
)

from inspector.density import GaussianDensity
from inspector.preprocess import PreprocessConfig, Preprocessor
from pipelines.datasets import scan_mvtec


def pooled(maps: np.ndarray, content: np.ndarray, how: str) -> np.ndarray:
    """(N, C) descriptor of each image from its (N, C, h, w) stage map over the on-part cells ``content`` (N, h*w):
    ``mean``, ``meanstd`` (mean and standard deviation side by side: texture spread as well as level, the product's
    descriptor) or ``meanstdmax`` (plus each channel's largest on-part value)."""
    flat = maps.reshape(*maps.shape[:2], -1)
    mask = np.where(content.any(axis=1, keepdims=True), content, True)[:, None, :].astype(np.float32)
    count = mask.sum(axis=2)
    mean = (flat * mask).sum(axis=2) / count
    if how == "mean":
        return mean
    var = (((flat - mean[..., None]) ** 2) * mask).sum(axis=2) / count
    parts = [mean, np.sqrt(var)]
    if how == "meanstdmax":  # the extreme cell too: a thin crack moves few cells
        parts.append(np.where(mask > 0, flat, -np.inf).max(axis=2))
    return np.concatenate(parts, axis=1)


def region_pooled(maps: np.ndarray, content: np.ndarray, regions: int) -> np.ndarray:
    """(N, regions², 2C): the mean/std descriptor of each cell of a ``regions`` x ``regions`` split of every image's
    on-part bounding box (rows and columns split as evenly as the grid allows; a region with no cell gets the
    whole part's): regional statistics, between one patch and the whole part."""
    n, c, h, w = maps.shape
    out = np.empty((n, regions * regions, 2 * c), dtype=np.float32)
    grid = content.reshape(n, h, w)
    for i in range(n):
        rows, cols = np.flatnonzero(grid[i].any(axis=1)), np.flatnonzero(grid[i].any(axis=0))
        if not len(rows) or not len(cols):
            rows, cols = np.arange(h), np.arange(w)
        row_bands = np.array_split(rows, regions)
        col_bands = np.array_split(cols, regions)
        whole = pooled(maps[i : i + 1], content[i : i + 1], "meanstd")[0]
        for r, rb in enumerate(row_bands):
            for k, cb in enumerate(col_bands):
                mask = np.zeros((h, w), dtype=bool)
                if len(rb) and len(cb):
                    mask[np.ix_(rb, cb)] = True
                mask &= grid[i]
                out[i, r * regions + k] = (
                    pooled(maps[i : i + 1], mask.reshape(1, -1), "meanstd")[0] if mask.any() else whole
                )
    return out


def gaussian_scores(fit: np.ndarray, *queries: np.ndarray) -> list[np.ndarray]:
    """Mahalanobis distance of each query row to a Gaussian fitted on ``fit`` (Ledoit-Wolf shrunk covariance, so
    a few hundred references are enough for a few hundred channels): the product's ``GaussianDensity``."""
    model = GaussianDensity(fit, [fit.shape[1]])
    return [model.distances(q) for q in queries]


def tail_standardised(values: np.ndarray, reference: np.ndarray, q: float) -> np.ndarray:
    """``values`` in units of the calibration goods' distance from their median to their ``q``-th percentile: each
    view then reaches 1 at about the same false-reject rate, which is what the max of the views compares."""
    median, tail = np.percentile(reference, [50, q])
    return (values - median) / max(tail - median, 1e-9)


def report(label: str, scores: np.ndarray, cal: np.ndarray, test: list, in_split: np.ndarray | None) -> None:
    cells = " ".join(f"{t}={v:.3f}" for t, v in per_type(scores, test, cal).items())
    print(f"  {label:<34} {cells}", flush=True)
    if in_split is not None:
        print(f"  {'':<34} {subset_cells(scores, test, in_split)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--size", default="320x256")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--stages", default="1,2,3,4,5,6", help="stage indices whose pooled features get a Gaussian each")
    p.add_argument(
        "--stage-sets",
        default="2+3+4+5+6+7+8",
        help="comma-separated '+'-joined stage sets whose "
        "Mahalanobis distances are summed (each also fused with the patch rule)",
    )
    p.add_argument(
        "--fit-images", type=int, default=400, help="train goods the Gaussian (and the patch bank) is fitted on"
    )
    p.add_argument("--cal-images", type=int, default=140)
    p.add_argument("--pooling", default="mean,meanstd")
    p.add_argument("--patch-variant", default="3+4", help="the product's patch features, for the fused rows")
    p.add_argument("--bank", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--regions",
        default="",
        help="comma-separated R: also score R x R regions of each part's bounding box "
        "against one Gaussian of every golden region (stages --stages, summed), the part's score its worst region",
    )
    p.add_argument(
        "--tail-scales",
        default="",
        help="comma-separated percentiles q: also fuse by the max of the two "
        "scores each scaled by its calibration goods' median-to-q-th-percentile distance (instead of the IQR)",
    )
    p.add_argument(
        "--extra-sizes",
        default="",
        help="comma-separated HxW: also compute the whole-part Gaussian of "
        "--stage-sets at these input sizes (a part seen at several scales); each alone and summed with the "
        "--size one, each also fused with the patch rule",
    )
    p.add_argument("--verbose", action="store_true", help="also print each stage's own score")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--group-pattern", default=None)
    p.add_argument("--group-gap", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)

    records = scan_mvtec(args.root)
    rng = np.random.default_rng(args.seed)
    fit, cal, test = probe_split(records, rng, args.fit_images, args.cal_images)
    in_split = product_split_defects(records, test, args.group_pattern, args.group_gap) if args.group_pattern else None
    stages = [int(s) for s in args.stages.split(",")]
    patch_variant = tuple(int(s) for s in args.patch_variant.split("+"))
    need = sorted(set(stages) | set(patch_variant))
    h, w = (int(v) for v in args.size.lower().split("x"))
    pre = Preprocessor(PreprocessConfig(height=h, width=w))
    t0 = time.perf_counter()
    maps = {
        name: cached_stage_maps([r.path for r in group], pre, need, args.cache, args.backbone)
        for name, group in (("fit", fit), ("cal", cal), ("test", test))
    }
    paths = {"fit": [r.path for r in fit], "cal": [r.path for r in cal], "test": [r.path for r in test]}
    print(
        f"fit {len(fit)}, cal {len(cal)}, test {len(test)} ({sum(r.is_good for r in test)} good); features in {time.perf_counter() - t0:.0f} s"
    )

    members: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for how in args.pooling.split(","):
        per_stage = []
        for s in stages:
            grid = maps["test"][s].shape[-2:]
            desc = {k: pooled(maps[k][s], content_masks(paths[k], pre, grid), how) for k in maps}
            cal_s, test_s = gaussian_scores(desc["fit"], desc["cal"], desc["test"])
            per_stage.append((test_s, cal_s))
            if args.verbose:
                report(f"gauss {how} stage {s} ({desc['fit'].shape[1]}-d)", test_s, cal_s, test, in_split)
        by_stage = dict(zip(stages, per_stage))
        for subset in args.stage_sets.split(","):
            chosen = [by_stage[int(s)] for s in subset.split("+")]
            summed = (sum(t for t, _ in chosen), sum(c for _, c in chosen))
            report(f"gauss {how} sum {subset}", *summed, test, in_split)
            members[f"gauss-{how}-{subset}"] = summed

    base = {name: value for name, value in members.items() if name.startswith("gauss-meanstd-")}
    for size in [v for v in args.extra_sizes.split(",") if v.strip()]:
        eh, ew = (int(v) for v in size.lower().split("x"))
        epre = Preprocessor(PreprocessConfig(height=eh, width=ew))
        emaps = {
            name: cached_stage_maps([r.path for r in group], epre, stages, args.cache, args.backbone)
            for name, group in (("fit", fit), ("cal", cal), ("test", test))
        }
        by_stage = {}
        for s in stages:
            grid = emaps["test"][s].shape[-2:]
            desc = {k: pooled(emaps[k][s], content_masks(paths[k], epre, grid), "meanstd") for k in emaps}
            cal_s, test_s = gaussian_scores(desc["fit"], desc["cal"], desc["test"])
            by_stage[s] = (test_s, cal_s)
        for subset in args.stage_sets.split(","):
            chosen = [by_stage[int(s)] for s in subset.split("+")]
            alone = (sum(t for t, _ in chosen), sum(c for _, c in chosen))
            report(f"gauss meanstd {subset} @{size}", *alone, test, in_split)
            members[f"gauss@{size}-{subset}"] = alone
            own = base.get(f"gauss-meanstd-{subset}")
            if own is not None:
                both = (own[0] + alone[0], own[1] + alone[1])
                report(f"gauss {subset} @{args.size}+{size}", *both, test, in_split)
                members[f"gauss@{args.size}+{size}-{subset}"] = both
                scaled = ensemble_scores([own, alone], np.add)
                report(f"zsum gauss {subset} @{args.size},{size}", *scaled, test, in_split)

    for regions in [int(v) for v in args.regions.split(",") if v.strip()]:
        total = {k: 0.0 for k in ("cal", "test")}
        for s in stages:
            grid = maps["test"][s].shape[-2:]
            desc = {k: region_pooled(maps[k][s], content_masks(paths[k], pre, grid), regions) for k in maps}
            model = GaussianDensity(desc["fit"].reshape(-1, desc["fit"].shape[-1]), [desc["fit"].shape[-1]])
            for k in total:
                total[k] = total[k] + model.distances(desc[k].reshape(-1, desc[k].shape[-1])).reshape(len(desc[k]), -1)
        scores = {k: v.max(axis=1) for k, v in total.items()}
        report(f"regions {regions}x{regions}, max over regions", scores["test"], scores["cal"], test, in_split)
        members[f"regions{regions}"] = (scores["test"], scores["cal"])

    # The product's patch rule on the same goods, alone and fused with each density score.
    stride_of = {1: 2, 2: 4, 3: 8, 4: 16, 5: 16, 6: 32, 7: 32}
    grid = maps["test"][max(patch_variant, key=lambda v: stride_of[v])].shape[-2:]
    content = {k: content_masks(paths[k], pre, grid) for k in maps}
    parts = {k: fuse(maps[k], patch_variant, stride_of, "coarse") for k in maps}
    bank = parts["fit"][content["fit"]]
    bank = np.ascontiguousarray(bank[rng.choice(len(bank), min(args.bank, len(bank)), replace=False)])
    patch = {}
    for k in ("cal", "test"):
        d = nearest(parts[k].reshape(-1, parts[k].shape[-1]), bank)[0].reshape(len(parts[k]), -1)
        patch[k] = aggregate(d, "coff0.5", content[k])
    report(f"patch {args.patch_variant} product rule", patch["test"], patch["cal"], test, in_split)
    for name, (t, c) in members.items():
        for how, combine in (("zsum", np.add), ("zmax", np.maximum)):
            fused = ensemble_scores([(patch["test"], patch["cal"]), (t, c)], combine)
            report(f"{how}(patch, {name})", *fused, test, in_split)
        if name.startswith("regions") and len(members) > 1:  # three views: patch, whole part, regions
            whole = next(v for k, v in members.items() if k.startswith("gauss"))
            fused = ensemble_scores([(patch["test"], patch["cal"]), whole, (t, c)], np.maximum)
            report(f"zmax(patch, whole, {name})", *fused, test, in_split)
        for q in [float(v) for v in args.tail_scales.split(",") if v.strip()]:
            members_q = [(patch["test"], patch["cal"]), (t, c)]
            fused = tuple(
                np.maximum(*(tail_standardised(v, cal_v, q) for v, cal_v in ((m[i], m[1]) for m in members_q)))
                for i in (0, 1)
            )
            report(f"zmax-q{q:g}(patch, {name})", *fused, test, in_split)


if __name__ == "__main__":
    main()
