"""A part type from k golden photos, with an embedder that never saw it: image AUROC and the false-reject rate the
few-shot threshold realises on later goods, for k = 1, 2, 4, 8, 16, over several seeded draws of the goldens.

Each part type (a dataset root) is embedded once by the default recipe's embedder before training (the frozen
ImageNet Lite0 patch features: it never saw the part), at the input size its goods' aspect calls for. Per draw, a
random fifth of the goods' capture groups are the later goods (``--later latest``: the last fifth in capture order);
k goldens are drawn from the other goods; the bank, the whole-part Gaussian (k >= 3), the scales and the threshold
come from the product's own code (:func:`inspector.new_part.few_shot_bank` and
:func:`inspector.new_part.leave_one_out_threshold`: the goldens' leave-one-out scores, the recipe's target and
promise); k = 1 has no threshold (``new-part`` refuses it without extra goods). The test set is ``--test-goods``
later goods and ``--test-defects`` defects (seeded, the same for every k of a draw), scored as the line scores them.

    nice -n 10 .venv/bin/python -m benchmarks.few_shot ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 --draws 3
    nice -n 10 .venv/bin/python -m benchmarks.few_shot --demo runs/few-shot-demo --draws 3
    nice -n 10 .venv/bin/python -m benchmarks.few_shot --demo runs/few-shot-ribbed --demo-size 96x192 --demo-ribs
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import write_json
from benchmarks.thresholds import (
    Images,
    dataset_of,
    embed_product,
    frozen_embedded,
    groups_share,
    later_goods_arguments,
    latest_share,
)
from inspector.bundle import load_bundle
from inspector.engine import OnnxEmbedder
from inspector.metrics import roc_auc
from inspector.new_part import few_shot_bank, input_size_choice, leave_one_out_threshold, model_input_size
from inspector.scorer import Scorer
from pipelines.data.manifest import Manifest
from pipelines.data.split import DataSplit
from pipelines.recipe import Recipe

SHOTS = (1, 2, 4, 8, 16)


def one_draw(
    goldens: Images, later: Images, defects: Images, recipe: Recipe, blocks: tuple[int, ...]
) -> dict[str, Any]:
    """The few-shot bundle's scorer from ``goldens`` (as ``new-part`` builds it) on the later goods and defects."""
    k = len(goldens)
    scoring = recipe.scoring
    dim = int(goldens.emb.embeddings.shape[-1])
    mode = "patch" if goldens.emb.embeddings.ndim == 3 else "image"
    ids = [str(i) for i in range(k)]
    bank, _, row_golden = few_shot_bank(goldens.emb, scoring, mode, dim, ids, [""] * k)
    row: dict[str, Any] = {"k": k}
    if k >= 2:
        part_blocks = blocks if k >= 3 and blocks and goldens.emb.descriptors is not None else None
        scorer, threshold = leave_one_out_threshold(
            goldens.emb,
            bank,
            row_golden,
            scoring,
            part_blocks,
            recipe.target_false_reject_rate,
            recipe.threshold_promise,
        )
        row["threshold"] = threshold.value
        row["frr_upper_95"] = threshold.details["frr_upper_95"]
    else:
        scorer = Scorer.of(bank, scoring)
    good = scorer.score(later.emb.embeddings, later.emb.valid, later.emb.descriptors if scorer.fuses else None)
    bad = scorer.score(defects.emb.embeddings, defects.emb.valid, defects.emb.descriptors if scorer.fuses else None)
    row["auroc"] = roc_auc(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])
    if "threshold" in row:
        row["realised_frr"] = float(np.mean(good > row["threshold"]))
        row["recall"] = float(np.mean(bad > row["threshold"]))
    return row


def bundle_embedded(
    manifest: Manifest, split: DataSplit, recipe: Recipe, bundle_path: Path
) -> tuple[Images, Images, tuple[int, ...], Recipe]:
    """Every good and defect embedded by a bundle's embedder at the input size ``new-part`` would use (the goods'
    aspect where the export is dynamic, else the bundle's, letterboxed), the bundle's whole-part descriptor blocks
    (none when it has no whole-part view), and the recipe with the bundle's scoring (the one ``new-part`` keeps)."""
    bundle = load_bundle(bundle_path)
    pre = bundle.spec.preprocessing
    onnx = OnnxEmbedder(bundle.model_path, pre)
    size = input_size_choice(
        bundle, model_input_size(onnx), [(e.width, e.height) for e in manifest.entries if e.is_good]
    )
    print(f"input {size['used'][0]}x{size['used'][1]}: {size['reason']}", flush=True)
    if size["used"] != [pre.height, pre.width]:  # a dynamic export: the size the goods' aspect calls for
        onnx = OnnxEmbedder(bundle.model_path, replace(pre, height=size["used"][0], width=size["used"][1]))
    goods, defects = embed_product(onnx, manifest, split)
    density = bundle.spec.density
    blocks = tuple(density.blocks) if density is not None else ()
    return goods, defects, blocks, replace(recipe, scoring=bundle.spec.scoring)


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max over the draws."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per k: AUROC, realised false-reject rate, recall and the bound each threshold states, over the draws."""
    out: dict[str, dict[str, Any]] = {}
    for k in sorted({r["k"] for r in rows}):
        mine = [r for r in rows if r["k"] == k]
        out[str(k)] = {"draws": len(mine), "auroc": spread([r["auroc"] for r in mine])}
        for key in ("realised_frr", "recall", "frr_upper_95"):
            if all(key in r for r in mine):
                out[str(k)][key] = spread([r[key] for r in mine])
    return out


def print_table(name: str, table: dict[str, dict[str, Any]]) -> None:
    print(f"\n{name}: k | AUROC mean [min, max] | realised FRR mean [min, max] | recall | stated FRR bound")
    for k, t in table.items():
        a = t["auroc"]
        line = f"  {k:>2} | {a['mean']:.3f} [{a['min']:.3f}, {a['max']:.3f}]"
        if "realised_frr" in t:
            f, r, b = t["realised_frr"], t["recall"], t["frr_upper_95"]
            line += f" | {f['mean']:.3f} [{f['min']:.3f}, {f['max']:.3f}] | {r['mean']:.3f} | {b['mean']:.2f}"
        else:
            line += " | no threshold (one golden is refused without extra goods)"
        print(line, flush=True)


def ribbed(root: Path, period: float = 6.0, depth: float = 0.2) -> None:
    """Every photo under ``root`` (not the masks) with a ribbed surface: the same kind of part in another texture,
    so a part type the embedder saw in no form."""
    for path in sorted(root.rglob("*.png")):
        if "ground_truth" in path.parts:
            continue
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        ribs = 1.0 + depth * np.sin(2 * np.pi * np.arange(pixels.shape[1]) / period)
        Image.fromarray(np.clip(pixels * ribs[None, :, None], 0, 255).astype(np.uint8)).save(path)


def subset(images: Images, n: int, rng: np.random.Generator) -> Images:
    """At most ``n`` of the images, drawn at random (sorted rows)."""
    if len(images) <= n:
        return images
    return images.take(np.sort(rng.choice(len(images), n, replace=False)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, nargs="?", help="a dataset root (MVTec layout); or --demo")
    p.add_argument("--demo", type=Path, default=None, help="generate the demo's flanges in this folder and use them")
    p.add_argument("--demo-size", default="96x96", help="the generated parts' HxW (another shape: e.g. 96x192)")
    p.add_argument("--demo-ribs", action="store_true", help="a ribbed surface on the generated parts (another texture)")
    p.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--shots", default=",".join(map(str, SHOTS)), help="golden counts, comma-separated")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument(
        "--embedder",
        type=Path,
        default=None,
        help="a bundle whose embedder to use (e.g. one trained on other part types) instead of the frozen trunk",
    )
    p.add_argument("--test-goods", type=int, default=60, help="later goods scored per draw (at most)")
    p.add_argument("--test-defects", type=int, default=60, help="defects scored per draw (at most)")
    later_goods_arguments(p)
    args = p.parse_args(argv)
    root = args.root
    if args.demo is not None:
        from models.demo_data import generate_demo_dataset

        root = args.demo / "data"
        if not root.exists():
            height, width = (int(v) for v in args.demo_size.lower().split("x"))
            generate_demo_dataset(
                root,
                seed=args.seed,
                n_train_good=400,
                n_test_good=100,
                n_test_per_defect=20,
                height=height,
                width=width,
            )
            if args.demo_ribs:
                ribbed(root)
    if root is None:
        raise SystemExit("give a dataset root or --demo FOLDER")
    manifest, split, recipe = dataset_of(args, root)
    if args.embedder is not None:
        goods, defects, blocks, recipe = bundle_embedded(manifest, split, recipe, args.embedder)
    else:
        goods, defects, frozen = frozen_embedded(manifest, split, recipe, args.out.parent if args.out else Path("runs"))
        blocks = tuple(frozen.descriptor_blocks)
    rows: list[dict[str, Any]] = []
    shots = [int(k) for k in args.shots.split(",") if k.strip()]
    for draw in range(args.draws):
        rng = np.random.default_rng([args.seed, draw])
        later_rows = latest_share(goods.groups, 0.2) if args.later == "latest" else groups_share(goods.groups, 0.2, rng)
        pool = goods.take(np.flatnonzero(~later_rows))
        later = subset(goods.take(np.flatnonzero(later_rows)), args.test_goods, rng)
        test_defects = subset(defects, args.test_defects, rng)
        order = rng.permutation(len(pool))  # the goldens of a smaller k are among those of a larger one
        for k in shots:
            t1 = time.perf_counter()
            row = one_draw(pool.take(np.sort(order[:k])), later, test_defects, recipe, blocks)
            rows.append({**row, "draw": draw, "seconds": time.perf_counter() - t1})
        print(f"  draw {draw + 1} of {args.draws} done", flush=True)
    table = summarise(rows)
    print_table(str(root), table)
    embedder = str(args.embedder) if args.embedder else f"frozen {recipe.embedder.backbone}"
    results = {"root": str(root), "embedder": embedder, "recipe": recipe.to_dict(), "table": table, "rows": rows}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
