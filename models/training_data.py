"""Every training dataset: good/defective part pairs for the patch losses, labelled images for the in-batch losses.

The patch model (the default) trains on :class:`PatchPairDataset`, an image embedder on :class:`LabelledImageDataset`;
both mine their pairs or triplets inside the batch (``models.losses``), so no dataset here enumerates them.

Every item goes through the one eval preprocessing of :mod:`inspector.preprocess`: ``Preprocessor.load ->
Preprocessor.resize -> (synthetic defect, augmentation on the uint8 array) -> Preprocessor.normalize``, so a model
never trains on pixels the line would not produce. Images are decoded once (:class:`ImageStore`), which also turns
an unreadable file into an :class:`~inspector.errors.ImageError` naming it before training starts.

Determinism: which images make up item ``i`` of an epoch (the *plan*) is a function of ``(seed, epoch)`` alone, and
how item ``i`` looks (augmentation, synthetic defect) of ``np.random.default_rng([seed, epoch, i])`` alone. So the
same seed and epoch give the same items in any order, with any number of DataLoader workers. Call
:meth:`set_epoch` before each epoch (before iterating the loader); the epoch lives in a shared-memory tensor, so it
also reaches ``persistent_workers=True`` workers, which otherwise keep the copy of the dataset they started with.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from inspector.preprocess import Preprocessor, open_mask
from models.synthetic import SyntheticDefects

GOOD, DEFECT, SYNTHETIC = 0, 1, 2

#: An albumentations transform (seeded per item from the item's rng), or ``f(image, rng) -> image`` on HxWx3 uint8.
Augment: TypeAlias = A.BasicTransform | A.BaseCompose | Callable[[np.ndarray, np.random.Generator], np.ndarray]

# Seed-sequence key of the per-epoch plan; 4 entries with a non-zero last one, so it never equals an item's
# [seed, epoch, index] (numpy's SeedSequence ignores trailing zeros).
_PLAN_STREAM = 0x5EED


class ImageStore:
    """Decoded, resized uint8 images kept in memory (training sets here are hundreds of images, not millions).

    Decoding once up front makes epochs cheap and makes a corrupt file fail at construction, naming the file.
    The stacked array is read-only: augmentations and synthetic defects work on copies.
    """

    def __init__(self, paths: Sequence[str | Path], preprocessor: Preprocessor) -> None:
        self.paths: tuple[Path, ...] = tuple(Path(p) for p in paths)
        self.preprocessor = preprocessor
        cfg = preprocessor.config
        arrays = [preprocessor.resize(preprocessor.load(p)) for p in self.paths]
        images = np.stack(arrays) if arrays else np.zeros((0, cfg.height, cfg.width, 3), np.uint8)
        images.setflags(write=False)
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._images[i]


def default_augmentation(strength: float = 1.0) -> A.Compose:
    """Mild, label-preserving augmentation for parts; ``strength`` scales every range, 0 gives the identity.

    Small shift/scale/rotation (a part never sits exactly the same way twice), brightness/contrast (lighting),
    slight blur or noise (focus, sensor). No crops that could cut a defect out, no flips (a mirrored part may
    itself be a defect), and blur/noise kept below what would erase a pit a few pixels wide.
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if strength == 0:
        return A.Compose([])
    s = float(strength)
    return A.Compose(
        [
            A.Affine(
                translate_percent=(-0.03 * s, 0.03 * s),
                scale=(1.0 - 0.05 * s, 1.0 + 0.05 * s),
                rotate=(-5.0 * s, 5.0 * s),
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.8,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.1 * s, contrast_limit=0.1 * s, p=0.8),
            A.OneOf(
                [
                    A.GaussianBlur(blur_limit=0, sigma_limit=(0.2, 0.2 + 0.4 * s), p=1.0),
                    A.GaussNoise(std_range=(0.0, min(0.5, 0.02 * s)), per_channel=False, p=1.0),
                ],
                p=min(1.0, 0.3 * s),
            ),
        ]
    )


def augment_image(augment: Augment | None, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply ``augment`` with its randomness drawn from ``rng``; the result must keep the image's shape."""
    if augment is None:
        return image
    if isinstance(augment, (A.BasicTransform, A.BaseCompose)):
        seed = int(rng.integers(2**63))
        augment.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = augment(image=image)["image"]
    else:
        out = augment(image, rng)
    if not isinstance(out, np.ndarray) or out.shape != image.shape or out.dtype != np.uint8:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(
            f"augmentation must return a {image.shape} uint8 array (size is fixed by the preprocessor), got {got}"
        )
    return out


@dataclass(frozen=True)
class EpochPlan:
    """Which images make up each item of one epoch.

    ``kinds[i]`` is GOOD, DEFECT or SYNTHETIC: the label of a labelled item, or the kind of the negative of a
    patch pair. ``sources[i]`` holds one index per image of the item; every index is into the good images except
    the last one of an item whose kind is DEFECT, which indexes the defective images.
    """

    kinds: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.kinds)


class _SeededImageDataset(Dataset):
    """Shared plumbing: image stores, the per-epoch plan, per-item rngs and the uint8 -> tensor path."""

    def __init__(
        self,
        good: Sequence[str | Path],
        defective: Sequence[str | Path],
        preprocessor: Preprocessor | None,
        *,
        synthetic_fraction: float | None,
        augment: Augment | None,
        synthetic: SyntheticDefects | None,
        seed: int,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.preprocessor = preprocessor or Preprocessor()
        self.good = ImageStore(good, self.preprocessor)
        if len(self.good) < 2:
            raise ValueError(f"need at least 2 good images to make training items, got {len(self.good)}")
        self.defective = ImageStore(defective, self.preprocessor)
        self.synthetic_fraction = _resolve_synthetic_fraction(synthetic_fraction, len(self.defective))
        self.augment = augment
        self.synthetic = synthetic or SyntheticDefects()
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._cached: tuple[int, EpochPlan] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose items this dataset returns (new draws of images, augmentations and defects)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def plan(self) -> EpochPlan:
        """The current epoch's plan (cheap: no image is touched)."""
        return self._plan_for(self.epoch)

    def _plan_for(self, epoch: int) -> EpochPlan:
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0, _PLAN_STREAM])
            self._cached = (epoch, self._make_plan(rng))
        return self._cached[1]

    def kinds(self) -> np.ndarray:
        """Per-item kind for the current epoch (see :class:`EpochPlan`)."""
        return self.plan().kinds

    def __len__(self) -> int:
        raise NotImplementedError

    def _make_plan(self, rng: np.random.Generator) -> EpochPlan:
        raise NotImplementedError

    def _item(self, index: int) -> tuple[int, np.ndarray, np.random.Generator]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        epoch = self.epoch  # read once: the plan and the item rng must agree
        plan = self._plan_for(epoch)
        return int(plan.kinds[index]), plan.sources[index], np.random.default_rng([self.seed, epoch, index])

    def _negative_counts(self, n: float) -> dict[int, float]:
        return {DEFECT: n * (1.0 - self.synthetic_fraction), SYNTHETIC: n * self.synthetic_fraction}


class LabelledImageDataset(_SeededImageDataset):
    """Single images with labels (GOOD, DEFECT, SYNTHETIC), for in-batch losses (batch-hard triplet, SupCon...).

    About ``defect_fraction`` of the items are negatives, ``synthetic_fraction`` of those synthetic (default 1.0
    without defective images, else 0.5). Counts are exact per epoch and every good (and defective) image is used
    about equally often. ``epoch_size`` defaults to one pass over the good images as GOOD items.
    """

    def __init__(
        self,
        good: Sequence[str | Path],
        defective: Sequence[str | Path] = (),
        preprocessor: Preprocessor | None = None,
        *,
        defect_fraction: float = 0.5,
        synthetic_fraction: float | None = None,
        epoch_size: int | None = None,
        augment: Augment | None = None,
        synthetic: SyntheticDefects | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= defect_fraction < 1.0:
            raise ValueError(f"defect_fraction must be in [0, 1), got {defect_fraction}")
        if defect_fraction == 0.0 and synthetic_fraction is None:
            synthetic_fraction = 1.0  # no negatives asked for: do not insist on defective images
        super().__init__(
            good,
            defective,
            preprocessor,
            synthetic_fraction=synthetic_fraction,
            augment=augment,
            synthetic=synthetic,
            seed=seed,
        )
        self.defect_fraction = defect_fraction
        self.epoch_size = math.ceil(len(self.good) / (1.0 - defect_fraction)) if epoch_size is None else epoch_size
        if self.epoch_size < 1:
            raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")

    def __len__(self) -> int:
        return self.epoch_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        kind, sources, rng = self._item(index)
        i = int(sources[0])
        if kind == GOOD:
            image = self.good[i]
        elif kind == DEFECT:
            image = self.defective[i]
        else:
            image, _ = self.synthetic(self.good[i], rng)
        return torch.from_numpy(self.preprocessor.normalize(augment_image(self.augment, image, rng))), kind

    def _make_plan(self, rng: np.random.Generator) -> EpochPlan:
        n = self.epoch_size
        negatives = n * self.defect_fraction
        kinds = balanced_kinds({GOOD: n - negatives, **self._negative_counts(negatives)}, rng)
        sources = np.zeros((n, 1), np.int64)
        for kind, store in ((GOOD, self.good), (SYNTHETIC, self.good), (DEFECT, self.defective)):
            where = kinds == kind
            sources[where, 0] = cycled_indices(int(where.sum()), len(store), rng)
        return EpochPlan(kinds, sources)


class PatchPairDataset(_SeededImageDataset):
    """Pairs for patch-level training: (a good part, a defective part) with pixel masks and source ids.

    Each item is two images: an augmented view of good image ``i`` and either a synthetic defect made on *another*
    augmented view of the same image ``i`` (so the two differ by pose and lighting jitter plus the defect, and the
    mask says exactly where), or a real defective image (its ground-truth mask when there is one, else a mask of
    -1: "somewhere"). Returns ``(images (2,3,H,W), masks (2,H,W) float32 in {0,1} or -1, sources (2,), labels (2,))``;
    the good images' sources are their indices, a real defect's source is negative (no clean twin).
    """

    def __init__(
        self,
        good: Sequence[str | Path],
        defective: Sequence[str | Path] = (),
        preprocessor: Preprocessor | None = None,
        *,
        defective_masks: Sequence[str | Path | None] | None = None,
        synthetic_fraction: float | None = None,
        epoch_size: int | None = None,
        augment: Augment | None = None,
        synthetic: SyntheticDefects | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            good,
            defective,
            preprocessor,
            synthetic_fraction=synthetic_fraction,
            augment=augment,
            synthetic=synthetic,
            seed=seed,
        )
        masks = list(defective_masks) if defective_masks is not None else [None] * len(self.defective)
        if len(masks) != len(self.defective):
            raise ValueError(f"{len(masks)} masks for {len(self.defective)} defective images")
        self.defective_masks = [self._load_mask(m) for m in masks]
        self.epoch_size = len(self.good) if epoch_size is None else int(epoch_size)
        if self.epoch_size < 1:
            raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")

    def _load_mask(self, path: str | Path | None) -> np.ndarray | None:
        """The mask at the model's input size; None (the defect is "somewhere") when it marks no pixel there: an
        all-normal mask would teach the defect photo's every patch as normal."""
        if path is None:
            return None
        resized = self.preprocessor.resize_mask(open_mask(path))
        return resized if resized.any() else None

    def __len__(self) -> int:
        return self.epoch_size

    def _make_plan(self, rng: np.random.Generator) -> EpochPlan:
        n = self.epoch_size
        kinds = balanced_kinds(self._negative_counts(n), rng)
        sources = np.zeros((n, 2), np.int64)
        sources[:, 0] = cycled_indices(n, len(self.good), rng)
        sources[:, 1] = sources[:, 0]
        where = kinds == DEFECT
        sources[where, 1] = cycled_indices(int(where.sum()), len(self.defective), rng)
        return EpochPlan(kinds, sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        kind, src, rng = self._item(index)
        good = augment_image(self.augment, self.good[int(src[0])], rng)
        if kind == SYNTHETIC:
            negative, mask = self.synthetic(augment_image(self.augment, self.good[int(src[0])], rng), rng)
            neg_mask, neg_source = mask.astype(np.float32), int(src[0])
        else:
            known = self.defective_masks[int(src[1])]
            negative, mask = augment_with_mask(self.augment, self.defective[int(src[1])], known, rng)
            neg_mask = mask.astype(np.float32) if known is not None else np.full(mask.shape, -1.0, np.float32)
            neg_source = -1 - int(src[1])
        images = torch.from_numpy(self.preprocessor.normalize(np.stack([good, negative])))
        masks = torch.from_numpy(np.stack([np.zeros(neg_mask.shape, np.float32), neg_mask]))
        return images, masks, torch.tensor([int(src[0]), neg_source]), torch.tensor([GOOD, 1])


class PartTypePairs(Dataset):
    """Several part types' :class:`PatchPairDataset` as one: every item of every type each epoch, the types'
    sources kept apart (a good of one type never counts as the "same source" as a good of another).

    Each pair stays within its part type (a good and its own defect); the batch mixes types, so the loss's bank of
    normal patches holds every type's, and an embedder learns what separates a defect from its own part in
    general, not in one part type. Every type is preprocessed at the same input size (one batch, one tensor).
    """

    def __init__(self, datasets: Sequence[PatchPairDataset]) -> None:
        if not datasets:
            raise ValueError("no part types to train on")
        self.datasets = list(datasets)
        self._ends = np.cumsum([len(d) for d in self.datasets])
        self._good_base = np.r_[0, np.cumsum([len(d.good) for d in self.datasets])][:-1]
        self._defect_base = np.r_[0, np.cumsum([len(d.defective) for d in self.datasets])][:-1]

    def __len__(self) -> int:
        return int(self._ends[-1])

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        t = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[t - 1]) if t else 0
        images, masks, sources, labels = self.datasets[t][index - start]
        offset = torch.where(sources >= 0, int(self._good_base[t]), -int(self._defect_base[t]))
        return images, masks, sources + offset, labels


def augment_with_mask(
    augment: Augment | None, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Augment an image and its defect mask with the same geometry (albumentations moves masks with images)."""
    target = np.zeros(image.shape[:2], np.uint8) if mask is None else mask.astype(np.uint8)
    if augment is None:
        return image, target > 0
    if isinstance(augment, (A.BasicTransform, A.BaseCompose)):
        seed = int(rng.integers(2**63))
        augment.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = augment(image=image, mask=target)
        return out["image"], out["mask"] > 0
    return augment(image, rng), target > 0


def balanced_kinds(expected: dict[int, float], rng: np.random.Generator) -> np.ndarray:
    """Exactly ``round(total)`` kinds with counts as close as possible to ``expected`` (largest remainder), shuffled."""
    total = int(round(sum(expected.values())))
    keys = list(expected)
    floors = {k: int(math.floor(expected[k])) for k in keys}
    spare = total - sum(floors.values())
    by_remainder = sorted(keys, key=lambda k: (-(expected[k] - floors[k]), k))
    for k in by_remainder[:spare]:
        floors[k] += 1
    kinds = np.concatenate([np.full(floors[k], k, np.int64) for k in keys]) if keys else np.zeros(0, np.int64)
    return rng.permutation(kinds)


def cycled_indices(n: int, pool: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices into ``range(pool)``: whole shuffled passes, so every index is used about equally often."""
    if n == 0:
        return np.zeros(0, np.int64)
    if pool < 1:
        raise ValueError(f"cannot draw {n} indices from an empty set of images")
    passes = -(-n // pool)
    return np.concatenate([rng.permutation(pool) for _ in range(passes)])[:n].astype(np.int64)


def _resolve_synthetic_fraction(synthetic_fraction: float | None, n_defective: int) -> float:
    if synthetic_fraction is None:
        return 1.0 if n_defective == 0 else 0.5
    if not 0.0 <= synthetic_fraction <= 1.0:
        raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
    if synthetic_fraction < 1.0 and n_defective == 0:
        raise ValueError(
            f"synthetic_fraction={synthetic_fraction} asks for real defective images but none were given; "
            "pass defective images or use synthetic_fraction=1.0 (or None)"
        )
    return float(synthetic_fraction)
