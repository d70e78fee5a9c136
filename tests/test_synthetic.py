"""Synthetic defects: each kind damages pixels only inside its mask, sizes include tiny ones, and it is seeded."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2
import numpy as np
import pytest

from models.synthetic import DEFECT_KINDS, SyntheticDefects, content_box, placement_weights


def textured(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """A grey, brushed-looking surface with some grain: enough texture for every defect kind to show."""
    rng = np.random.default_rng(seed)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 1.0) * 20
    brushed = cv2.blur(rng.normal(0, 1, (height, width)).astype(np.float32), (9, 1)) * 25
    gray = np.clip(128 + grain + brushed, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def part_on_background(size: int = 96) -> np.ndarray:
    """A textured disc on a noisy dark background (noise, so no row is constant: no letterbox here)."""
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(25, 2, (size, size, 3)), 0, 255).astype(np.uint8)
    disc = np.zeros((size, size), np.uint8)
    cv2.circle(disc, (size // 2, size // 2), size // 3, 255, -1)
    image[disc > 0] = textured(size, size, seed=2)[disc > 0]
    return image


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_kind_changes_pixels_only_inside_its_mask(kind: str) -> None:
    image = textured()
    make = SyntheticDefects(kinds=(kind,))
    for seed in range(25):
        out, mask = make(image, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        assert mask.any()
        changed = np.any(out != image, axis=2)
        assert not np.any(changed & ~mask), "pixels changed outside the mask"
        diff = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(axis=2)
        assert diff[mask].mean() >= 2.0, f"{kind} seed {seed}: defect is invisible"
        assert changed[mask].mean() > 0.3, f"{kind} seed {seed}: most of the mask is unchanged"


def test_input_is_not_modified_and_may_be_read_only() -> None:
    image = textured()
    image.setflags(write=False)
    before = image.copy()
    out, _ = SyntheticDefects()(image, np.random.default_rng(0))
    assert np.array_equal(image, before)
    assert out is not image


def test_same_rng_seed_gives_the_same_defect_and_other_seeds_differ() -> None:
    image = textured()
    make = SyntheticDefects()
    a = [make(image, np.random.default_rng(seed)) for seed in range(12)]
    b = [make(image, np.random.default_rng(seed)) for seed in range(12)]
    for (out_a, mask_a), (out_b, mask_b) in zip(a, b):
        assert np.array_equal(out_a, out_b) and np.array_equal(mask_a, mask_b)
    assert len({out.tobytes() for out, _ in a}) == len(a)


def test_sizes_range_from_a_few_pixels_to_large() -> None:
    image = textured()
    make = SyntheticDefects()
    areas = np.array([make(image, np.random.default_rng(seed))[1].sum() for seed in range(150)])
    assert (areas <= 12).sum() >= 5, f"too few tiny defects: smallest areas {np.sort(areas)[:10]}"
    assert (areas >= 120).sum() >= 5, f"too few large defects: largest areas {np.sort(areas)[-10:]}"


def test_p_small_one_gives_only_small_defects() -> None:
    image = textured(96, 96)
    make = SyntheticDefects(kinds=("spots", "stain", "texture", "cutpaste"), p_small=1.0)
    areas = np.array([make(image, np.random.default_rng(seed))[1].sum() for seed in range(40)])
    assert np.median(areas) < 0.01 * image.shape[0] * image.shape[1]


def test_defects_land_on_the_part_not_the_background() -> None:
    image = part_on_background()
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    on_part = np.hypot(yy - size // 2, xx - size // 2) <= size // 3
    make = SyntheticDefects()
    inside = total = 0
    for seed in range(60):
        _, mask = make(image, np.random.default_rng(seed))
        inside += int((mask & on_part).sum())
        total += int(mask.sum())
    assert inside / total > 0.75


def test_letterbox_padding_is_never_touched() -> None:
    image = np.full((64, 64, 3), 128, np.uint8)
    image[12:52] = textured(40, 64)
    assert content_box(image) == (12, 52, 0, 64)
    assert placement_weights(image)[:12].max() == 0.0
    make = SyntheticDefects()
    for seed in range(40):
        out, mask = make(image, np.random.default_rng(seed))
        assert not mask[:12].any() and not mask[52:].any()
        assert np.array_equal(out[:12], image[:12]) and np.array_equal(out[52:], image[52:])


def test_flat_image_still_gets_a_visible_defect() -> None:
    image = np.full((48, 48, 3), 90, np.uint8)
    make = SyntheticDefects()
    for seed in range(30):
        out, mask = make(image, np.random.default_rng(seed))
        assert mask.any() and np.any(out[mask] != image[mask])


def test_colour_image_and_non_square_shapes_work() -> None:
    image = np.ascontiguousarray(textured(50, 90) * np.array([1.0, 0.8, 0.6])).astype(np.uint8)
    out, mask = SyntheticDefects()(image, np.random.default_rng(3))
    assert out.shape == (50, 90, 3) and mask.shape == (50, 90)


@pytest.mark.parametrize(
    "kwargs",
    [{"kinds": ()}, {"kinds": ("rust",)}, {"min_area": 0.0}, {"min_area": 0.1, "max_area": 0.05}, {"p_small": 1.5}],
)
def test_bad_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SyntheticDefects(**kwargs)


def test_wrong_image_type_is_refused() -> None:
    make = SyntheticDefects()
    with pytest.raises(ValueError, match="uint8"):
        make(textured().astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="HxWx3"):
        make(textured()[..., 0], np.random.default_rng(0))
