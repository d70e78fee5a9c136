"""Training datasets: balanced, seeded, independent of worker order, and on the one eval preprocessing path."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from inspector.errors import ImageError
from inspector.preprocess import PreprocessConfig, Preprocessor, load_image
from models.synthetic import SyntheticDefects
from models.training_data import (
    DEFECT,
    GOOD,
    SYNTHETIC,
    ImageStore,
    LabelledImageDataset,
    PatchPairDataset,
    augment_image,
    default_augmentation,
)

CONFIG = PreprocessConfig(height=48, width=48, resize="letterbox")


def _textured(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 1.0) * 20
    gray = np.clip(110 + 3 * seed + grain, 0, 255).astype(np.uint8)
    return np.stack([gray, gray, np.clip(gray.astype(int) + 10, 0, 255).astype(np.uint8)], axis=2)


def _write(folder: Path, name: str, image: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """Six good textured parts (non-square, so letterboxing is exercised) and three with a dark blob."""
    root = tmp_path_factory.mktemp("parts")
    good = [_write(root / "good", f"good_{i}.png", _textured(i)) for i in range(6)]
    defective = []
    for i in range(3):
        image = _textured(10 + i)
        cv2.circle(image, (20 + 5 * i, 20), 5, (20, 20, 20), -1)
        defective.append(_write(root / "defect", f"defect_{i}.png", image))
    return good, defective


def _eval_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(Preprocessor(CONFIG)(load_image(path)))


def _same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- image store


def test_image_store_keeps_resized_uint8_arrays(images) -> None:
    good, _ = images
    store = ImageStore(good, Preprocessor(CONFIG))
    assert len(store) == 6
    assert store[0].shape == (48, 48, 3) and store[0].dtype == np.uint8
    assert not store[0].flags.writeable


def test_corrupt_image_raises_image_error_naming_the_file(images, tmp_path: Path) -> None:
    good, _ = images
    bad = tmp_path / "broken_part.png"
    bad.write_bytes(b"this is not a png")
    truncated = tmp_path / "truncated_part.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    for path in (bad, truncated):
        with pytest.raises(ImageError, match=path.name) as caught:
            PatchPairDataset([*good, path], preprocessor=Preprocessor(CONFIG), epoch_size=4)
        assert caught.value.path == str(path)
    with pytest.raises(ImageError, match="broken_part.png"):
        LabelledImageDataset(good, [bad], Preprocessor(CONFIG))


def test_fewer_than_two_good_images_is_a_clear_error(images) -> None:
    good, defective = images
    for cls in (LabelledImageDataset, PatchPairDataset):
        with pytest.raises(ValueError, match="at least 2 good images"):
            cls(good[:1], defective, Preprocessor(CONFIG))


def test_real_defects_requested_without_any_is_a_clear_error(images) -> None:
    good, _ = images
    with pytest.raises(ValueError, match="defective"):
        PatchPairDataset(good, preprocessor=Preprocessor(CONFIG), synthetic_fraction=0.5)


# ------------------------------------------------------------------------------------------ eval path


def test_unaugmented_good_item_equals_the_eval_preprocessing_exactly(images) -> None:
    good, _ = images
    dataset = LabelledImageDataset(good, preprocessor=Preprocessor(CONFIG), defect_fraction=0.0)
    assert len(dataset) == len(good)
    plan = dataset.plan()
    assert sorted(plan.sources[:, 0]) == list(range(len(good)))  # one pass over every good image
    for index in range(len(dataset)):
        x, label = dataset[index]
        assert label == GOOD
        assert torch.equal(x, _eval_tensor(good[plan.sources[index, 0]]))


def test_tensor_shapes_and_dtypes(images) -> None:
    good, defective = images
    pre = Preprocessor(CONFIG)
    x, label = LabelledImageDataset(good, defective, pre)[0]
    assert x.dtype == torch.float32 and x.shape == (3, 48, 48) and isinstance(label, int)
    pair, masks, sources, labels = PatchPairDataset(good, defective, pre, epoch_size=4)[0]
    assert pair.shape == (2, 3, 48, 48) and pair.dtype == torch.float32
    assert masks.shape == (2, 48, 48) and masks.dtype == torch.float32
    assert sources.shape == labels.shape == (2,) and labels.tolist() == [GOOD, 1]
    with pytest.raises(IndexError):
        PatchPairDataset(good, defective, pre, epoch_size=4)[4]


# -------------------------------------------------------------------------------------------- balance


def test_patch_pair_balance_matches_the_requested_fraction(images) -> None:
    good, defective = images
    dataset = PatchPairDataset(good, defective, Preprocessor(CONFIG), synthetic_fraction=0.3, epoch_size=200, seed=5)
    kinds = dataset.kinds()
    assert (kinds == SYNTHETIC).sum() == 60 and (kinds == DEFECT).sum() == 140 and (kinds == GOOD).sum() == 0
    sources = dataset.plan().sources
    assert np.bincount(sources[:, 0], minlength=6).min() >= 200 // 6  # good parts cycle through every good image
    assert np.bincount(sources[kinds == DEFECT, 1], minlength=3).min() >= 140 // 3
    default = PatchPairDataset(good, defective, Preprocessor(CONFIG), epoch_size=20)
    assert len(default) == 20 and np.bincount(default.kinds(), minlength=3).tolist() == [0, 10, 10]


def test_labelled_dataset_label_distribution(images) -> None:
    good, defective = images
    dataset = LabelledImageDataset(
        good, defective, Preprocessor(CONFIG), defect_fraction=0.25, synthetic_fraction=0.4, epoch_size=40, seed=1
    )
    counts = np.bincount(dataset.kinds(), minlength=3)
    assert counts.tolist() == [30, 6, 4]
    assert len(dataset) == 40
    assert [dataset[i][1] for i in range(40)] == dataset.kinds().tolist()
    default = LabelledImageDataset(good, preprocessor=Preprocessor(CONFIG))  # defect_fraction 0.5, no defects
    assert len(default) == 12 and np.bincount(default.kinds(), minlength=3).tolist() == [6, 0, 6]


# ---------------------------------------------------------------------------------------- where negatives come from


def test_zero_defect_mode_uses_only_synthetic_negatives(images) -> None:
    good, _ = images
    dataset = PatchPairDataset(good, preprocessor=Preprocessor(CONFIG), epoch_size=12)
    assert dataset.synthetic_fraction == 1.0 and set(dataset.kinds().tolist()) == {SYNTHETIC}
    goods = torch.stack([_eval_tensor(p) for p in good])
    for index in range(8):
        pair, masks, sources, _ = dataset[index]
        base = goods[dataset.plan().sources[index, 0]]
        assert torch.equal(pair[0], base) and sources[0] == sources[1]  # the good part and its damaged twin
        assert not torch.equal(pair[1], base)  # damaged ...
        assert (pair[1] != base).float().mean() < 0.5  # ... locally, the rest of the part is intact
        assert (masks[1] > 0).any()
    labelled = LabelledImageDataset(good, preprocessor=Preprocessor(CONFIG))
    assert set(labelled.kinds().tolist()) == {GOOD, SYNTHETIC}


def test_real_defects_are_used_when_present(images) -> None:
    good, defective = images
    dataset = PatchPairDataset(good, defective, Preprocessor(CONFIG), epoch_size=6, synthetic_fraction=0.0)
    assert set(dataset.kinds().tolist()) == {DEFECT}
    plan = dataset.plan().sources
    for index in range(6):
        pair, masks, sources, _ = dataset[index]
        assert torch.equal(pair[1], _eval_tensor(defective[plan[index, 1]]))
        assert sources[1] == -1 - plan[index, 1] and bool((masks[1] == -1).all())  # no clean twin, no mask
    labelled = LabelledImageDataset(good, defective, Preprocessor(CONFIG), synthetic_fraction=0.0)
    assert set(labelled.kinds().tolist()) == {GOOD, DEFECT}


# ------------------------------------------------------------------------------------------ determinism


@pytest.fixture(scope="module")
def augmented_pairs(images):
    good, defective = images

    def make(seed: int = 0) -> PatchPairDataset:
        return PatchPairDataset(
            good,
            defective,
            Preprocessor(CONFIG),
            epoch_size=24,
            augment=default_augmentation(),
            synthetic=SyntheticDefects(),
            seed=seed,
        )

    return make


def test_same_seed_and_epoch_give_identical_items_in_any_order(augmented_pairs) -> None:
    a, b = augmented_pairs(), augmented_pairs()
    order = list(range(len(a)))
    first = [a[i] for i in order]
    second = {i: b[i] for i in reversed(order)}
    assert all(_same(first[i], second[i]) for i in order)


def test_set_epoch_changes_items_and_returning_to_an_epoch_reproduces_it(augmented_pairs) -> None:
    dataset = augmented_pairs()
    epoch0 = [dataset[i] for i in range(8)]
    dataset.set_epoch(1)
    epoch1 = [dataset[i] for i in range(8)]
    assert not any(_same(x, y) for x, y in zip(epoch0, epoch1))
    other = augmented_pairs()
    other.set_epoch(1)
    assert all(_same(dataset[i], other[i]) for i in range(8))
    dataset.set_epoch(0)
    assert all(_same(x, dataset[i]) for i, x in enumerate(epoch0))
    assert not np.array_equal(augmented_pairs(seed=1).kinds(), augmented_pairs(seed=0).kinds())


def test_dataloader_workers_give_the_same_batches(augmented_pairs) -> None:
    dataset = augmented_pairs()
    dataset.set_epoch(3)
    single = list(DataLoader(dataset, batch_size=6, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=6, num_workers=2))
    assert len(single) == len(parallel) == 4
    for a, b in zip(single, parallel):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_good_part_and_its_damaged_twin_are_augmented_independently(images) -> None:
    good, _ = images
    dataset = PatchPairDataset(
        good[:2], preprocessor=Preprocessor(CONFIG), epoch_size=6, augment=default_augmentation()
    )
    for index in range(6):
        pair, masks, _, _ = dataset[index]
        outside = masks[1] == 0
        assert not torch.equal(pair[0][:, outside], pair[1][:, outside])  # pose and lighting jitter too


# -------------------------------------------------------------------------------------------- augmentation


def test_default_augmentation_is_mild_seeded_and_identity_at_zero() -> None:
    image = _textured(0, 48, 48)
    identity = augment_image(default_augmentation(0.0), image, np.random.default_rng(0))
    assert np.array_equal(identity, image)
    augment = default_augmentation(1.0)
    outs = [augment_image(augment, image, np.random.default_rng(s)) for s in (1, 1, 2)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
    assert np.abs(outs[0].astype(int) - image).mean() < 40  # mild: still the same part
    with pytest.raises(ValueError):
        default_augmentation(-1.0)


def test_plain_callable_augmentation_gets_the_item_rng(images) -> None:
    good, _ = images

    def brighten(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.clip(image.astype(int) + int(rng.integers(1, 20)), 0, 255).astype(np.uint8)

    dataset = LabelledImageDataset(good, preprocessor=Preprocessor(CONFIG), defect_fraction=0.0, augment=brighten)
    again = LabelledImageDataset(good, preprocessor=Preprocessor(CONFIG), defect_fraction=0.0, augment=brighten)
    x, _ = dataset[0]
    assert torch.equal(x, again[0][0]) and not torch.equal(x, _eval_tensor(good[dataset.plan().sources[0, 0]]))

    def shrink(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image[:10]

    with pytest.raises(ValueError, match="augmentation must return"):
        LabelledImageDataset(good, preprocessor=Preprocessor(CONFIG), defect_fraction=0.0, augment=shrink)[0]


def test_set_epoch_reaches_persistent_workers(augmented_pairs) -> None:
    """The training loop keeps its workers alive between epochs; they must still see the new epoch."""
    dataset = augmented_pairs()
    loader = DataLoader(dataset, batch_size=12, num_workers=2, persistent_workers=True)
    reference = augmented_pairs()
    for epoch in (0, 1, 2):
        dataset.set_epoch(epoch)
        reference.set_epoch(epoch)
        expected = list(DataLoader(reference, batch_size=12, num_workers=0))
        for a, b in zip(loader, expected):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"epoch {epoch}"


# ------------------------------------------------------------------------------------------- several part types
def test_part_types_keep_their_own_pairs_and_sources_apart(images, tmp_path: Path) -> None:
    """Each item is a pair of one part type; sources of two types never collide (the loss would take a good of
    one type for an augmented copy of a good of the other); set_epoch reaches every type."""
    from models.training_data import PartTypePairs

    good, defective = images
    other = [_write(tmp_path, f"other_{i}.png", np.full((30, 30, 3), 40 * i + 20, np.uint8)) for i in range(4)]
    pre = Preprocessor(CONFIG)
    first = PatchPairDataset(good, defective, pre, synthetic_fraction=0.5, seed=0)
    second = PatchPairDataset(other, [], pre, seed=1)
    both = PartTypePairs([first, second])
    assert len(both) == len(first) + len(second) == 10
    items = [both[i] for i in range(len(both))]
    for i in range(len(first)):
        assert _same(items[i], first[i])  # the first type's items, unchanged
    sources = [int(s) for _, _, src, lab in items for s, label in zip(src, lab) if label == GOOD]
    assert set(sources[: len(first)]) <= set(range(len(good)))
    assert set(sources[len(first) :]) <= set(range(len(good), len(good) + len(other)))
    for j in range(len(second)):
        images_j, masks_j, src_j, _ = items[len(first) + j]
        expected = second[j]
        assert torch.equal(images_j, expected[0]) and torch.equal(masks_j, expected[1])
        assert int(src_j[0]) == int(expected[2][0]) + len(good)
    both.set_epoch(3)
    assert first.epoch == second.epoch == 3
    with pytest.raises(IndexError):
        both[len(both)]
    with pytest.raises(ValueError, match="no part types"):
        PartTypePairs([])


def test_fit_embedder_learns_from_other_part_types_too(demo_root: Path, tmp_path: Path) -> None:
    """``also``: the embedder trains on every part type's pairs (more items per epoch), validates on its own."""
    from dataclasses import replace

    from models.demo_data import generate_demo_dataset
    from pipelines.data.layouts import scan_dataset
    from pipelines.data.manifest import build_manifest
    from pipelines.data.split import SplitFractions, assign_splits
    from pipelines.embedder_training import fit_embedder
    from pipelines.recipe import tiny_recipe

    recipe = tiny_recipe()
    recipe = replace(
        recipe,
        preprocess=replace(recipe.preprocess, height=64, width=64),
        train=replace(recipe.train, epochs=1, batch_size=8, progress=False),
        epoch_size=16,
    )
    other_root = tmp_path / "wide"
    generate_demo_dataset(other_root, seed=5, n_train_good=12, n_test_good=2, n_test_per_defect=1, height=48, width=96)

    def split_of(root: Path):  # type: ignore[no-untyped-def]
        return assign_splits(build_manifest(scan_dataset(root=str(root))), SplitFractions.from_recipe(recipe), None)

    _, history = fit_embedder(split_of(demo_root), recipe, also=[split_of(other_root)])
    assert history.epochs[0].images == 2 * 2 * recipe.epoch_size  # 16 pairs (2 images each) of each part type
    assert history.epochs[0].val_auroc is not None  # validated on the first part type's own held-out parts
    image_recipe = replace(recipe, embedder=replace(recipe.embedder, mode="global"))
    with pytest.raises(ValueError, match="patch embedder"):
        fit_embedder(split_of(demo_root), image_recipe, also=[split_of(other_root)])
