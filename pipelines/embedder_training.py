"""Training the Siamese embedder of a run: the split's images to training pairs, validation data, the fit.

Validation scores through the line's scorer (``models.training.validation_views``), so the epoch kept is the one
that separates best with the score the line will use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from inspector.preprocess import Preprocessor
from models.siamese import Embedder, PatchEmbedder, build_embedder
from models.synthetic import SyntheticDefects
from models.training import TrainHistory, ValidationData, train
from models.training_data import (
    Augment,
    LabelledImageDataset,
    PartTypePairs,
    PatchPairDataset,
    default_augmentation,
)
from pipelines.data.split import DataSplit
from pipelines.recipe import Recipe


class _SamplingOptions(TypedDict):
    """The keyword arguments both training datasets take alike."""

    synthetic_fraction: float | None
    epoch_size: int | None
    augment: Augment | None
    synthetic: SyntheticDefects | None
    seed: int


def load_preprocessed(paths: Sequence[Path], preprocessor: Preprocessor) -> np.ndarray:
    """Eval-preprocess images (the line's own preprocessing) into one NCHW float32 array."""
    return preprocessor.normalize(load_resized(paths, preprocessor)[0])


def load_resized(paths: Sequence[Path], preprocessor: Preprocessor) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Each image decoded once as the line decodes it: the resized NxHxWx3 uint8 stack and each image's upright
    (width, height) (for the patch content mask and the part's placement)."""
    cfg = preprocessor.config
    images = [preprocessor.load(p) for p in paths]
    resized = (
        np.stack([preprocessor.resize(img) for img in images])
        if images
        else np.zeros((0, cfg.height, cfg.width, 3), np.uint8)
    )
    return resized, [img.size for img in images]


def validation_data(split: DataSplit, recipe: Recipe) -> ValidationData | None:
    """Validation for early stopping: calibration goods vs held-out defects (or synthetic ones made from goods)."""
    if not split.calibration_good:
        return None
    pre = Preprocessor(recipe.preprocess)
    rng = np.random.default_rng(recipe.seed)
    refs = list(split.train_good)
    if len(refs) > recipe.max_validation_references:
        refs = [refs[i] for i in sorted(rng.choice(len(refs), recipe.max_validation_references, replace=False))]
    half = recipe.max_validation_queries // 2
    good_resized, good_sizes = load_resized(split.calibration_good[:half], pre)
    if split.validation_defective:
        bad_resized, bad_sizes = load_resized(split.validation_defective[:half], pre)
    else:
        synth = SyntheticDefects()
        bad_resized = np.stack(
            [synth(img, np.random.default_rng([recipe.seed, 7, i]))[0] for i, img in enumerate(good_resized)]
        )
        bad_sizes = good_sizes
    labels = np.r_[np.zeros(len(good_resized)), np.ones(len(bad_resized))]
    ref_resized, ref_sizes = load_resized(refs, pre)
    return ValidationData(
        references=torch.from_numpy(pre.normalize(ref_resized)),
        queries=torch.from_numpy(np.concatenate([pre.normalize(good_resized), pre.normalize(bad_resized)])),
        labels=labels,
        scoring=recipe.scoring,
        query_sizes=good_sizes + bad_sizes,
        preprocess=recipe.preprocess,
        reference_sizes=ref_sizes,
    )


def patch_pairs(split: DataSplit, pre: Preprocessor, options: _SamplingOptions) -> PatchPairDataset:
    """The split's training goods and defects (with their masks) as patch pairs."""
    defective, masks = [r.path for r in split.train_defective], [r.mask for r in split.train_defective]
    return PatchPairDataset(split.train_good, defective, pre, defective_masks=masks, **options)


def fit_embedder(
    split: DataSplit,
    recipe: Recipe,
    checkpoint_dir: Path | None = None,
    *,
    resume: bool = False,
    also: Sequence[DataSplit] = (),
) -> tuple[Embedder | PatchEmbedder, TrainHistory]:
    """Train the Siamese embedder on the split's training images (real defects + synthetic ones).

    ``also``: other part types' splits trained on alongside (:class:`~models.training_data.PartTypePairs`, patch
    mode), at this split's input size, for an embedder meant to serve part types it never saw (``new-part``);
    validation, early stopping and ``keep_initial`` stay on this split's part type.

    Without any real defect photo (none to train on, none to validate with) the pretrained patch embedder is returned
    untrained unless ``train_without_defect_photos``: on real parts, training against synthetic defects alone *lowered*
    detection of real ones (magnetic tiles 0.852 → 0.768 image AUROC, benchmarks/README.md), and synthetic validation
    cannot tell. With defect photos, ``TrainConfig.keep_initial`` keeps the starting weights unless training beats them
    on the held-out real defects.
    """
    if also and recipe.embedder.mode != "patch":
        raise ValueError("training on several part types needs the patch embedder (embedder.mode=patch)")
    torch.manual_seed(recipe.seed)
    embedder = build_embedder(recipe.embedder)
    if (
        not any(s.train_defective or s.validation_defective for s in (split, *also))
        and not recipe.train_without_defect_photos
        and recipe.embedder.mode == "patch"
    ):
        reason = (
            "no defect photos: pretrained patch features kept "
            "(set train_without_defect_photos to train on synthetic defects)"
        )
        return embedder.cpu().eval(), TrainHistory(skipped=reason)
    common = _SamplingOptions(
        synthetic_fraction=recipe.synthetic_fraction,
        epoch_size=recipe.epoch_size,
        augment=default_augmentation(recipe.augment_strength) if recipe.augment_strength > 0 else None,
        synthetic=SyntheticDefects(),
        seed=recipe.seed,
    )
    pre = Preprocessor(recipe.preprocess)
    dataset: Dataset
    if also:  # a part type without defect photos trains on synthetic defects alone, whatever the recipe's share
        dataset = PartTypePairs(
            [
                patch_pairs(
                    s,
                    pre,
                    {
                        **common,
                        "seed": recipe.seed + t,
                        "synthetic_fraction": recipe.synthetic_fraction if s.train_defective else None,
                    },
                )
                for t, s in enumerate((split, *also))
            ]
        )
    elif recipe.embedder.mode == "patch":
        dataset = patch_pairs(split, pre, common)
    else:
        defective = [r.path for r in split.train_defective]
        dataset = LabelledImageDataset(
            split.train_good, defective, pre, defect_fraction=recipe.defect_fraction, **common
        )
    history = train(
        embedder,
        dataset,
        replace(recipe.train, seed=recipe.seed),
        validation=validation_data(split, recipe),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        extra_state={"embedder_config": recipe.embedder.to_dict(), "preprocess": recipe.preprocess.to_dict()},
    )
    return embedder.cpu().eval(), history
