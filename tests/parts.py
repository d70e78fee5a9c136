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
