"""Generated part images shared by several test modules."""

from __future__ import annotations

import numpy as np
from PIL import Image


def textured_parts(
    rng: np.random.Generator, n: int, level: tuple[float, float], size: tuple[int, int] = (40, 32)
) -> list[Image.Image]:
    """Textured parts whose overall brightness varies from part to part within ``level``."""
    out = []
    for _ in range(n):
        base = rng.uniform(*level)
        img = np.clip(base + rng.normal(0, 0.08, (size[1], size[0], 1)), 0, 1) * 255
        out.append(Image.fromarray(np.repeat(img, 3, axis=2).astype(np.uint8)))
    return out


def striped_parts(rng: np.random.Generator, n: int, size: tuple[int, int] = (48, 24)) -> list[Image.Image]:
    """Parts of another kind than :func:`textured_parts`: wider than tall, vertical stripes barely shifted (a
    fixture holds each part in place)."""
    width, height = size
    x = np.arange(width)[None, :]
    out = []
    for _ in range(n):
        stripes = 0.5 + 0.25 * np.sin(2 * np.pi * (x / 8.0 + rng.uniform(0, 0.1)))
        img = np.clip(stripes + rng.normal(0, 0.04, (height, width)), 0, 1) * 255
        out.append(Image.fromarray(np.repeat(img[:, :, None], 3, axis=2).astype(np.uint8)))
    return out


def with_spot(image: Image.Image, rng: np.random.Generator, side: int = 8) -> Image.Image:
    """The part with a dark square defect at a random place."""
    arr = np.asarray(image).copy()
    top, left = rng.integers(0, arr.shape[0] - side), rng.integers(0, arr.shape[1] - side)
    arr[top : top + side, left : left + side] = 20
    return Image.fromarray(arr)
