"""Detection quality on any MVTec-layout folder: frozen ImageNet Lite0 vs the Siamese-trained embedder, one run.

Three models, all scored exactly as on the line (ONNX bundle through ``inspector``) on the same split (good
training images are the golden references; test defects are never used in training, defects are split by group,
see ``--group-pattern``):
  frozen global  the training-free baseline of DESIGN.md: ImageNet Lite0, global average pool, nearest reference;
  frozen patch   the product's patch embedder before training (pretrained features, untrained projection);
  trained        the product's default: the patch embedder after Siamese contrastive training.
Prints image AUROC overall and per defect type side by side.

    .venv/bin/python benchmarks/quality.py ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000

``--group-pattern``/``--group-gap`` group images whose numeric ids are within the gap (the same physical part
photographed in consecutive frames), so that no part straddles train and test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from inspector.preprocess import PreprocessConfig  # noqa: E402
from models.siamese import EmbedderConfig, FrozenGlobalEmbedder, build_embedder  # noqa: E402
from models.training import TrainConfig  # noqa: E402
from pipelines.datasets import group_by_number_gaps, scan_mvtec  # noqa: E402
from pipelines.ingest import SplitFractions, assign_splits, build_manifest  # noqa: E402
from pipelines.recipe import Recipe, build_bundle, evaluate_bundle, fit_embedder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/bench_quality"))
    p.add_argument("--size", default="224x224", help="input HxW")
    p.add_argument("--resize", default="letterbox", choices=["letterbox", "stretch"])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--epoch-size", type=int, default=384)
    p.add_argument("--group-pattern", default=None, help="regex with one numeric capture group in file names")
    p.add_argument("--group-gap", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-defects", action="store_true", help="train on good images + synthetic defects only")
    args = p.parse_args()

    h, w = (int(v) for v in args.size.lower().split("x"))
    records = scan_mvtec(args.root)
    groups = group_by_number_gaps([r.path for r in records], args.group_pattern, args.group_gap) if args.group_pattern else None
    recipe = Recipe(
        preprocess=PreprocessConfig(height=h, width=w, resize=args.resize),
        embedder=EmbedderConfig(),
        train=TrainConfig(epochs=args.epochs, progress=True),
        epoch_size=args.epoch_size,
        use_real_defects=not args.no_defects,
        seed=args.seed,
    )
    manifest = build_manifest(records, group_of=groups)
    split = assign_splits(manifest, SplitFractions.from_recipe(recipe))
    print("ingest:", json.dumps(manifest.summary()), "\nsplit:", json.dumps(split.summary()))
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    frozen_bundle = build_bundle(FrozenGlobalEmbedder(), split, recipe, args.out / "frozen_bundle", model_name="frozen-lite0")
    frozen = evaluate_bundle(frozen_bundle, split.test)
    frozen_s = time.perf_counter() - t0
    torch.manual_seed(recipe.seed)
    untrained_bundle = build_bundle(build_embedder(recipe.embedder).eval(), split, recipe, args.out / "untrained_bundle", model_name="patch-untrained")
    untrained = evaluate_bundle(untrained_bundle, split.test)

    t0 = time.perf_counter()
    embedder, history = fit_embedder(split, recipe, checkpoint_dir=args.out / "checkpoints")
    train_s = time.perf_counter() - t0
    trained_bundle = build_bundle(embedder, split, recipe, args.out / "trained_bundle", model_name="siamese-lite0")
    trained = evaluate_bundle(trained_bundle, split.test)

    fm, um, tm = frozen.metrics(), untrained.metrics(), trained.metrics()
    ft, ut, tt = frozen.per_type_auroc(), untrained.per_type_auroc(), trained.per_type_auroc()
    n_test = {t: sum(1 for r in split.test if r.defect_type == t) for t in ft}
    print(f"\nimage AUROC on {len(trained.scores)} test images ({sum(trained.labels == 0)} good), input {h}x{w} {args.resize}")
    print(f"{'':<14}{'frozen global':>14}{'frozen patch':>14}{'trained':>10}{'n':>6}")
    print(f"{'overall':<14}{fm['image_auroc']:>14.3f}{um['image_auroc']:>14.3f}{tm['image_auroc']:>10.3f}{len(trained.scores):>6}")
    for t in ft:
        print(f"{t:<14}{ft[t]:>14.3f}{ut[t]:>14.3f}{tt[t]:>10.3f}{n_test[t]:>6}")
    print(f"\nSiamese at its calibrated threshold: false-reject {tm['false_reject_rate']:.3f}, escape {tm['escape_rate']:.3f}, F1 {tm['f1']:.3f}")
    print(f"frozen at its calibrated threshold:  false-reject {fm['false_reject_rate']:.3f}, escape {fm['escape_rate']:.3f}, F1 {fm['f1']:.3f}")
    imgs = sum(e.images for e in history.epochs)
    print(f"training: {len(history.epochs)} epochs, best epoch {history.best_epoch}, {train_s:.0f} s, {imgs / max(sum(e.seconds for e in history.epochs), 1e-9):.1f} img/s; frozen baseline built in {frozen_s:.0f} s")
    (args.out / "results.json").write_text(json.dumps({"frozen": {**fm, "per_type": ft}, "untrained_patch": {**um, "per_type": ut}, "trained": {**tm, "per_type": tt},
                                                       "history": history.to_dict(), "split": split.summary()}, indent=2, default=float))


if __name__ == "__main__":
    main()
