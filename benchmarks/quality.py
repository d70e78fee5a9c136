"""Detection quality on any dataset ``pipelines train --data`` reads (MVTec layout, VisA, images labelled by their
masks), measured through the product: the ingest manifest, the training flow's split, training
(``fit_embedder``), the bundle (ONNX export, golden bank, calibrated threshold) and the line's scoring
(``Inspector``), so the figures are what the line would give.

Experiments (``--experiments``, comma-separated):

  product    frozen global Lite0 (the training-free baseline; ``--no-baseline`` leaves it out), frozen patch (the
             default embedder before training) and trained (the default recipe), each bundle's patch and
             whole-part views alone beside its fused score; pixel AUROC of the heatmaps against the masks; each
             threshold's calibration against what the test goods realise; the line model's images/s;
  good-only  no defect photos: the product's default (pretrained patch features kept) and a head trained
             against synthetic defects only;
  few-shot   trained with 5, 10 and 25 defect photos drawn by seed (``--few-shot``);
  loto       leave one type out: trained without type T, tested on every image of T; frozen patch beside it.

Every AUROC and escape rate is printed with a 95 % bootstrap interval over capture groups (``--resamples``
resamples, seeded by ``--seed``): photos of one part are one piece of evidence. Each table ends with the operating
points a quality engineer chooses from: the escape rate at false-reject rates of 0.5, 1, 2 and 5 % of the test
goods.

``--folds K`` cross-validates the product experiment by capture group: the defects' groups are dealt into K folds
(each defect type spread evenly over them), and each fold's defects are tested by models trained and calibrated on
the other folds' defects, so every defect image is scored once by a model that never saw its group. Figures are
computed within each fold (each model on its own scale) and pooled with the folds' defects as weights. It costs K
trainings. good-only and loto test defects no model trained on anyway; with ``--folds`` good-only tests every
defect image.

``--int8`` also builds each trained bundle's INT8 candidate as the training flow does (``pipelines.line_model``:
quantised on up to 64 golden goods, its own bank, views and threshold) and scores the same test images through it:
verdict flips, AUROC, escape rates and images/s beside FP32.

    .venv/bin/python -m benchmarks.quality ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 --folds 5 --experiments product,good-only,loto

``--group-pattern``/``--group-gap`` group images whose numeric ids lie within the gap (one physical part
photographed in consecutive frames), so no part straddles train and test; ``--group-by-folder`` makes each folder
one group, as in ``pipelines train``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch

from benchmarks.common import write_json
from inspector.bundle import load_bundle
from inspector.engine import Inspector
from inspector.metrics import FALSE_REJECT_RATES, fold_weighted, grouped_bootstrap, operating_point, roc_auc
from inspector.preprocess import PreprocessConfig
from models.siamese import FrozenGlobalEmbedder, build_embedder
from pipelines.bundle_building import build_bundle
from pipelines.cli import add_allow_download
from pipelines.data.layouts import scan_root
from pipelines.data.manifest import Manifest, build_manifest
from pipelines.data.records import ImageRecord, capture_groups
from pipelines.data.split import DataSplit, SplitFractions, assign_splits, grouped_folds, hash_fraction
from pipelines.embedder_training import fit_embedder
from pipelines.evaluation import calibration_shortfall, evaluate_bundle, pixel_level_auroc
from pipelines.line_model import both_scored, int8_candidate
from pipelines.recipe import Recipe, resolve_bit_depth, resolve_input_size
from pipelines.settings import apply_overrides, load_overrides

Figure = dict[str, float]  # {"value", "low", "high"}


@dataclass(frozen=True)
class TestScores:
    """One model's test images as the figures and their intervals need them; each row is one image scored by one
    fold's model (a test good appears once per fold, a defect once)."""

    paths: np.ndarray
    labels: np.ndarray  # 0 good, 1 defective
    margins: np.ndarray  # the line's score minus that model's threshold: flagged above 0
    types: np.ndarray
    groups: np.ndarray  # the capture group the split kept together
    folds: np.ndarray
    views: dict[str, np.ndarray]  # each view alone, in the threshold's units (bundles with a whole-part view)

    @classmethod
    def of(cls, bundle: Path, split: DataSplit, fold: int = 0) -> TestScores:
        """The split's test images scored through the bundle as the line scores them (unreadable ones left out).
        A patch bundle that does not fuse a whole-part view (its calibration dropped it) has its score as its
        patch view, so the folds' patch views still pool."""
        ev = evaluate_bundle(bundle, split.test)
        views = {name: np.asarray(v, dtype=np.float64) for name, v in ev.views.items()}
        if not views and load_bundle(bundle).spec.model.get("mode") == "patch":
            views = {"patch": np.asarray(ev.scores, dtype=np.float64)}
        return cls(
            paths=np.asarray(ev.paths, dtype=object),
            labels=ev.labels.astype(np.int64),
            margins=ev.scores - ev.threshold,
            types=np.asarray(ev.defect_types, dtype=object),
            groups=np.asarray(split.group_ids([Path(p) for p in ev.paths]), dtype=object),
            folds=np.full(len(ev.scores), fold),
            views=views,
        )

    @classmethod
    def joined(cls, parts: Sequence[TestScores]) -> TestScores:
        """The folds' scores as one set (views kept where every fold has them)."""
        views = set.intersection(*(set(p.views) for p in parts)) if parts else set()
        return cls(
            paths=np.concatenate([p.paths for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            margins=np.concatenate([p.margins for p in parts]),
            types=np.concatenate([p.types for p in parts]),
            groups=np.concatenate([p.groups for p in parts]),
            folds=np.concatenate([p.folds for p in parts]),
            views={v: np.concatenate([p.views[v] for p in parts]) for v in sorted(views)},
        )

    def take(self, rows: np.ndarray) -> TestScores:
        return TestScores(
            self.paths[rows],
            self.labels[rows],
            self.margins[rows],
            self.types[rows],
            self.groups[rows],
            self.folds[rows],
            {k: v[rows] for k, v in self.views.items()},
        )

    def only(self, defect_type: str) -> TestScores:
        """The goods and the defects of one type."""
        return self.take(np.flatnonzero((self.labels == 0) | (self.types == defect_type)))

    def defect_types(self) -> list[str]:
        return sorted(set(self.types[self.labels == 1].tolist()))


def auroc(view: str | None = None) -> Callable[[TestScores], float]:
    """Image AUROC of the line's score (or of one view alone), within each fold, pooled."""
    return lambda s: fold_weighted(roc_auc, s.labels, s.margins if view is None else s.views[view], s.folds)


def escape_rate(s: TestScores) -> float:
    """Share of the defects each model's threshold lets through."""
    bad = s.margins[s.labels == 1]
    return float(np.mean(bad <= 0)) if len(bad) else float("nan")


def false_reject_rate(s: TestScores) -> float:
    """Share of the goods each model's threshold rejects."""
    good = s.margins[s.labels == 0]
    return float(np.mean(good > 0)) if len(good) else float("nan")


def escape_at(rate: float) -> Callable[[TestScores], float]:
    """Escape rate at the threshold that rejects ``rate`` of each fold's test goods, pooled over the folds."""
    return lambda s: fold_weighted(lambda y, x: operating_point(y, x, rate).escape_rate, s.labels, s.margins, s.folds)


def type_mean(types: Sequence[str], view: str | None = None) -> Callable[[TestScores], float]:
    """The unweighted mean of the per-type AUROCs (each held-out type counts once, whatever its size)."""
    return lambda s: float(np.nanmean([auroc(view)(s.only(t)) for t in types]))


def estimate(statistic: Callable[[TestScores], float], scores: TestScores, args: argparse.Namespace) -> Figure:
    """The statistic and its bootstrap interval over capture groups (goods and defects resampled apart)."""
    interval = grouped_bootstrap(
        lambda rows: statistic(scores.take(rows)),
        scores.groups,
        strata=scores.labels,
        resamples=args.resamples,
        seed=args.seed,
    )
    return {"value": statistic(scores), "low": interval.low, "high": interval.high}


def cell(figure: Figure | None) -> str:
    if figure is None:
        return ""
    return f"{figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"


def print_table(title: str, table: dict[str, dict[str, Figure]], counts: dict[str, int] | None = None) -> None:
    rows = list(dict.fromkeys(r for column in table.values() for r in column))
    width = max([24, *(len(c) + 2 for c in table)])
    label = max([16, *(len(r) + 2 for r in rows)])
    print(f"\n{title}\n{'':<{label}}" + "".join(f"{c:>{width}}" for c in table) + ("       n" if counts else ""))
    for r in rows:
        n = f"{counts[r]:>8}" if counts and r in counts else ""
        print(f"{r:<{label}}" + "".join(f"{cell(col.get(r)):>{width}}" for col in table.values()) + n)


def report(
    title: str, columns: dict[str, TestScores], args: argparse.Namespace, *, views: bool = True, means: bool = False
) -> dict[str, Any]:
    """Print and return the AUROC table (overall, per type; with ``views`` each view alone beside the fused score;
    with ``means`` the unweighted mean over types) and the escape table (at each model's threshold, per type, and
    at each operating point), every figure with its interval."""
    types = sorted({t for s in columns.values() for t in s.defect_types()})
    aurocs: dict[str, dict[str, Figure]] = {}
    for name, s in columns.items():
        for view in [*(sorted(s.views) if views else []), None]:
            rows = {"overall": estimate(auroc(view), s, args)}
            rows.update({t: estimate(auroc(view), s.only(t), args) for t in types if t in s.defect_types()})
            if means:
                rows["mean of types"] = estimate(type_mean(s.defect_types(), view), s, args)
            aurocs[name if view is None else f"{name}: {view}"] = rows
    first = next(iter(columns.values()))
    counts = {"overall": int(len(set(first.paths[first.labels == 1].tolist())))}
    counts.update({t: int(len(set(first.paths[first.types == t].tolist()))) for t in types})
    goods_per_fold = int(np.sum((first.labels == 0) & (first.folds == first.folds[0])))
    print_table(f"image AUROC, {title} (n: defect images; {goods_per_fold} test goods)", aurocs, counts)
    escapes: dict[str, dict[str, Figure]] = {}
    for name, s in columns.items():
        rows = {"false-reject rate": estimate(false_reject_rate, s, args), "escape": estimate(escape_rate, s, args)}
        rows.update({f"  {t}": estimate(escape_rate, s.only(t), args) for t in s.defect_types()})
        for rate in FALSE_REJECT_RATES:
            rows[f"escape at FRR {rate * 100:g} %"] = estimate(escape_at(rate), s, args)
        escapes[name] = rows
    unresolved = [f"{r * 100:g} %" for r in FALSE_REJECT_RATES if int(r * goods_per_fold + 1e-9) < 1]
    print_table(
        f"escape rates at each model's threshold and at the operating points set on the {goods_per_fold} test goods"
        + (f" ({', '.join(unresolved)}: too few goods, the threshold is the worst good)" if unresolved else ""),
        escapes,
    )
    return {"auroc": aurocs, "escape": escapes, "counts": counts, "test_goods": goods_per_fold}


# ----------------------------------------------------------------------------------------------- the product's splits


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
    and bit depth resolved from the data as the flow resolves them."""
    records = scan_root(root)
    groups = capture_groups(records, group_pattern, group_gap, by_folder=by_folder)
    manifest = build_manifest(records, group_of=groups)
    if resolve_size:
        recipe = resolve_input_size(recipe, [(e.width, e.height) for e in manifest.entries if e.is_good])
    recipe = resolve_bit_depth(recipe, [e.bits for e in manifest.entries])
    fractions = SplitFractions.from_recipe(recipe)
    split = assign_splits(manifest, fractions if split_seed is None else replace(fractions, seed=split_seed))
    return manifest, split, recipe


def validation_groups(groups: Sequence[str], share: float, salt: str) -> set[str]:
    """The groups that validate: in the order of their hash, each that still fits in ``share`` of the images (the
    first always, when there are two groups or more), so a few large groups never leave a fold without
    validation defects and the proportion holds."""
    sizes = Counter(groups)
    target = share * len(groups)
    chosen: set[str] = set()
    held = 0
    for g in sorted(sizes, key=lambda g: hash_fraction(g, salt))[: len(sizes) - 1]:  # one group stays to train
        if held + sizes[g] <= target or not chosen:
            chosen.add(g)
            held += sizes[g]
    return chosen


def fold_splits(split: DataSplit, defects: list[ImageRecord], k: int, recipe: Recipe) -> list[DataSplit]:
    """K splits of the same goods (golden, calibration and test goods as in ``split``): fold f tests the defects of
    fold f, and trains and validates on the others' (by group, validation in the recipe's proportion)."""
    groups = split.group_ids([d.path for d in defects])
    fold = grouped_folds(groups, [d.defect_type for d in defects], k, recipe.seed)
    share = recipe.defect_val_fraction / (recipe.defect_train_fraction + recipe.defect_val_fraction)
    goods = [r for r in split.test if r.is_good]
    out = []
    for f in range(k):
        rest = [(d, g) for d, g, j in zip(defects, groups, fold) if j != f] if recipe.use_real_defects else []
        validating = validation_groups([g for _, g in rest], share, f"seed{recipe.seed}:fold{f}")
        out.append(
            replace(
                split,
                train_defective=[d for d, g in rest if g not in validating],
                validation_defective=[d.path for d, g in rest if g in validating],
                test=goods + [d for d, j in zip(defects, fold) if j == f],
            )
        )
    return out


def few_shot_split(split: DataSplit, n: int, seed: int) -> DataSplit:
    """Keep ``n`` training defect photos, drawn at random (seeded); validation and test unchanged."""
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(split.train_defective), min(n, len(split.train_defective)), replace=False))
    return replace(split, train_defective=[split.train_defective[i] for i in keep])


def without_type(split: DataSplit, defects: list[ImageRecord], held_out: str) -> DataSplit:
    """``split`` with type ``held_out`` taken out of training and validation; its test: the test goods and every
    image of that type."""
    type_of = {str(r.path): r.defect_type for r in defects}
    return replace(
        split,
        train_defective=[r for r in split.train_defective if r.defect_type != held_out],
        validation_defective=[p for p in split.validation_defective if type_of.get(str(p)) != held_out],
        test=[r for r in split.test if r.is_good] + [r for r in defects if r.defect_type == held_out],
    )


# ----------------------------------------------------------------------------------------------- the models


@dataclass
class Context:
    """What every experiment shares: the options, the product split, the recipe, where bundles go."""

    args: argparse.Namespace
    split: DataSplit
    defects: list[ImageRecord]
    recipe: Recipe
    out: Path
    product_scores: dict[str, TestScores]  # the product experiment's columns, for the few-shot curve's ends


def frozen_patch_bundle(split: DataSplit, recipe: Recipe, out: Path) -> Path:
    """The default embedder before training, bundled as the product bundles it (what it ships without defect
    photos)."""
    torch.manual_seed(recipe.seed)
    return build_bundle(build_embedder(recipe.embedder).eval(), split, recipe, out, model_name="patch-untrained")


def trained_bundle(split: DataSplit, recipe: Recipe, out: Path, same_as: Path | None = None) -> tuple[Path, float]:
    """Train with the recipe and bundle the result; the seconds training took. ``same_as``: the frozen bundle of the
    same split and recipe, returned as it is when the starting weights were kept or no epoch ran (it is this
    bundle)."""
    t0 = time.perf_counter()
    embedder, history = fit_embedder(split, recipe, checkpoint_dir=out.with_name(f"{out.name}_checkpoints"))
    seconds = time.perf_counter() - t0
    if same_as is not None and (history.skipped or history.best_epoch == -1 or not history.epochs):
        return same_as, seconds
    return build_bundle(embedder, split, recipe, out, model_name=out.name), seconds


def line_speed(bundle: Path, paths: list[Path]) -> float:
    """End-to-end images/s of the bundle through ``Inspector.score_paths`` (decode, preprocess, ORT, scoring)."""
    inspector = Inspector.from_bundle(bundle)
    list(inspector.score_paths(paths[:32]))  # warm-up
    t0 = time.perf_counter()
    list(inspector.score_paths(paths))
    return len(paths) / (time.perf_counter() - t0)


def calibration_of(bundle: Path, test: TestScores) -> dict[str, Any]:
    """The threshold's rule and what calibration promised, beside the false-reject rate the test goods realise."""
    spec = load_bundle(bundle).spec
    details = spec.threshold.details
    offset_tried = details.get("offset_auroc") or {}
    return {
        "rule": spec.threshold.rule,
        "threshold": spec.threshold.value,
        "target": details.get("target_false_reject_rate"),
        "calibration_frr": details.get("false_reject_rate"),
        "frr_upper_95": details.get("frr_upper_95"),
        "realised_frr": false_reject_rate(test),
        "shortfall": calibration_shortfall(bundle),
        "offset": spec.scoring.offset,
        "offset_validation_auroc": offset_tried,
        "whole_part_kept": (details.get("whole_part_score") or {}).get("kept"),
        "views": (details.get("whole_part_score") or {}).get("views"),
        "promise": details.get("promise"),
        "extrapolated": details.get("extrapolated"),
        "evidence": (details.get("evidence") or {}).get("calibration"),
    }


def _short(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_calibration(name: str, rows: list[dict[str, Any]]) -> None:
    for f, c in enumerate(rows):
        where = f"fold {f + 1}: " if len(rows) > 1 else ""
        tried = ", ".join(f"{k}: {_short(v)}" for k, v in c["offset_validation_auroc"].items())
        print(
            f"{name} threshold, {where}{c['rule']} (target FRR {_short(c['target'])}): calibration FRR "
            f"{_short(c['calibration_frr'])}, 95 % bound {_short(c['frr_upper_95'])}; realised on the test goods "
            f"{c['realised_frr']:.3f}; offset {c['offset']:g}"
            + (f" (validation AUROC {tried})" if tried else "")
            + (
                f"; scored by the {c['views']} view alone (validation preferred it)"
                if c["views"] in ("patch", "part")
                else "; the views fused by the larger (validation preferred it)"
                if c["views"] == "max"
                else ""
            )
            + (f"; {c['evidence']} calibration, promise {c['promise']}" if c["evidence"] else "")
            + ("; threshold extrapolated from the goods' tail" if c["extrapolated"] else "")
            + (f"; {c['shortfall']}" if c["shortfall"] else "")
        )


def int8_of(
    bundle: Path, split: DataSplit, recipe: Recipe, fp32: TestScores, fold: int, out: Path
) -> tuple[TestScores, dict[str, Any]]:
    """The training flow's INT8 candidate of the bundle (``pipelines.line_model``: quantised on the golden goods,
    its bank and threshold on its own scores), scored on the same test images; how many verdicts changed."""
    t0 = time.perf_counter()
    candidate = int8_candidate(bundle, split, recipe, out)
    seconds = time.perf_counter() - t0
    int8 = TestScores.of(candidate, split, fold)
    mine, rows = both_scored(fp32.paths.tolist(), int8.paths.tolist())
    flips = int(np.sum((fp32.margins[mine] > 0) != (int8.margins[rows] > 0)))
    report = load_bundle(candidate).spec.provenance["quantization"]
    info = {
        "bundle": str(candidate),
        "seconds": seconds,
        "verdict_flips": flips,
        "images": len(rows),
        "model_bytes": report["model_bytes"],
        "forward_images_per_second": report["forward_images_per_second"],
    }
    print(
        f"INT8 (fold {fold + 1}): built in {seconds:.0f} s; verdict flips {flips} of {len(rows)} (each at its own "
        f"threshold); model {report['model_bytes']['fp32']} -> {report['model_bytes']['int8']} bytes"
    )
    return int8, info


# ----------------------------------------------------------------------------------------------- experiments


def product(ctx: Context) -> dict[str, Any]:
    """Frozen baselines against the trained product model, on the product split or cross-validated."""
    args, recipe = ctx.args, ctx.recipe
    folds = args.folds if args.folds > 1 else 1
    splits = [ctx.split] if folds == 1 else fold_splits(ctx.split, ctx.defects, folds, recipe)
    columns: dict[str, list[TestScores]] = defaultdict(list)
    pixel: dict[str, list[float]] = defaultdict(list)
    calibration: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seconds, int8_info, speed = [], [], {}
    for f, split in enumerate(splits):
        tag = f"fold{f + 1}_" if folds > 1 else ""
        print(f"\n{f'fold {f + 1} of {folds}: ' if folds > 1 else ''}split {json.dumps(split.summary())}", flush=True)
        bundles: dict[str, Path] = {}
        if args.baseline:
            global_model = FrozenGlobalEmbedder()
            bundles["frozen global"] = build_bundle(
                global_model,
                split,
                recipe,
                ctx.out / f"{tag}frozen_global_bundle",
                model_name="frozen-global",
            )
        bundles["frozen patch"] = frozen_patch_bundle(split, recipe, ctx.out / f"{tag}frozen_patch_bundle")
        bundles["trained"], s = trained_bundle(split, recipe, ctx.out / f"{tag}trained_bundle", bundles["frozen patch"])
        seconds.append(s)
        for name, bundle in bundles.items():
            columns[name].append(TestScores.of(bundle, split, f))
            calibration[name].append(calibration_of(bundle, columns[name][-1]))
            if name != "frozen global" and (value := pixel_level_auroc(bundle, split.test)) is not None:
                pixel[name].append(value)
        if args.int8:
            int8, info = int8_of(
                bundles["trained"], split, recipe, columns["trained"][-1], f, ctx.out / f"{tag}trained_int8"
            )
            columns["trained, INT8"].append(int8)
            int8_info.append(info)
            bundles["trained, INT8"] = Path(info["bundle"])
        if f == 0:
            paths = [r.path for r in split.test]
            speed = {name: line_speed(b, paths) for name, b in bundles.items() if name != "frozen patch"}
    joined = {name: TestScores.joined(parts) for name, parts in columns.items()}
    if folds == 1:
        ctx.product_scores.update(joined)
    scored = joined["trained"]
    title = (
        f"product split: {int(np.sum(scored.labels == 1))} test defects"
        if folds == 1
        else f"{folds}-fold cross-validation by capture group: {int(np.sum(scored.labels == 1))} defects, each scored "
        "once by a model that never saw its group"
    )
    figures = report(title + "; [95 % interval over capture groups]", joined, args)
    print()
    for name in ("frozen patch", "trained"):
        print_calibration(name, calibration[name])
    print(
        "pixel AUROC (test images with masks and test goods): "
        + ", ".join(
            f"{k} {np.mean(v):.3f}" + (f" (folds {', '.join(f'{x:.3f}' for x in v)})" if len(v) > 1 else "")
            for k, v in pixel.items()
        )
    )
    print(
        "line model end to end: "
        + ", ".join(f"{k} {v:.1f} img/s" for k, v in speed.items())
        + f"; training {sum(seconds):.0f} s"
        + (f" over {folds} folds" if folds > 1 else "")
    )
    figures.update(
        folds=folds,
        defects_scored=len(set(scored.paths[scored.labels == 1].tolist())),
        defect_rows=int(np.sum(scored.labels == 1)),
        pixel_auroc=dict(pixel),
        calibration=dict(calibration),
        images_per_second=speed,
        train_seconds=seconds,
        int8=int8_info,
    )
    return figures


def good_only(ctx: Context) -> dict[str, Any]:
    """No defect photos in training or validation: the default (pretrained features kept) and a head trained on
    synthetic defects only. With ``--folds`` every defect image is tested (none is trained on)."""
    split = replace(ctx.split, train_defective=[], validation_defective=[])
    if ctx.args.folds > 1:
        split = replace(split, test=[r for r in split.test if r.is_good] + ctx.defects)
    frozen = frozen_patch_bundle(split, ctx.recipe, ctx.out / "good_only_frozen_bundle")
    synthetic = replace(ctx.recipe, use_real_defects=False, train_without_defect_photos=True)
    trained, _ = trained_bundle(split, synthetic, ctx.out / "good_only_synthetic_bundle")
    columns = {
        "pretrained kept (default)": TestScores.of(frozen, split),
        "trained on synthetic": TestScores.of(trained, split),
    }
    if ctx.args.folds <= 1:
        ctx.product_scores["0 (good-only default)"] = columns["pretrained kept (default)"]
    return report("good images only (no defect photo trained on or validated with)", columns, ctx.args)


def few_shot(ctx: Context) -> dict[str, Any]:
    """The trained model against the number of defect photos it trained on; the ends from the other experiments
    when they ran on the same split."""
    columns: dict[str, TestScores] = {}
    if "0 (good-only default)" in ctx.product_scores:
        columns["0 (good-only default)"] = ctx.product_scores["0 (good-only default)"]
    for n in (int(v) for v in ctx.args.few_shot.split(",")):
        split = few_shot_split(ctx.split, n, ctx.recipe.seed)
        bundle, _ = trained_bundle(split, ctx.recipe, ctx.out / f"few_shot_{n}_bundle")
        columns[f"{n} photos"] = TestScores.of(bundle, split)
    if "trained" in ctx.product_scores:
        columns[f"all {len(ctx.split.train_defective)}"] = ctx.product_scores["trained"]
    return report("product split, against the defect photos trained on", columns, ctx.args, views=False)


def loto(ctx: Context) -> dict[str, Any]:
    """Leave one type out: trained without type T, tested on the test goods and every image of T."""
    args = ctx.args
    types = sorted({r.defect_type for r in ctx.defects})
    chosen = [t for t in types if args.loto_types is None or t in args.loto_types.split(",")]
    columns: dict[str, list[TestScores]] = defaultdict(list)
    for i, t in enumerate(chosen):  # each held-out type is a fold: its own models, its own scale
        split = without_type(ctx.split, ctx.defects, t)
        frozen = frozen_patch_bundle(split, ctx.recipe, ctx.out / f"loto_{t}_frozen_bundle")
        columns["frozen patch"].append(TestScores.of(frozen, split, i))
        line = f"leave out {t}: frozen patch {auroc()(columns['frozen patch'][-1]):.3f}"
        if not args.loto_frozen_only:
            bundle, _ = trained_bundle(split, ctx.recipe, ctx.out / f"loto_{t}_bundle", frozen)
            columns["trained without it"].append(TestScores.of(bundle, split, i))
            line += f", trained without it {auroc()(columns['trained without it'][-1]):.3f}"
        print(line, flush=True)
    joined = {name: TestScores.joined(parts) for name, parts in columns.items()}
    return report("leave one type out (test: the test goods and every image of the type)", joined, args, means=True)


EXPERIMENTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "product": product,
    "good-only": good_only,
    "few-shot": few_shot,
    "loto": loto,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/bench_quality"), help="bundles and results.json go here")
    p.add_argument("--experiments", default="product", help=f"comma-separated, of {', '.join(EXPERIMENTS)}")
    p.add_argument("--folds", type=int, default=1, help="K >= 2: cross-validate the product experiment by group")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of capture groups per interval")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also the flow's INT8 candidate of each trained bundle (pipelines.line_model), scored the same way",
    )
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True, help="frozen global Lite0")
    p.add_argument("--size", default=None, help="input HxW (default: chosen from the goods' aspect, as in training)")
    p.add_argument("--resize", default="letterbox", choices=["letterbox", "stretch"])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    p.add_argument("--epoch-size", type=int, default=None)
    p.add_argument("--group-pattern", default=None, help="regex with one numeric capture group in file names")
    p.add_argument("--group-gap", type=int, default=0)
    p.add_argument("--group-by-folder", action="store_true", help="each folder is one capture group")
    p.add_argument("--seed", type=int, default=0, help="training, bank draw, folds and bootstrap seed")
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="the split's own seed (default: --seed); fix it and vary --seed to see what the bank draw and training "
        "alone move on the same test images",
    )
    p.add_argument("--few-shot", default="5,10,25", help="defect photos trained on, comma-separated")
    p.add_argument("--loto-frozen-only", action="store_true", help="leave-one-type-out without training")
    p.add_argument("--loto-types", default=None, help="comma-separated types to hold out in turn (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="recipe setting")
    add_allow_download(p)
    args = p.parse_args(argv)
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    unknown = sorted(set(experiments) - set(EXPERIMENTS))
    if unknown:
        p.error(f"unknown experiment(s) {unknown}: choose from {list(EXPERIMENTS)}")

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
    print("ingest:", json.dumps(manifest.summary()), "\nsplit:", json.dumps(split.summary()))
    pre = recipe.preprocess
    print(f"input {pre.height}x{pre.width} {pre.resize}, {recipe.train.epochs} epochs x {recipe.epoch_size} images")
    args.out.mkdir(parents=True, exist_ok=True)
    defects = [r for r in manifest.records() if not r.is_good]
    ctx = Context(args, split, defects, recipe, args.out, {})
    results: dict[str, Any] = {"split": split.summary(), "recipe": recipe.to_dict(), "defect_images": len(defects)}
    for name in experiments:
        results[name] = EXPERIMENTS[name](ctx)
    write_json(args.out / "results.json", results)
    print(f"\nresults: {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
