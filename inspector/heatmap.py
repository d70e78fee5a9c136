"""Where on the part: anomaly heatmaps from patch distances, in the original image's pixels.

A patch-mode bundle already computes, for every patch of the part, its distance to the nearest golden patch; the
part's score is the worst of them. Laying those distances back over the photo shows the quality engineer *where*
the model saw a defect, which is what they need to trust (or overrule) a verdict. The map is in the same units as
the score and the threshold, so a red region means "this patch alone would flag the part". Pure numpy and Pillow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from inspector.engine import Inspector, ScoreResult
from inspector.errors import ImageError, InspectorError
from inspector.preprocess import Preprocessor, load_image

#: Colour stops (value in [0, 1] → RGB) of the overlay: dark blue (far below threshold) to red (well above).
_STOPS = np.array(
    [
        [0.0, 0, 0, 130],
        [0.35, 0, 90, 255],
        [0.55, 0, 230, 230],
        [0.67, 255, 255, 0],
        [0.8, 255, 120, 0],
        [1.0, 200, 0, 0],
    ],
    dtype=np.float32,
)


def _resize_float(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map to ``size`` = (width, height)."""
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F").resize(
            size, Image.Resampling.BILINEAR
        )
    )


def to_image_map(grid_map: np.ndarray, preprocessor: Preprocessor, image_size: tuple[int, int]) -> np.ndarray:
    """A (rows, cols) patch map → (height, width) map over the original image, undoing the letterbox or stretch."""
    cfg = preprocessor.config
    canvas = _resize_float(grid_map, (cfg.width, cfg.height))  # patch centres land on the canvas pixels they cover
    width, height = image_size
    new_w, new_h, left, top = preprocessor.placement(width, height)
    content = canvas[top : top + new_h, left : left + new_w]
    return _resize_float(content, (width, height))


def colourise(values: np.ndarray, threshold: float) -> np.ndarray:
    """Map distances to RGB uint8 with a fixed scale: 0 → dark blue, the threshold → yellow, 1.5× threshold → red.

    A fixed, threshold-relative scale makes heatmaps comparable between parts (no per-image stretching that would
    paint every good part's noise red).
    """
    scale = threshold if math.isfinite(threshold) and threshold > 0 else float(np.max(values)) or 1.0
    t = np.clip(values / (1.5 * scale), 0.0, 1.0)
    rgb = np.empty(values.shape + (3,), dtype=np.float32)
    for c in range(3):
        rgb[..., c] = np.interp(t, _STOPS[:, 0], _STOPS[:, c + 1])
    return rgb.astype(np.uint8)


def overlay(image: Image.Image, image_map: np.ndarray, threshold: float, alpha: float = 0.45) -> Image.Image:
    """The part photo with its heatmap blended on top (``alpha`` of heatmap colour), as RGB."""
    if image_map.shape != (image.height, image.width):
        raise ValueError(f"map shape {image_map.shape} does not match the image ({image.height}x{image.width})")
    colours = Image.fromarray(colourise(image_map, threshold), mode="RGB")
    return Image.blend(image.convert("RGB"), colours, alpha)


def heatmap_filename(source: str, index: int, taken: set[str]) -> str:
    """``<stem>_heatmap.png``, made unique within one output folder (two ``img.png`` from different folders)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem) or f"image{index}"
    name = f"{stem}_heatmap.png"
    if name in taken:
        name = f"{stem}_{index}_heatmap.png"
    taken.add(name)
    return name


def score_with_maps(
    inspector: Inspector, sources: Sequence[str | Path]
) -> list[tuple[ScoreResult, np.ndarray | None, Image.Image | None]]:
    """Score image files and compute each readable one's anomaly map from the same embeddings and patch search.

    Returns (result, map, decoded image) per source, in order; map and image are None where the file was unreadable.
    The score is the worst patch of the grid map: the line's rule, from the one exact search the map needed anyway.
    """
    pre = inspector.embedder.preprocessor
    decoded: list[Image.Image | None] = []
    model_inputs: list[Image.Image] = []
    errors: list[str | None] = []
    for source in sources:
        try:
            # the overlay is the full photo; the model sees what the line decodes, which differs only for a large
            # JPEG (decoded at a reduced scale): only then is the file decoded a second time
            photo = load_image(source, max_pixels=pre.config.max_pixels, bit_depth=pre.config.bit_depth)
            model_inputs.append(pre.load(source) if pre.decodes_reduced(*photo.size) else photo)
            decoded.append(photo)
            errors.append(None)
        except ImageError as exc:
            decoded.append(None)
            errors.append(str(exc))
    readable = [img for img in decoded if img is not None]
    grids, raw = np.zeros((0, 1, 1), np.float32), None
    if readable:
        sizes = [img.size for img in model_inputs]
        emb, descriptors = inspector.embedder.run(pre.batch(model_inputs), sizes)
        valid = inspector.embedder.patch_valid(sizes, emb)
        grids = inspector.scorer.patch_maps(emb, pre.config.height, pre.config.width, valid)
        raw = inspector.scorer.raw_of_maps(grids, descriptors)
    results = inspector.results_for(sources, raw, errors)
    maps = iter(to_image_map(g, pre, img.size) for g, img in zip(grids, readable))
    return [(result, None if img is None else next(maps), img) for result, img in zip(results, decoded)]


def write_heatmaps(
    inspector: Inspector, paths: Sequence[str | Path], out_dir: Path, *, chunk: int = 32, save_maps: bool = False
) -> Iterator[tuple[ScoreResult, Path | None]]:
    """Score ``paths`` in chunks and write one overlay PNG per readable image into ``out_dir`` (created).

    Yields (result, overlay path) as it goes, so a long folder streams with bounded memory. With ``save_maps`` the
    raw float32 map is saved beside each PNG as ``.npy`` (for pixel-level evaluation against masks).
    """
    if inspector.bundle.mode != "patch":
        raise InspectorError(
            f"{inspector.bundle.path}: this bundle scores whole images; heatmaps need a patch-mode bundle"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for start in range(0, len(paths), chunk):
        for offset, (result, amap, img) in enumerate(score_with_maps(inspector, paths[start : start + chunk])):
            if amap is None or img is None:
                yield result, None
                continue
            target = out_dir / heatmap_filename(result.source, start + offset, taken)
            overlay(img, amap, inspector.patch_threshold).save(target)
            if save_maps:
                np.save(target.with_suffix(".npy"), amap.astype(np.float32))
            yield result, target
