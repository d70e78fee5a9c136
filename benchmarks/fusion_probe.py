"""How the patch and whole-part views become one score: fusion rules compared on bundles a quality run left behind.

Why: on the magnetic tiles each view alone wins some defect types by a wide margin (uneven shading: whole part 0.85,
worst patch 0.59) and the line's fused score loses part of that (0.68). The rules here are all fitted on what a
bundle build has — the calibration goods and, for the supervised one, the validation defects — and are scored on
the test images, so the figures are what the line would give. No training: seconds per bundle once cached.

    .venv/bin/python benchmarks/fusion_probe.py ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 \\
        --bundle runs/bq_split1/trained_bundle:1 --bundle runs/bq_loto_fusedval/loto_uneven_bundle:0:uneven

``--bundle PATH:SPLIT_SEED[:HELD_OUT_TYPE]``: the bundle, the split seed it was built on and, for a
leave-one-type-out bundle, the type it never saw (its test is then the test goods plus every image of that type).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np

from inspector.engine import Inspector
from inspector.metrics import roc_auc
from pipelines.datasets import ImageRecord, group_by_number_gaps, scan_mvtec
from pipelines.ingest import SplitFractions, assign_splits, build_manifest
from pipelines.recipe import DataSplit, Recipe, resolve_input_size


def raw_views(bundle: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(patch, part) raw scores of ``paths`` through the bundle, as the line computes them before fusion."""
    inspector = Inspector.from_bundle(bundle)
    embedded = inspector.embedder.embed_all(paths)
    if any(e is not None for e in embedded.errors):
        raise SystemExit(f"unreadable images under {bundle}")
    patch = inspector.golden.anomaly_scores(embedded.embeddings, inspector.bundle.spec.scoring, embedded.valid)
    if inspector.density is None or embedded.descriptors is None:
        raise SystemExit(f"{bundle} has no whole-part score")
    return np.asarray(patch, np.float64), np.asarray(inspector.density.distances(embedded.descriptors), np.float64)


def iqr_z(cal: np.ndarray, x: np.ndarray) -> np.ndarray:
    q1, med, q3 = np.percentile(cal, [25, 50, 75])
    return (x - med) / max(q3 - q1, 1e-9)


def tail_z(cal: np.ndarray, x: np.ndarray, q: float = 90) -> np.ndarray:
    med, hi = np.percentile(cal, [50, q])
    return (x - med) / max(hi - med, 1e-9)


def log_z(cal: np.ndarray, x: np.ndarray) -> np.ndarray:
    lc, lx = np.log(np.maximum(cal, 1e-9)), np.log(np.maximum(x, 1e-9))
    return (lx - lc.mean()) / max(lc.std(), 1e-9)


def mean_z(cal: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (x - cal.mean()) / max(cal.std(), 1e-9)


def rules(
    cal: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], x: tuple[np.ndarray, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every fusion rule's scores of ``x``, each fitted on the calibration goods (``cal``) and validation defects (``val``)."""
    out: dict[str, np.ndarray] = {"patch": x[0], "part": x[1]}
    for name, z in {"iqr": iqr_z, "tail90": tail_z, "log": log_z, "std": mean_z}.items():
        zp, zd = z(cal[0], x[0]), z(cal[1], x[1])
        out[f"max {name}"] = np.maximum(zp, zd)
        out[f"sum {name}"] = zp + zd
        out[f"l2+ {name}"] = np.hypot(np.maximum(zp, 0), np.maximum(zd, 0))
    # supervised: the weight of the part view that best separates calibration goods from validation defects
    zc = (iqr_z(cal[0], cal[0]), iqr_z(cal[1], cal[1]))
    zv = (iqr_z(cal[0], val[0]), iqr_z(cal[1], val[1]))
    labels = np.r_[np.zeros(len(zc[0])), np.ones(len(zv[0]))]
    best = max(
        np.linspace(0, 1, 21),
        key=lambda w: roc_auc(labels, np.r_[(1 - w) * zc[0] + w * zc[1], (1 - w) * zv[0] + w * zv[1]]),
    )
    out["val-weighted sum iqr"] = (1 - best) * iqr_z(cal[0], x[0]) + best * iqr_z(cal[1], x[1])
    return out


def bundle_args(doc: str | None, cache: str) -> argparse.Namespace:
    """The command line every bundle probe takes: the dataset root, ``--bundle PATH:SPLIT_SEED[:TYPE]`` and grouping."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--bundle", action="append", required=True, help="PATH:SPLIT_SEED[:HELD_OUT_TYPE]")
    p.add_argument("--group-pattern", default=None)
    p.add_argument("--group-gap", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path(cache))
    args = p.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    return args


def bundle_sets(
    args: argparse.Namespace,
) -> Iterator[tuple[str, str, list[str], DataSplit, list[Path], list[ImageRecord]]]:
    """For each ``--bundle``: its path, split seed, held-out type (if any), the split it was built on, its
    validation defects and test images (with every image of a held-out type), as the quality run made them."""
    records = scan_mvtec(args.root)
    groups = (
        group_by_number_gaps([r.path for r in records], args.group_pattern, args.group_gap)
        if args.group_pattern
        else None
    )
    manifest = build_manifest(records, group_of=groups)
    recipe = resolve_input_size(Recipe(seed=0), [(e.width, e.height) for e in manifest.entries if e.is_good])
    all_records = manifest.records()
    types_of = {str(r.path): r.defect_type for r in all_records}
    for spec in args.bundle:
        path, seed, *held = spec.split(":")
        split = assign_splits(manifest, replace(SplitFractions.from_recipe(recipe), seed=int(seed)))
        val = list(split.validation_defective)
        test = list(split.test)
        if held:
            val = [v for v in val if types_of.get(str(v)) != held[0]]
            test = [r for r in test if r.is_good] + [r for r in all_records if r.defect_type == held[0]]
        yield path, seed, held, split, val, test


def main() -> None:
    args = bundle_args(__doc__, "runs/fusion_cache")
    table: dict[str, dict[str, dict[str, float]]] = {}
    for path, seed, held, split, val, test in bundle_sets(args):
        cache = args.cache / (Path(path).parent.name + "_" + Path(path).name + f"_{seed}.npz")
        if cache.exists():
            z = np.load(cache)
            cal_v, val_v, test_v = (z["cp"], z["cd"]), (z["vp"], z["vd"]), (z["tp"], z["td"])
        else:
            cal_v = raw_views(Path(path), list(split.calibration_good))
            val_v = raw_views(Path(path), val)
            test_v = raw_views(Path(path), [r.path for r in test])
            np.savez(cache, cp=cal_v[0], cd=cal_v[1], vp=val_v[0], vd=val_v[1], tp=test_v[0], td=test_v[1])
        labels = np.array([0 if r.is_good else 1 for r in test])
        kinds = np.array([r.defect_type or "good" for r in test])
        name = f"{Path(path).parent.name}/{Path(path).name}"
        table[name] = {}
        for rule, s in rules(cal_v, val_v, test_v).items():
            row = {"overall": roc_auc(labels, s)}
            for t in sorted(set(kinds) - {"good"}):
                m = (kinds == "good") | (kinds == t)
                row[t] = roc_auc((kinds[m] != "good").astype(int), s[m])
            table[name][rule] = row
        print(
            f"\n{name} (split seed {seed}{', held out ' + held[0] if held else ''}; {len(cal_v[0])} cal goods, {len(val_v[0])} val defects)"
        )
        types = [k for k in next(iter(table[name].values())) if k != "overall"]
        print(f"{'rule':24s}{'overall':>9s}" + "".join(f"{t:>10s}" for t in types))
        for rule, row in table[name].items():
            print(f"{rule:24s}{row['overall']:9.3f}" + "".join(f"{row[t]:10.3f}" for t in types))
    rule_names = list(next(iter(table.values())))
    print("\nmean overall AUROC over the bundles, and the mean of each bundle's weakest type:")
    for rule in rule_names:
        overall = np.mean([t[rule]["overall"] for t in table.values()])
        weakest = np.mean([min(v for k, v in t[rule].items() if k != "overall") for t in table.values()])
        print(f"{rule:24s}{overall:9.3f}{weakest:9.3f}")


if __name__ == "__main__":
    main()
