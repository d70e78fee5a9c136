"""Fast experiments on the projection head: train it on cached frozen-trunk features, minutes instead of an hour.

Why: with the trunk frozen (the product default) the backbone's features of an un-augmented image never change,
so head designs (linear vs MLP, feature stages, margin, steps) can be compared on cached features with the
product's own patch contrastive loss, on the product split (``product``: test defects are other physical parts of
the trained types) and leave-one-type-out (``loto``: the held-out type is never trained on, every image of it is
tested). No augmentation here, so absolute numbers are a guide; the comparison between heads is the point.

    .venv/bin/python benchmarks/head_probe.py ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 --stages 3+4 --heads linear,mlp
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from feature_probe import per_type
from PIL import Image
from torch import nn

from inspector.metrics import roc_auc
from inspector.preprocess import PreprocessConfig, Preprocessor, load_image
from inspector.scoring import ScoringConfig, anomaly_scores
from models.losses import patch_contrastive_loss, patch_labels_from_masks
from models.siamese import EmbedderConfig, build_embedder, join_with_pretrained
from pipelines.datasets import ImageRecord, group_by_number_gaps, scan_mvtec
from pipelines.ingest import SplitFractions, assign_splits, build_manifest
from pipelines.recipe import Recipe


def cached_features(
    records: list[ImageRecord], pre: Preprocessor, stages: tuple[int, ...], batch: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused frozen features (N, C, h, w) and patch labels (N, h, w) of every record (goods: all 0)."""
    embedder = build_embedder(EmbedderConfig(feature_stages=stages)).eval()
    feats, labels = [], []
    with torch.inference_mode():
        for start in range(0, len(records), batch):
            chunk = records[start : start + batch]
            f = embedder.features(torch.from_numpy(pre.batch([load_image(r.path) for r in chunk])))
            masks = []
            for r in chunk:
                if r.is_good:
                    masks.append(np.zeros((pre.config.height, pre.config.width), np.int64))
                elif r.mask is not None:
                    masks.append(pre.resize_mask(Image.open(r.mask)).astype(np.int64))
                else:
                    masks.append(np.full((pre.config.height, pre.config.width), -1, np.int64))
            labels.append(patch_labels_from_masks(torch.from_numpy(np.stack(masks)), tuple(f.shape[-2:])))
            feats.append(f.clone())
    return torch.cat(feats), torch.cat(labels)


def make_head(kind: str, channels: int, dim: int = 128) -> nn.Module:
    if kind == "linear":
        head = nn.Conv2d(channels, dim, 1)
        nn.init.orthogonal_(head.weight)
        nn.init.zeros_(head.bias)
        return head
    if kind == "mlp":
        return nn.Sequential(nn.Conv2d(channels, 2 * dim, 1), nn.ReLU(inplace=True), nn.Conv2d(2 * dim, dim, 1))
    raise ValueError(kind)


class WithFrozen(nn.Module):
    """A head's embedding beside the frozen features (``EmbedderConfig.keep_pretrained``, on cached features)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return join_with_pretrained(self.head(x), x, LEARNED_WEIGHT)


def embed(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    return F.normalize(head(feats), dim=1).flatten(2).transpose(1, 2)


LEARNED_WEIGHT = 0.5  # --learned-weight: the head's share of the joined squared distance
SCORING = ScoringConfig()  # --offset sets the line's scoring offset for every score below


def score(
    head: nn.Module, bank_feats: torch.Tensor, test_feats: torch.Tensor, max_bank: int = 16384, seed: int = 0
) -> np.ndarray:
    """Worst-patch distance of each test image to the nearest bank patch: the line's exact scoring."""
    with torch.no_grad():
        bank = embed(head, bank_feats).flatten(0, 1)
        bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:max_bank]]
        queries = torch.cat([embed(head, test_feats[i : i + 32]) for i in range(0, len(test_feats), 32)])
    return anomaly_scores(queries.numpy(), bank.numpy(), SCORING)


def train_head(
    kind: str,
    good: torch.Tensor,
    bad: torch.Tensor,
    bad_labels: torch.Tensor,
    steps: list[int],
    margin: float,
    seed: int,
    batch: int = 8,
    lr: float = 1e-3,
) -> list[nn.Module]:
    """The head after each number of ``steps`` (one run, copies taken on the way)."""
    torch.manual_seed(seed)
    joined = kind.endswith("cat")  # the loss sees the joined embedding the line would score with
    head = make_head(kind.removesuffix("cat"), good.shape[1])
    head = WithFrozen(head) if joined else head
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    grid = good.shape[-2:]
    snapshots = []
    for step in range(1, max(steps) + 1):
        gi = rng.choice(len(good), batch, replace=False)
        bi = rng.choice(len(bad), batch, replace=len(bad) < batch)
        x = torch.cat([good[gi], bad[bi]])
        patch_labels = torch.cat([torch.zeros(batch, *grid, dtype=torch.long), bad_labels[bi]]).flatten(1)
        image_labels = torch.cat([torch.zeros(batch), torch.ones(batch)]).long()
        sources = torch.cat([torch.from_numpy(gi), -1 - torch.arange(batch)])
        loss = patch_contrastive_loss(embed(head, x), patch_labels, image_labels, sources, margin=margin, max_bank=2048)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in steps:
            snapshots.append(copy.deepcopy(head).eval())
    return snapshots


def fmt(res: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in res.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--size", default="320x256")
    p.add_argument("--stages", default="3+4")
    p.add_argument("--heads", default="linear,mlp")
    p.add_argument("--steps", default="100,300")
    p.add_argument("--margin", type=float, default=1.0)
    p.add_argument("--group-pattern", default=None)
    p.add_argument("--group-gap", type=int, default=0)
    p.add_argument("--experiments", default="product,loto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--offset",
        type=float,
        default=0.0,
        help="ScoringConfig.offset: minus this fraction of each part's median patch distance",
    )
    p.add_argument("--learned-weight", type=float, default=0.5, help="the head's share of the joined squared distance")
    args = p.parse_args()
    global SCORING, LEARNED_WEIGHT
    SCORING = ScoringConfig(offset=args.offset)
    LEARNED_WEIGHT = args.learned_weight
    torch.set_num_threads(os.cpu_count() or 2)
    h, w = (int(v) for v in args.size.lower().split("x"))
    stages = tuple(int(s) for s in args.stages.split("+"))
    pre = Preprocessor(PreprocessConfig(height=h, width=w))

    records = scan_mvtec(args.root)
    groups = (
        group_by_number_gaps([r.path for r in records], args.group_pattern, args.group_gap)
        if args.group_pattern
        else None
    )
    manifest = build_manifest(records, group_of=groups)
    split = assign_splits(manifest, SplitFractions.from_recipe(Recipe()))
    by_path = {str(r.path): r for r in manifest.records()}
    train_good = [by_path[str(q)] for q in split.train_good]
    all_bad = [r for r in manifest.records() if not r.is_good]
    test_good = [r for r in split.test if r.is_good]
    t0 = time.perf_counter()
    cache = Path("runs/head_probe_cache") / f"{h}x{w}_{args.stages}.pt"
    if cache.is_file():
        good_f, bad_f, bad_l, test_good_f = torch.load(cache)
    else:
        good_f, _ = cached_features(train_good, pre, stages)
        bad_f, bad_l = cached_features(all_bad, pre, stages)
        test_good_f, _ = cached_features(test_good, pre, stages)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((good_f, bad_f, bad_l, test_good_f), cache)
    print(
        f"{h}x{w} stages {stages}: {good_f.shape[1]} channels, grid {tuple(good_f.shape[-2:])}, features in {time.perf_counter() - t0:.0f} s"
    )
    bad_index = {str(r.path): i for i, r in enumerate(all_bad)}
    train_bad = torch.tensor([bad_index[str(r.path)] for r in split.train_defective])
    test_bad_recs = [r for r in split.test if not r.is_good]
    test_bad = torch.tensor([bad_index[str(r.path)] for r in test_bad_recs])
    product_test = torch.cat([test_good_f, bad_f[test_bad]])
    product_recs = test_good + test_bad_recs
    steps_list = [int(s) for s in args.steps.split(",")]
    kinds = [k.strip() for k in args.heads.split(",")]

    if "product" in args.experiments:
        print(
            f"product split: {len(train_good)} train goods, {len(train_bad)} train defects, test {len(test_good)} good + {len(test_bad)} defective"
        )
        print(
            f"  frozen (no head)            {fmt(per_type(score(nn.Identity(), good_f, product_test), product_recs))}"
        )
        for kind in kinds:
            t0 = time.perf_counter()
            heads = train_head(kind, good_f, bad_f[train_bad], bad_l[train_bad], steps_list, args.margin, args.seed)
            for steps, head in zip(steps_list, heads):
                print(
                    f"  {kind:<8} {steps:>5} steps       {fmt(per_type(score(head, good_f, product_test), product_recs))}  ({time.perf_counter() - t0:.0f} s)"
                )
                if not kind.endswith("cat"):
                    print(
                        f"  {kind + '+frozen':<14} {steps:>5}  {fmt(per_type(score(WithFrozen(head), good_f, product_test), product_recs))}"
                    )
    if "loto" in args.experiments:
        types = sorted({r.defect_type for r in all_bad})
        bad_types = np.array([r.defect_type for r in all_bad])
        for kind in ["frozen", *kinds]:
            runs = [0] if kind == "frozen" else steps_list
            cells = {(steps, suffix): {} for steps in runs for suffix in ("", "+frozen")}
            for t in types:
                train_idx = torch.tensor([i for i in train_bad.tolist() if bad_types[i] != t])
                held = torch.from_numpy(np.flatnonzero(bad_types == t))
                heads = (
                    [nn.Identity()]
                    if kind == "frozen"
                    else train_head(
                        kind, good_f, bad_f[train_idx], bad_l[train_idx], steps_list, args.margin, args.seed
                    )
                )
                for steps, head in zip(runs, heads):
                    y = np.r_[np.zeros(len(test_good)), np.ones(len(held))]
                    cells[steps, ""][t] = roc_auc(y, score(head, good_f, torch.cat([test_good_f, bad_f[held]])))
                    if kind != "frozen" and not kind.endswith("cat"):
                        cells[steps, "+frozen"][t] = roc_auc(
                            y, score(WithFrozen(head), good_f, torch.cat([test_good_f, bad_f[held]]))
                        )
            for (steps, suffix), row in cells.items():
                if row:
                    row["mean"] = float(np.mean(list(row.values())))
                    print(f"  loto {kind + suffix:<14} {steps:>5} steps  {fmt(row)}", flush=True)


if __name__ == "__main__":
    main()
