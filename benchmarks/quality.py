"""Detection quality on any dataset ``pipelines train --data`` reads (MVTec layout, VisA, images labelled by
their masks): the frozen baselines vs the Siamese-trained product model, one run.

Every model is scored exactly as on the line (ONNX bundle through ``inspector``), on the product's own split (the
manifest split of the training flow: content/group keyed; test defects are never trained on). Experiments
(``--experiments``, comma-separated):

  product    frozen global (DESIGN baseline), frozen patch (the patch embedder before training) and trained (the
             default recipe): image AUROC overall and per type, pixel AUROC against ``ground_truth/`` masks, the
             threshold's realised false-reject rate on the test goods (captured later than the calibration goods
             when the folder is an MVTec split by time) against its target and calibration bound, the escape rate
             per type, and the line model's images/s;
  good-only  trained with good images and synthetic defects only (no defect photos);
  few-shot   trained with 5, 10 and 25 defect photos (drawn by seed), beside 0 (good-only) and all when those run;
  loto       leave one defect type out: train without type T, test on every image of T (none was trained on);
             the frozen patch embedder on the same images beside it.

    .venv/bin/python benchmarks/quality.py ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 --experiments product,good-only,few-shot,loto

``--group-pattern``/``--group-gap`` group images whose numeric ids are within the gap (the same physical part
photographed in consecutive frames), so that no part straddles train and test; ``--group-by-folder`` makes each
folder one group, as in ``pipelines train``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch

from inspector.bundle import load_bundle
from inspector.engine import Inspector
from inspector.preprocess import PreprocessConfig
from models.siamese import FrozenGlobalEmbedder, build_embedder
from pipelines.datasets import ImageRecord, capture_groups, scan_root
from pipelines.ingest import Manifest, SplitFractions, assign_splits, build_manifest
from pipelines.recipe import (
    DataSplit,
    Evaluation,
    Recipe,
    build_bundle,
    evaluate_bundle,
    fit_embedder,
    pixel_level_auroc,
    resolve_bit_depth,
    resolve_input_size,
)
from pipelines.settings import apply_overrides, load_overrides

FEW_SHOT = (5, 10, 25)


def escape_per_type(evaluation: Evaluation) -> dict[str, float]:
    """Share of each type's test defects scored at or under the threshold (let through)."""
    types = np.asarray(evaluation.defect_types)
    return {
        t: float(np.mean(evaluation.scores[types == t] <= evaluation.threshold))
        for t in sorted(set(types[evaluation.labels == 1]))
    }


def pixel_level(bundle: Path, test: list[ImageRecord], limit: int = 400) -> float:
    """Pixel AUROC of the bundle's heatmaps on the test images that have masks, plus the test goods (all-normal)."""
    value = pixel_level_auroc(bundle, test, limit)
    return float("nan") if value is None else value


def line_speed(bundle: Path, paths: list[Path], repeat: int = 1) -> float:
    """End-to-end images/s of the bundle through ``Inspector.score_paths`` (decode, preprocess, ORT, kNN)."""
    inspector = Inspector.from_bundle(bundle)
    list(inspector.score_paths(paths[:32]))  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        list(inspector.score_paths(paths))
    return repeat * len(paths) / (time.perf_counter() - t0)


def score_views(bundle: Path, test: list[ImageRecord]) -> dict[str, Evaluation]:
    """The bundle's test scores as the line gives them (``fused``) and, when it also scores whole parts, each view
    alone: ``patch`` (the worst-patch rule, what the product scored before the whole-part score) and ``part`` (the
    Gaussian of the golden parts' descriptors). One embedding pass; same images, same bank, same offset."""
    inspector = Inspector.from_bundle(bundle)
    records = list(test)
    embedded = inspector.embedder.embed_all([r.path for r in records])
    kept = [r for r, e in zip(records, embedded.errors) if e is None]
    patch = inspector.golden.anomaly_scores(embedded.embeddings, inspector.bundle.spec.scoring, embedded.valid)
    views = {"fused": inspector.with_whole_part(patch, embedded.descriptors)}
    if inspector.density is not None and embedded.descriptors is not None:
        views.update(patch=patch, part=inspector.density.distances(embedded.descriptors))
    return {
        name: Evaluation(
            paths=[str(r.path) for r in kept],
            defect_types=[r.defect_type for r in kept],
            labels=np.array([r.label for r in kept]),
            scores=np.asarray(v, dtype=np.float64),
            threshold=inspector.threshold if name == "fused" else float("nan"),
        )
        for name, v in views.items()
    }


def view_columns(label: str, views: dict[str, Evaluation]) -> dict[str, dict[str, float]]:
    """Table columns ``label`` (the line's score) and, for a bundle with a whole-part score, its two views alone."""
    names = {"patch": f"{label}: patch", "part": f"{label}: part"}
    cols = {
        names[k]: {"overall": v.metrics()["image_auroc"], **v.per_type_auroc()} for k, v in views.items() if k in names
    }
    cols[label] = {"overall": views["fused"].metrics()["image_auroc"], **views["fused"].per_type_auroc()}
    return cols


def train_and_evaluate(
    split: DataSplit, recipe: Recipe, out: Path, name: str, test: list[ImageRecord] | None = None
) -> tuple[Path, Evaluation, float]:
    t0 = time.perf_counter()
    embedder, _ = fit_embedder(split, recipe, checkpoint_dir=out / f"{name}_checkpoints")
    seconds = time.perf_counter() - t0
    bundle = build_bundle(embedder, split, recipe, out / f"{name}_bundle", model_name=name)
    return bundle, evaluate_bundle(bundle, test if test is not None else split.test), seconds


def offset_choice(bundle: Path) -> str:
    """The bundle's scoring offset and the validation AUROC of each candidate it was chosen from."""
    spec = load_bundle(bundle).spec
    tried = spec.threshold.details.get("offset_auroc") or {}
    return f"{spec.scoring.offset:g}" + (f" ({', '.join(f'{c}: {a:.3f}' for c, a in tried.items())})" if tried else "")


def few_shot_split(split: DataSplit, n: int, seed: int) -> DataSplit:
    """Keep ``n`` training defect photos, drawn at random (seeded); validation and test unchanged."""
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(split.train_defective), min(n, len(split.train_defective)), replace=False))
    return replace(split, train_defective=[split.train_defective[i] for i in keep])


def without_type(
    split: DataSplit, all_records: list[ImageRecord], held_out: str
) -> tuple[DataSplit, list[ImageRecord]]:
    """A split with type ``held_out`` removed from training and validation, and its test: test goods + every image of it."""
    val_types = {str(r.path): r.defect_type for r in all_records}
    train = [r for r in split.train_defective if r.defect_type != held_out]
    val = [p for p in split.validation_defective if val_types.get(str(p)) != held_out]
    test = [r for r in split.test if r.is_good] + [r for r in all_records if r.defect_type == held_out]
    return replace(split, train_defective=train, validation_defective=val), test


def print_table(title: str, columns: dict[str, dict[str, float]], counts: dict[str, int] | None = None) -> None:
    rows = list(dict.fromkeys(k for col in columns.values() for k in col))
    print(f"\n{title}\n{'':<16}" + "".join(f"{c:>20}" for c in columns) + ("       n" if counts else ""))
    for r in rows:
        cells = "".join(f"{col.get(r, float('nan')):>20.3f}" for col in columns.values())
        print(f"{r:<16}{cells}" + (f"{counts[r]:>8}" if counts and r in counts else ""))


def product_split(
    root: Path,
    recipe: Recipe,
    group_pattern: str | None,
    group_gap: int,
    by_folder: bool,
    split_seed: int | None,
    resolve_size: bool = True,
) -> tuple[Manifest, DataSplit, Recipe]:
    """The training flow's split of ``root`` (same grouping, fractions and seed), and the recipe with its input size
    and bit depth resolved from the data as the flow does; other benchmarks use it to score on the same test images."""
    records = scan_root(root)
    groups = capture_groups(records, group_pattern, group_gap, by_folder=by_folder)
    manifest = build_manifest(records, group_of=groups)
    if resolve_size:
        recipe = resolve_input_size(recipe, [(e.width, e.height) for e in manifest.entries if e.is_good])
    recipe = resolve_bit_depth(recipe, [e.bits for e in manifest.entries])
    fractions = SplitFractions.from_recipe(recipe)
    split = assign_splits(manifest, fractions if split_seed is None else replace(fractions, seed=split_seed))
    return manifest, split, recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/bench_quality"))
    p.add_argument("--size", default=None, help="input HxW (default: the recipe's default)")
    p.add_argument("--resize", default="letterbox", choices=["letterbox", "stretch"])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    p.add_argument("--epoch-size", type=int, default=None)
    p.add_argument("--group-pattern", default=None, help="regex with one numeric capture group in file names")
    p.add_argument("--group-gap", type=int, default=0)
    p.add_argument("--group-by-folder", action="store_true", help="each folder is one capture group")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="the split's own seed (default: --seed); fix it and vary "
        "--seed to see how much the bank draw and training alone move the figures on the same test images",
    )
    p.add_argument("--experiments", default="product", help="comma-separated: product, good-only, few-shot, loto")
    p.add_argument(
        "--loto-frozen-only",
        action="store_true",
        help="leave-one-type-out with the frozen patch embedder only (no training: minutes instead of an hour)",
    )
    p.add_argument(
        "--loto-types", default=None, help="comma-separated defect types to hold out in turn (default: every type)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any recipe setting, as in `pipelines train --set`",
    )
    args = p.parse_args()
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]

    recipe = Recipe(seed=args.seed)
    if args.size:
        h, w = (int(v) for v in args.size.lower().split("x"))
        recipe = replace(recipe, preprocess=PreprocessConfig(height=h, width=w, resize=args.resize))
    if args.epochs is not None:
        recipe = replace(recipe, train=replace(recipe.train, epochs=args.epochs))
    if args.epoch_size is not None:
        recipe = replace(recipe, epoch_size=args.epoch_size)
    recipe = apply_overrides(
        replace(recipe, train=replace(recipe.train, progress=True)), load_overrides(None, args.overrides)
    )

    manifest, split, recipe = product_split(
        args.root,
        recipe,
        args.group_pattern,
        args.group_gap,
        args.group_by_folder,
        args.split_seed,
        resolve_size=not args.size,
    )
    all_records = manifest.records()
    print("ingest:", json.dumps(manifest.summary()), "\nsplit:", json.dumps(split.summary()))
    print(
        f"input {recipe.preprocess.height}x{recipe.preprocess.width} {recipe.preprocess.resize}, {recipe.train.epochs} epochs x {recipe.epoch_size} images"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"split": split.summary(), "recipe": recipe.to_dict()}
    n_test = {
        t: sum(1 for r in split.test if r.defect_type == t)
        for t in sorted({r.defect_type for r in split.test if not r.is_good})
    }

    torch.manual_seed(recipe.seed)
    untrained_bundle = build_bundle(
        build_embedder(recipe.embedder).eval(),
        split,
        recipe,
        args.out / "untrained_bundle",
        model_name="patch-untrained",
    )
    untrained = evaluate_bundle(untrained_bundle, split.test)
    trained_eval: Evaluation | None = None

    if "product" in experiments:
        frozen_bundle = build_bundle(
            FrozenGlobalEmbedder(), split, recipe, args.out / "frozen_bundle", model_name="frozen-lite0"
        )
        frozen = evaluate_bundle(frozen_bundle, split.test)
        trained_bundle, trained_eval, train_s = train_and_evaluate(split, recipe, args.out, "trained")
        fm, um, tm = frozen.metrics(), untrained.metrics(), trained_eval.metrics()
        untrained_views, trained_views = (
            score_views(untrained_bundle, split.test),
            score_views(trained_bundle, split.test),
        )
        print_table(
            f"image AUROC, product split: {len(trained_eval.scores)} test images ({int(sum(trained_eval.labels == 0))} good); "
            "'patch' / 'part': the worst-patch and whole-part scores alone, the unlabelled column the line's (fused) score",
            {
                "frozen global": {"overall": fm["image_auroc"], **frozen.per_type_auroc()},
                **view_columns("frozen patch", untrained_views),
                **view_columns("trained", trained_views),
            },
            {"overall": len(trained_eval.scores), **n_test},
        )
        pix = {
            "frozen patch": pixel_level(untrained_bundle, split.test),
            "trained": pixel_level(trained_bundle, split.test),
        }
        print(
            f"\npixel AUROC (test images with masks + test goods): frozen patch {pix['frozen patch']:.3f}, trained {pix['trained']:.3f}"
        )
        spec = load_bundle(trained_bundle).spec.threshold
        target = recipe.target_false_reject_rate
        print(
            f"\nthreshold ({spec.rule}, target FRR {target:.3f}): calibration FRR {spec.details.get('false_reject_rate', float('nan')):.3f}, "
            f"95% upper bound {spec.details.get('frr_upper_95', float('nan')):.3f}; realised on the later test goods {tm['false_reject_rate']:.3f} "
            f"({'within' if tm['false_reject_rate'] <= 1.5 * target else 'OVER'} 1.5x target); escape {tm['escape_rate']:.3f}"
        )
        print(
            "escape per type at that threshold:",
            json.dumps({k: round(v, 3) for k, v in escape_per_type(trained_eval).items()}),
        )
        print(
            f"scoring offset chosen on validation: frozen patch {offset_choice(untrained_bundle)}, trained {offset_choice(trained_bundle)}"
        )
        print(f"frozen global at its own threshold: FRR {fm['false_reject_rate']:.3f}, escape {fm['escape_rate']:.3f}")
        test_paths = [r.path for r in split.test]
        speed = {
            "frozen global": line_speed(frozen_bundle, test_paths),
            "trained": line_speed(trained_bundle, test_paths),
        }
        print(
            f"line model end to end: trained {speed['trained']:.1f} img/s, frozen global {speed['frozen global']:.1f} img/s "
            f"(ratio {speed['trained'] / speed['frozen global']:.2f}); training {train_s:.0f} s"
        )
        results["product_views"] = {
            "frozen_patch": view_columns("frozen patch", untrained_views),
            "trained": view_columns("trained", trained_views),
        }
        results["product"] = {
            "frozen_global": {**fm, "per_type": frozen.per_type_auroc()},
            "frozen_patch": {**um, "per_type": untrained.per_type_auroc()},
            "trained": {
                **tm,
                "per_type": trained_eval.per_type_auroc(),
                "escape_per_type": escape_per_type(trained_eval),
            },
            "pixel_auroc": pix,
            "threshold": {"rule": spec.rule, "value": spec.value, **spec.details},
            "images_per_s": speed,
            "train_seconds": train_s,
        }

    curve: dict[str, float] = {}
    if "good-only" in experiments:
        _, good_only, _ = train_and_evaluate(
            replace(split, train_defective=[], validation_defective=[]),
            replace(recipe, use_real_defects=False, train_without_defect_photos=True),
            args.out,
            "good_only",
        )
        curve["0"] = good_only.metrics()["image_auroc"]
        print_table(
            "good images only, product split: the product's default keeps the pretrained patch features (= frozen patch); "
            "trained = the head trained on synthetic defects",
            {
                "frozen patch (default)": {"overall": untrained.metrics()["image_auroc"], **untrained.per_type_auroc()},
                "trained on synthetic": {"overall": curve["0"], **good_only.per_type_auroc()},
            },
        )
        results["good_only"] = {**good_only.metrics(), "per_type": good_only.per_type_auroc()}
    if "few-shot" in experiments:
        for n in FEW_SHOT:
            _, ev, _ = train_and_evaluate(few_shot_split(split, n, recipe.seed), recipe, args.out, f"few_shot_{n}")
            curve[str(n)] = ev.metrics()["image_auroc"]
        if trained_eval is not None:
            curve[f"all ({len(split.train_defective)})"] = trained_eval.metrics()["image_auroc"]
        print(
            "\nfew-shot curve (image AUROC vs defect photos in training):",
            json.dumps({k: round(v, 3) for k, v in curve.items()}),
        )
        results["few_shot"] = curve
    if "loto" in experiments:
        loto: dict[str, dict[str, float]] = {"frozen patch": {}, "trained without it": {}}
        types = sorted({r.defect_type for r in all_records if not r.is_good})
        for t in [t for t in types if args.loto_types is None or t in args.loto_types.split(",")]:
            held_split, held_test = without_type(split, all_records, t)
            # the frozen bundle too is calibrated (threshold, scoring offset) without the held-out type
            frozen_held = build_bundle(
                build_embedder(recipe.embedder).eval(),
                held_split,
                recipe,
                args.out / f"loto_{t}_frozen_bundle",
                model_name="patch-untrained",
            )
            for name, view in score_views(frozen_held, held_test).items():
                loto.setdefault("frozen patch" + ("" if name == "fused" else f": {name}"), {})[t] = view.metrics()[
                    "image_auroc"
                ]
            if args.loto_frozen_only:
                print(
                    f"\nleave out {t}: " + ", ".join(f"{k} {v[t]:.3f}" for k, v in loto.items() if t in v), flush=True
                )
                continue
            bundle, ev, _ = train_and_evaluate(held_split, recipe, args.out, f"loto_{t}", test=held_test)
            loto["trained without it"][t] = ev.metrics()["image_auroc"]
            print(
                f"\nleave out {t}: frozen patch {loto['frozen patch'][t]:.3f} (offset {offset_choice(frozen_held)}), "
                f"trained without it {loto['trained without it'][t]:.3f} (offset {offset_choice(bundle)})",
                flush=True,
            )
        loto = {k: v for k, v in loto.items() if v}
        for row in loto.values():
            row["mean"] = float(np.mean(list(row.values())))
        print_table(
            "leave one type out: test = test goods + every image of the held-out type",
            loto,
            {t: sum(r.defect_type == t for r in all_records) for t in loto["frozen patch"]},
        )
        results["loto"] = loto
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nresults: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
