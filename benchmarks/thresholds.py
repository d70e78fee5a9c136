"""Do thresholds hold on later parts? The false-reject rate the line realises on goods it never saw, against the
target, for each way of calibrating, on real images and with the goods sub-sampled as a small plant would have them.

Each draw holds out a random fifth of the goods' capture groups as the later goods (``--later latest``: the last
fifth in capture order, the same in every draw), and a share of the defects' groups as validation defects (the
rest are test defects). From the other goods, ``--goods`` photos are drawn by whole groups (``all``: every one),
and each calibration is built from them by the product's own code (``pipelines.bundle_building.scored_evidence``
and ``inspector.calibration.calibrate``):

  slice     the bank from 80 % of the goods, the threshold on the other 20 % (the held-out slice);
  crossfit  the bank from every good, the threshold on every good scored out of fold (``calibration_folds``);

each with the promises ``point`` (at most target x n calibration goods flagged), ``expected`` (a new good flagged
at most at the target on average) and ``bound`` (the 95 % bound within the target). Per draw, the realised
false-reject rate on the later goods, the recall on the test defects at that threshold, and the image AUROC of the
fused score (the views' mean, the default, and their larger, ``max``) beside each view alone (and which views
calibration chose).

The embedder is the default recipe's before training (the pretrained patch features the product ships without
defect photos), embedded once: calibration is what varies. ``--folds`` for trained models is the quality
benchmark's (``benchmarks.quality``), which reports the same realised rate per fold.

    .venv/bin/python -m benchmarks.thresholds ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 --goods 50,100,all --draws 10
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import write_json
from benchmarks.quality import product_split
from inspector.calibration import PROMISES, calibrate
from inspector.engine import Embedded, OnnxEmbedder
from inspector.metrics import roc_auc
from inspector.scorer import PART_VIEW, PATCH_VIEW
from models.export import export_onnx
from models.siamese import PatchEmbedder, build_embedder
from pipelines.bundle_building import CalibrationSet, scored_evidence, view_scores
from pipelines.data.manifest import Manifest
from pipelines.data.split import DataSplit, natural_order
from pipelines.golden import golden_bank
from pipelines.recipe import Recipe
from pipelines.settings import apply_overrides, load_overrides

METHODS = {"slice": 0, "crossfit": 5}  # calibration_folds of each
SINGLE_VIEWS = (PATCH_VIEW, PART_VIEW)


@dataclass(frozen=True)
class Images:
    """Embedded images with their capture groups (rows in order)."""

    emb: Embedded
    groups: np.ndarray
    types: np.ndarray

    def take(self, rows: np.ndarray) -> Images:
        e = self.emb
        picked = Embedded(
            e.embeddings[rows],
            None if e.valid is None else e.valid[rows],
            None if e.descriptors is None else e.descriptors[rows],
            [None] * len(rows),
        )
        return Images(picked, self.groups[rows], self.types[rows])

    def __len__(self) -> int:
        return len(self.groups)


def embedded(onnx: OnnxEmbedder, paths: Sequence[Path], groups: Sequence[str], types: Sequence[str]) -> Images:
    """The readable images embedded once, in batches (unreadable ones left out, as the line would)."""
    rows: list[Embedded] = []
    keep: list[int] = []
    for start in range(0, len(paths), 64):
        batch = onnx.embed(list(paths[start : start + 64]))
        rows.append(batch)
        keep += [start + i for i, e in enumerate(batch.errors) if e is None]
    cat = Embedded(
        np.concatenate([r.embeddings for r in rows]),
        None if rows[0].valid is None else np.concatenate([r.valid for r in rows if r.valid is not None]),
        None
        if rows[0].descriptors is None
        else np.concatenate([r.descriptors for r in rows if r.descriptors is not None]),
        [None] * len(keep),
    )
    return Images(cat, np.asarray(groups, dtype=object)[keep], np.asarray(types, dtype=object)[keep])


def first_groups(groups: np.ndarray, order: Sequence[str], share: float) -> np.ndarray:
    """Rows of whole groups taken in ``order`` until they hold ``share`` of the rows (at least one group, never
    all of them)."""
    chosen: list[str] = []
    for g in list(order)[: max(1, len(order) - 1)]:  # one group always stays on the other side
        if chosen and np.isin(groups, chosen).sum() >= share * len(groups):
            break
        chosen.append(g)
    return np.isin(groups, chosen)


def groups_share(groups: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Rows of whole groups, drawn in random order, holding ``share`` of the rows."""
    order = sorted(set(groups.tolist()))
    rng.shuffle(order)
    return first_groups(groups, order, share)


def latest_share(groups: np.ndarray, share: float) -> np.ndarray:
    """Rows of the last groups in capture order (natural name order) holding ``share`` of the rows."""
    return first_groups(groups, sorted(set(groups.tolist()), key=natural_order, reverse=True), share)


def sub_sample(goods: Images, n: int | None, rng: np.random.Generator) -> Images:
    """``n`` goods from whole groups drawn in random order until they hold ``n`` photos from two groups or more
    (calibration by group needs two), each group cut in proportion to fit; or all of them."""
    if n is None or n >= len(goods):
        return goods
    order = sorted(set(goods.groups.tolist()))
    rng.shuffle(order)
    members: list[np.ndarray] = []
    for g in order:
        members.append(np.flatnonzero(goods.groups == g))
        if sum(len(m) for m in members) >= n and len(members) >= 2:
            break
    total = sum(len(m) for m in members)
    keep = [m[: max(1, round(n * len(m) / total))] for m in members]
    rows = np.sort(np.concatenate(keep))
    return goods.take(rows[:n] if len(rows) > n else rows)


def calibration_data(
    pool: Images, defects: Images, folds: int, recipe: Recipe, rng: np.random.Generator
) -> CalibrationSet:
    """What each method calibrates on: every pool good golden (cross-fitted), or a fifth of the groups held out."""
    if folds >= 2:
        return CalibrationSet(pool.emb, pool.groups.tolist(), defects.emb, defects.groups.tolist())
    held = groups_share(pool.groups, recipe.calibration_fraction, rng)
    golden, cal = pool.take(np.flatnonzero(~held)), pool.take(np.flatnonzero(held))
    return CalibrationSet(
        golden.emb, golden.groups.tolist(), defects.emb, defects.groups.tolist(), cal.emb, cal.groups.tolist()
    )


def one_draw(
    pool: Images,
    validation: Images,
    later: Images,
    test_defects: Images,
    recipe: Recipe,
    blocks: tuple[int, ...],
    methods: dict[str, int] = METHODS,
) -> list[dict[str, Any]]:
    """Each method and promise calibrated on ``pool`` and scored on the later goods and the test defects."""
    rows = []
    for method, folds in methods.items():
        r = replace(recipe, calibration_folds=folds)
        data = calibration_data(pool, validation, folds, r, np.random.default_rng([recipe.seed, 5]))
        references, sources = golden_bank(data.golden.embeddings, r, data.golden.valid)
        data = replace(data, bank_sources=sources)
        ev = scored_evidence(data, references, r.scoring, r, blocks)
        labels = np.r_[np.zeros(len(later)), np.ones(len(test_defects))]
        line, views_of = {}, {}
        for name, images in (("good", later), ("defect", test_defects)):
            e = images.emb
            raw = (ev.both_views or ev.scorer).raw(e.embeddings, e.valid, e.descriptors)  # one search for both
            line[name] = ev.scorer.fuse(raw)
            if ev.both_views is not None:
                views_of[name] = view_scores(ev.both_views, raw)
        aurocs = {"chosen": roc_auc(labels, np.r_[line["good"], line["defect"]])}
        for view in views_of.get("good", {}):
            aurocs[view] = roc_auc(labels, np.r_[views_of["good"][view], views_of["defect"][view]])
        views = (ev.choice.get("whole_part_score") or {}).get("views", "patch")
        for promise in PROMISES:
            t = calibrate(ev.good, ev.defects, r.calibration_rule, r.target_false_reject_rate, promise)
            rows.append(
                {
                    "method": method,
                    "promise": promise,
                    "calibration_goods": int(t.details["n_good"]),
                    "threshold": t.value,
                    "extrapolated": bool(t.details.get("extrapolated")),
                    "frr_upper_95": t.details["frr_upper_95"],
                    "realised_frr": float(np.mean(line["good"] > t.value)),
                    "recall": float(np.mean(line["defect"] > t.value)),
                    "views": views,
                    "offset": ev.scorer.scoring.offset,
                    "auroc": aurocs,
                }
            )
    return rows


def summarise(rows: list[dict[str, Any]], target: float) -> dict[str, dict[str, Any]]:
    """Per method and promise: the realised rate's median and range over draws, how many draws kept it within
    1.5 x the target, and the mean recall it cost."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by[f"{row['method']}+{row['promise']}"].append(row)
    out = {}
    for key, rs in by.items():
        frr = np.array([r["realised_frr"] for r in rs])
        out[key] = {
            "draws": len(rs),
            "realised_frr_median": float(np.median(frr)),
            "realised_frr_min": float(frr.min()),
            "realised_frr_max": float(frr.max()),
            "within_1_5x": int(np.sum(frr <= 1.5 * target)),
            "recall_mean": float(np.mean([r["recall"] for r in rs])),
            "calibration_goods": float(np.mean([r["calibration_goods"] for r in rs])),
            "extrapolated": int(sum(r["extrapolated"] for r in rs)),
        }
    return out


def view_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Image AUROC of the fused score (and the larger of the views) and each view alone, mean and range over draws;
    each fusion's worst shortfall against the best single view; which views cross-fitted calibration chose to score
    with (and the AUROC of its choice: ``chosen``)."""
    chosen = [r for r in rows if r["method"] == "crossfit" and r["promise"] == PROMISES[0]]
    views = sorted(set.intersection(*(set(r["auroc"]) for r in chosen)))
    out: dict[str, Any] = {
        v: {
            "mean": float(np.mean([r["auroc"][v] for r in chosen])),
            "min": float(np.min([r["auroc"][v] for r in chosen])),
            "max": float(np.max([r["auroc"][v] for r in chosen])),
        }
        for v in views
    }
    singles = [v for v in views if v in SINGLE_VIEWS]
    if singles:
        for score in (v for v in ("fused", "max", "chosen") if v in views):
            gaps = [max(r["auroc"][v] for v in singles) - r["auroc"][score] for r in chosen]
            out[f"{score}_below_best_view_max"] = float(max(gaps))
    out["views_chosen"] = {v: sum(r["views"] == v for r in chosen) for v in sorted({r["views"] for r in chosen})}
    return out


def print_summary(size: str, table: dict[str, dict[str, Any]], views: dict[str, Any], target: float) -> None:
    print(f"\ngoods: {size}   (target false-reject rate {target:.1%}; later goods never calibrated on)")
    print(
        f"{'calibration':<20}{'goods':>7}{'realised FRR median [min, max]':>34}{'<=1.5x':>8}{'recall':>8}{'extrap.':>8}"
    )
    for key, s in table.items():
        frr = f"{s['realised_frr_median']:.2%} [{s['realised_frr_min']:.2%}, {s['realised_frr_max']:.2%}]"
        print(
            f"{key:<20}{s['calibration_goods']:>7.0f}{frr:>34}{s['within_1_5x']:>5}/{s['draws']:<2}"
            f"{s['recall_mean']:>8.3f}{s['extrapolated']:>8}"
        )
    cells = ", ".join(
        f"{v} {f['mean']:.3f} [{f['min']:.3f}, {f['max']:.3f}]"
        for v, f in views.items()
        if isinstance(f, dict) and "mean" in f
    )
    gaps = {s: views.get(f"{s}_below_best_view_max") for s in ("fused", "max", "chosen")}
    chosen = ", ".join(f"{v} {n}" for v, n in views["views_chosen"].items())
    print(f"image AUROC (cross-fitted choices): {cells}; the views calibration chose: {chosen}")
    if gaps["fused"] is not None:
        print(
            f"below the best single view, at most: the fused score by {gaps['fused']:.3f} (the larger of the views "
            f"by {gaps['max'] or 0:.3f}), the chosen views' score by {gaps['chosen']:.3f}"
        )


def frozen_embedded(
    manifest: Manifest, split: DataSplit, recipe: Recipe, work: Path
) -> tuple[Images, Images, PatchEmbedder]:
    """Every good and defect of the product embedded once by the recipe's embedder before training (exported to
    ONNX and run through the line's :class:`OnnxEmbedder`), with their capture groups, and the embedder."""
    torch.manual_seed(recipe.seed)
    embedder = build_embedder(recipe.embedder).eval()
    if not isinstance(embedder, PatchEmbedder):
        raise SystemExit("this benchmark needs a patch embedder (embedder.mode=patch)")
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f".frozen-{time.time_ns()}.model.onnx"
    export_onnx(embedder, onnx_path, height=recipe.preprocess.height, width=recipe.preprocess.width)
    try:
        goods, defects = embed_product(OnnxEmbedder(onnx_path, recipe.preprocess), manifest, split)
    finally:
        onnx_path.unlink(missing_ok=True)
    return goods, defects, embedder


def embed_product(onnx: OnnxEmbedder, manifest: Manifest, split: DataSplit) -> tuple[Images, Images]:
    """Every good and every defect of the product embedded by ``onnx``, with their capture groups."""
    records = manifest.records()
    t0 = time.perf_counter()
    goods_r = [r for r in records if r.is_good]
    bad_r = [r for r in records if not r.is_good]
    goods = embedded(
        onnx, [r.path for r in goods_r], split.group_ids([r.path for r in goods_r]), ["good"] * len(goods_r)
    )
    defects = embedded(
        onnx, [r.path for r in bad_r], split.group_ids([r.path for r in bad_r]), [r.defect_type for r in bad_r]
    )
    pre = onnx.preprocessing
    print(
        f"{len(goods)} goods, {len(defects)} defects embedded at {pre.height}x{pre.width} in "
        f"{time.perf_counter() - t0:.0f} s; {len(set(goods.groups.tolist()))} good groups",
        flush=True,
    )
    return goods, defects


def later_goods_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of benchmarks that hold later goods out of a product's split: which goods, the capture groups, the
    seed and recipe settings."""
    p.add_argument("--later", choices=["random", "latest"], default="random", help="which goods are the later ones")
    p.add_argument("--group-pattern", default=None, help="regex with one numeric capture group in file names")
    p.add_argument("--group-gap", type=int, default=0)
    p.add_argument("--group-by-folder", action="store_true", help="each folder is one capture group")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="recipe setting")


def dataset_of(args: argparse.Namespace, root: Path | None = None) -> tuple[Manifest, DataSplit, Recipe]:
    """The manifest, the product's split and the recipe (input size chosen from the goods) that the parsed
    :func:`later_goods_arguments` name, of ``root`` (else ``args.root``)."""
    recipe = apply_overrides(Recipe(seed=args.seed), load_overrides(None, args.overrides, {}))
    return product_split(
        root or args.root, recipe, args.group_pattern, args.group_gap, args.group_by_folder, None, resolve_size=True
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--goods", default="50,100,all", help="goods per draw, comma-separated ('all': every one)")
    p.add_argument("--draws", type=int, default=10)
    later_goods_arguments(p)
    args = p.parse_args(argv)
    manifest, split, recipe = dataset_of(args)
    goods, defects, embedder = frozen_embedded(manifest, split, recipe, args.out.parent if args.out else Path("runs"))
    share = recipe.defect_val_fraction / (recipe.defect_train_fraction + recipe.defect_val_fraction)
    sizes = [s.strip() for s in args.goods.split(",") if s.strip()]
    results: dict[str, Any] = {"recipe": recipe.to_dict(), "goods": len(goods), "defects": len(defects), "sizes": {}}
    for size in sizes:
        n = None if size == "all" else int(size)
        rows = []
        for draw in range(args.draws):
            rng = np.random.default_rng([args.seed, draw])
            later_rows = (
                latest_share(goods.groups, 0.2) if args.later == "latest" else groups_share(goods.groups, 0.2, rng)
            )
            val_rows = groups_share(defects.groups, share, rng)
            pool = sub_sample(goods.take(np.flatnonzero(~later_rows)), n, rng)
            for row in one_draw(
                pool,
                defects.take(np.flatnonzero(val_rows)),
                goods.take(np.flatnonzero(later_rows)),
                defects.take(np.flatnonzero(~val_rows)),
                recipe,
                tuple(embedder.descriptor_blocks),
            ):
                rows.append({**row, "draw": draw})
            print(f"  goods {size}: draw {draw + 1} of {args.draws} done", flush=True)
        table, views = summarise(rows, recipe.target_false_reject_rate), view_summary(rows)
        print_summary(size, table, views, recipe.target_false_reject_rate)
        results["sizes"][size] = {"table": table, "views": views, "rows": rows}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
