"""Synthetic defects made from good images, so training has negatives even with zero defect photos.

A factory usually has hundreds of good parts and a handful of defective ones, often none at the start. The
Siamese embedder still needs dissimilar examples; these are made here by damaging good images in the ways real
parts get damaged: a patch from elsewhere on the part (CutPaste, Li et al. 2021, with its thin "scar" variant),
scratches, pits and spots, cracks, stains and local texture changes. Sizes run from a few pixels to several
percent of the image and contrast from clearly visible to subtle, because the small, faint defects are the
ones a frozen ImageNet backbone misses.

Everything works on the uint8 HxWx3 array that :meth:`inspector.preprocess.Preprocessor.resize` produces, so the
defect goes through exactly the eval normalisation afterwards. Every random choice comes from the
``np.random.Generator`` passed in (albumentations transforms are seeded from it too), so a defect is a pure
function of (image, rng state).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

DEFECT_KINDS: tuple[str, ...] = ("cutpaste", "scratch", "spots", "crack", "stain", "texture")

#: Alpha below this is dropped, so the mask is exactly the set of pixels a defect may change.
_ALPHA_FLOOR = 0.05
#: A defect whose mean change inside its mask is below this (grey levels) gets a brightness shift on top: a
#: "negative" that is pixel-identical to a good image would only teach the model label noise.
_MIN_MEAN_CHANGE = 3.0
_MAX_ATTEMPTS = 8


class SyntheticDefects:
    """Callable that returns a damaged copy of a good image and the mask of the damage.

    ``kinds`` are drawn uniformly. The defect area (a fraction of the image) is log-uniform, with probability
    ``p_small`` in the small half ``[min_area, sqrt(min_area * max_area)]``; thin defects (scratch, crack, scar)
    use the same scale for their length. Positions are weighted towards textured or non-background pixels so
    defects land on the part rather than on a flat background or letterbox padding.
    """

    def __init__(
        self,
        kinds: Sequence[str] = DEFECT_KINDS,
        *,
        min_area: float = 0.0005,
        max_area: float = 0.08,
        p_small: float = 0.4,
    ) -> None:
        kinds = tuple(kinds)
        unknown = sorted(set(kinds) - set(DEFECT_KINDS))
        if not kinds or unknown:
            raise ValueError(f"kinds must be a non-empty subset of {DEFECT_KINDS}, got unknown {unknown or 'none'}")
        if not 0.0 < min_area <= max_area < 1.0:
            raise ValueError(f"need 0 < min_area <= max_area < 1, got {min_area} and {max_area}")
        if not 0.0 <= p_small <= 1.0:
            raise ValueError(f"p_small must be in [0, 1], got {p_small}")
        self.kinds = kinds
        self.min_area = min_area
        self.max_area = max_area
        self.p_small = p_small

    def __repr__(self) -> str:
        return (
            f"SyntheticDefects(kinds={self.kinds}, min_area={self.min_area}, max_area={self.max_area}, "
            f"p_small={self.p_small})"
        )

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return (defective HxWx3 uint8 copy, non-empty bool HxW mask of the pixels the defect may change)."""
        _check_image(image)
        scene = Scene.of(image)
        y0, y1, x0, x1 = scene.box
        inside = np.zeros(image.shape[:2], bool)
        inside[y0:y1, x0:x1] = True
        for _ in range(_MAX_ATTEMPTS):
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
            area = sample_area(rng, self.min_area, self.max_area, self.p_small)
            size = max(1.0, math.sqrt(area * (y1 - y0) * (x1 - x0)))
            layer, alpha = _MAKERS[kind](scene, size, rng)
            alpha = np.where((alpha >= _ALPHA_FLOOR) & inside, alpha, 0.0).astype(np.float32)
            if alpha.any():
                out, mask = composite(image, layer, alpha)
                return _ensure_visible(image, out, mask, alpha, rng), mask
        return _fallback_spot(scene, rng)


@dataclass(frozen=True, eq=False)
class Scene:
    """The image a defect is drawn on, with where defects may go (computed once per call)."""

    image: np.ndarray
    cdf: np.ndarray  # cumulative placement weights, flattened
    box: tuple[int, int, int, int]  # content without letterbox padding: y0, y1, x0, x1

    @classmethod
    def of(cls, image: np.ndarray) -> Scene:
        weights = placement_weights(image)
        return cls(image, np.cumsum(weights, dtype=np.float64).ravel(), content_box(image))

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[:2]

    def position(self, rng: np.random.Generator) -> tuple[float, float]:
        """(y, x) drawn from the placement weights."""
        return sample_position(self.cdf, self.shape, rng)


# ----------------------------------------------------------------------------------------------- sampling


def placement_weights(image: np.ndarray) -> np.ndarray:
    """Where defects should land: local texture plus colour distance from the border (background) colour.

    Generic on purpose: a part on a plain background gets weight on the part, a texture filling the frame gets
    nearly uniform weight, and letterbox padding (see :func:`content_box`) gets none.
    """
    weights = np.zeros(image.shape[:2], np.float32)
    y0, y1, x0, x1 = content_box(image)
    content = image[y0:y1, x0:x1]
    height, width = content.shape[:2]
    small = _odd(max(3, min(height, width) // 32))
    gray = cv2.cvtColor(content, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mean = cv2.blur(gray, (small, small))
    std = np.sqrt(np.maximum(cv2.blur(gray * gray, (small, small)) - mean * mean, 0.0))
    # Opening-like: erosion removes thin ridges of high std (the part's outline) and keeps textured areas.
    texture = cv2.blur(cv2.erode(std, np.ones((2 * small + 1, 2 * small + 1), np.uint8)), (small, small))
    frame = np.concatenate(
        [
            content[:2].reshape(-1, 3),
            content[-2:].reshape(-1, 3),
            content[:, :2].reshape(-1, 3),
            content[:, -2:].reshape(-1, 3),
        ]
    )
    background = np.median(frame, axis=0).astype(np.float32)
    distance = cv2.blur(np.linalg.norm(content.astype(np.float32) - background, axis=2), (small, small))
    # Squared texture: faint sensor noise on a background must weigh far less than the part's own texture.
    weights[y0:y1, x0:x1] = _unit(texture, 1.0) ** 2 + _unit(distance, 4.0) + 0.01
    return weights


def content_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the image without letterbox padding: edge rows/columns of one constant colour."""
    flat_rows = np.all(image == image[:, :1], axis=(1, 2))
    flat_cols = np.all(image == image[:1], axis=(0, 2))
    y0, y1 = _trim(flat_rows)
    x0, x1 = _trim(flat_cols)
    if y1 - y0 < 4 or x1 - x0 < 4:  # (nearly) flat image: no padding to speak of
        return 0, image.shape[0], 0, image.shape[1]
    return y0, y1, x0, x1


def _trim(flat: np.ndarray) -> tuple[int, int]:
    """Index range left after dropping leading and trailing True entries."""
    keep = np.flatnonzero(~flat)
    return (int(keep[0]), int(keep[-1]) + 1) if keep.size else (0, flat.size)


def sample_area(rng: np.random.Generator, min_area: float, max_area: float, p_small: float) -> float:
    """Log-uniform defect area, small half with probability ``p_small`` (small defects are the hard ones)."""
    split = math.sqrt(min_area * max_area)
    if rng.random() < p_small:
        return _log_uniform(rng, min_area, split)
    return _log_uniform(rng, split, max_area)


def sample_position(cdf: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> tuple[float, float]:
    """(y, x) drawn from the cumulative placement weights, with sub-pixel jitter."""
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    y, x = divmod(min(index, cdf.size - 1), shape[1])
    return y + rng.uniform(-0.5, 0.5), x + rng.uniform(-0.5, 0.5)


# ---------------------------------------------------------------------------------------------- compositing


def composite(image: np.ndarray, layer: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``layer`` over ``image`` where ``alpha > 0``; pixels outside that mask are left bit-identical."""
    mask = alpha > 0
    out = image.copy()
    a = alpha[mask][:, None]
    blended = image[mask].astype(np.float32) * (1.0 - a) + layer[mask].astype(np.float32) * a
    out[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out, mask


def shade(image: np.ndarray, amount: float, dark: bool) -> np.ndarray:
    """Darken towards black or lighten towards white by ``amount`` in [0, 1]; keeps headroom at the extremes."""
    x = image.astype(np.float32)
    return x * (1.0 - amount) if dark else x + (255.0 - x) * amount


def _ensure_visible(
    image: np.ndarray, out: np.ndarray, mask: np.ndarray, alpha: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    change = np.abs(out.astype(np.int16) - image.astype(np.int16))[mask].mean()
    if change >= _MIN_MEAN_CHANGE:
        return out
    dark = bool(image[mask].mean() > 127)  # towards whichever end has headroom
    boosted, _ = composite(out, shade(out, rng.uniform(0.15, 0.35), dark), np.maximum(alpha, 0.5) * mask)
    return boosted


def _fallback_spot(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = scene.image
    y, x = scene.position(rng)
    alpha = np.zeros(image.shape[:2], np.float32)
    yi, xi = int(np.clip(round(y), 0, image.shape[0] - 2)), int(np.clip(round(x), 0, image.shape[1] - 2))
    alpha[yi : yi + 2, xi : xi + 2] = 1.0
    dark = bool(image[yi, xi].mean() > 127)
    return composite(image, shade(image, 0.5, dark), alpha)


# -------------------------------------------------------------------------------------------------- kinds
# Each maker returns (layer float32 or uint8 HxWx3, alpha float32 HxW in [0, 1]); compositing is shared.


def _cutpaste(scene: Scene, size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch of the same image pasted elsewhere: rectangle, or a thin rotated "scar" (CutPaste)."""
    image, (height, width) = scene.image, scene.shape
    y0, y1, x0, x1 = scene.box
    extent = min(y1 - y0, x1 - x0)
    if rng.random() < 0.3:  # scar: long thin strip at any angle
        length = min(size * rng.uniform(1.5, 3.0), 0.6 * extent)
        patch_h, patch_w = length, max(1.5, length * rng.uniform(0.08, 0.25))
        angle = rng.uniform(0.0, 180.0)
    else:
        aspect = _log_uniform(rng, 0.3, 3.3)
        patch_h = min(max(2.0, size * math.sqrt(aspect)), 0.45 * extent)
        patch_w = min(max(2.0, size / math.sqrt(aspect)), 0.45 * extent)
        angle = rng.uniform(0.0, 360.0) if rng.random() < 0.5 else 0.0
    flip = np.diag([-1.0 if rng.random() < 0.25 else 1.0, -1.0 if rng.random() < 0.25 else 1.0])
    dest = np.array(scene.position(rng)[::-1])
    source = _patch_source(scene, math.hypot(patch_h, patch_w) / 2, dest, size, rng)
    theta = math.radians(angle)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    linear = rotation @ flip
    matrix = np.hstack([linear, (dest - linear @ source)[:, None]])
    layer = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        jitter = rng.uniform(0.05, 0.3)
        layer = apply_albumentations(
            A.ColorJitter(
                brightness=(1 - jitter, 1 + jitter),
                contrast=(1 - jitter, 1 + jitter),
                saturation=(1 - jitter, 1 + jitter),
                hue=(-jitter / 6, jitter / 6),
                p=1.0,
            ),
            layer,
            rng,
        )
    corners = np.array([[-patch_w, -patch_h], [patch_w, -patch_h], [patch_w, patch_h], [-patch_w, patch_h]]) / 2
    polygon = (corners @ rotation.T) + dest
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(polygon * 16).astype(np.int32)], 255, cv2.LINE_8, shift=4)
    return layer, canvas.astype(np.float32) / 255.0


def _patch_source(scene: Scene, half: float, dest: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Source centre (x, y) with the whole patch inside the content and away from the destination."""
    y0, y1, x0, x1 = scene.box
    centre = np.array([(x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2])
    low = np.minimum(np.array([x0, y0]) + half, centre)
    high = np.maximum(np.array([x1 - 1, y1 - 1]) - half, centre)
    source = np.clip(dest, low, high)
    for _ in range(10):
        source = np.clip(np.array(scene.position(rng)[::-1]), low, high)
        if np.linalg.norm(source - dest) >= max(2.0, 0.75 * size):
            break
    return source


def _scratch(scene: Scene, size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright or dark curve (cubic Bezier or a short polyline), fading along its length."""
    shape = scene.shape
    length = float(np.clip(size * rng.uniform(2.0, 5.0), 6.0, 0.9 * min(shape)))
    centre = np.array(scene.position(rng)[::-1])
    theta = rng.uniform(0.0, math.pi)
    direction = np.array([math.cos(theta), math.sin(theta)])
    normal = np.array([-direction[1], direction[0]])
    start, end = centre - direction * length / 2, centre + direction * length / 2
    if rng.random() < 0.7:
        bends = rng.uniform(-0.25, 0.25, size=2) * length
        p1 = start + (end - start) / 3 + normal * bends[0]
        p2 = start + 2 * (end - start) / 3 + normal * bends[1]
        points = _bezier(start, p1, p2, end, max(8, int(length)))
    else:
        knots = np.linspace(0.0, 1.0, int(rng.integers(3, 5)))[:, None]
        points = start + knots * (end - start) + normal * rng.normal(0.0, 0.06 * length, size=(len(knots), 1))
    alpha = draw_polyline(shape, points, _stroke(min(shape), rng))
    alpha *= 0.45 + 0.55 * smooth_noise(shape, max(4.0, length / 3), rng)
    dark = rng.random() < 0.45
    return shade(scene.image, _log_uniform(rng, 0.1, 0.6), dark), alpha


def _spots(scene: Scene, size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pits, blowholes or specks: one main blob and sometimes a few smaller ones, some only a pixel or two."""
    shape = scene.shape
    count = int(min(6, rng.geometric(0.55)))
    cy, cx = scene.position(rng)
    spread = size * rng.uniform(0.8, 3.0)
    alpha = np.zeros(shape, np.float32)
    for i in range(count):
        scale = rng.uniform(0.7, 1.1) if i == 0 else _log_uniform(rng, 0.12, 0.6)
        radius = max(0.6, 0.56 * size * scale)
        y = cy if i == 0 else float(np.clip(cy + rng.normal(0.0, spread), 0, shape[0] - 1))
        x = cx if i == 0 else float(np.clip(cx + rng.normal(0.0, spread), 0, shape[1] - 1))
        aspect = _log_uniform(rng, 0.6, 1.7)
        ragged = 1.0 + rng.uniform(0.0, 0.6) * (smooth_noise(shape, max(1.5, radius / 2), rng) - 0.5)
        blob = ellipse_alpha(
            shape,
            (y, x),
            (radius * math.sqrt(aspect), radius / math.sqrt(aspect)),
            rng.uniform(0.0, math.pi),
            edge=max(0.8, radius * rng.uniform(0.2, 0.7)),
            distortion=ragged,
        )
        alpha = np.maximum(alpha, blob * rng.uniform(0.6, 1.0))
    alpha *= 0.7 + 0.3 * smooth_noise(shape, max(1.5, size / 4), rng)  # uneven floor of a pit
    dark = rng.random() < 0.65
    return shade(scene.image, _log_uniform(rng, 0.15, 0.8), dark), alpha


def _crack(scene: Scene, size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A jagged thin dark line (a random walk around one direction), sometimes with a branch."""
    shape = scene.shape
    length = float(np.clip(size * rng.uniform(2.0, 5.0), 8.0, 0.9 * min(shape)))
    step = max(1.5, min(shape) / 90) * rng.uniform(0.8, 1.4)
    theta = rng.uniform(0.0, 2 * math.pi)
    centre = np.array(scene.position(rng)[::-1])
    start = centre - np.array([math.cos(theta), math.sin(theta)]) * length / 2
    wiggle = rng.uniform(0.25, 0.7)
    trunk = random_walk(start, theta, length, step, wiggle, rng)
    thickness = _stroke(min(shape), rng)
    alpha = draw_polyline(shape, trunk, thickness)
    if rng.random() < 0.5:
        quarter = len(trunk) // 4
        fork = trunk[int(rng.integers(quarter, max(quarter + 1, 3 * quarter)))]
        side = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
        branch = random_walk(fork, theta + side, length * rng.uniform(0.2, 0.5), step, wiggle, rng)
        alpha = np.maximum(alpha, draw_polyline(shape, branch, max(1, thickness - 1)))
    alpha *= 0.6 + 0.4 * smooth_noise(shape, max(4.0, length / 4), rng)
    dark = rng.random() < 0.85
    return shade(scene.image, _log_uniform(rng, 0.2, 0.85), dark), alpha


def _stain(scene: Scene, size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged irregular region that is brighter, darker or tinted (oil, residue, uneven coating)."""
    alpha = _irregular_blob(scene, size * rng.uniform(0.9, 1.4), (0.3, 0.9), rng)
    alpha *= rng.uniform(0.6, 1.0)
    amount = _log_uniform(rng, 0.08, 0.5)
    layer = shade(scene.image, amount, dark=rng.random() < 0.6)
    if rng.random() < 0.35 and not _is_gray(scene.image):  # tint, only where colour is a real cue
        layer = layer * (1.0 + rng.uniform(-amount, amount, size=3)).astype(np.float32)
    return np.clip(layer, 0, 255), alpha


def _texture(scene: Scene, size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A region whose texture differs: blurred, noisy or grainy, or with lowered/raised local contrast."""
    alpha = _irregular_blob(scene, size * rng.uniform(0.9, 1.4), (0.15, 0.4), rng) * rng.uniform(0.6, 1.0)
    y0, y1, x0, x1 = scene.box
    content = scene.image[y0:y1, x0:x1]  # filters must not pull in letterbox padding
    mode = ("blur", "noise", "contrast")[int(rng.integers(3))]
    if mode == "blur":
        sigma = max(1.0, size / 10)
        changed = apply_albumentations(
            A.GaussianBlur(blur_limit=0, sigma_limit=(sigma, 2.5 * sigma), p=1.0), content, rng
        )
    elif mode == "noise":
        transform = A.GaussNoise(
            std_range=(0.02, 0.08), per_channel=False, noise_scale_factor=float(rng.uniform(0.3, 1.0)), p=1.0
        )
        changed = apply_albumentations(transform, content, rng)
    else:
        x = content.astype(np.float32)
        local_mean = cv2.GaussianBlur(x, (0, 0), max(1.5, size / 8), borderType=cv2.BORDER_REFLECT_101)
        gain = rng.uniform(0.1, 0.5) if rng.random() < 0.5 else rng.uniform(1.6, 2.5)
        changed = np.clip(local_mean + gain * (x - local_mean), 0, 255)
    layer = scene.image.astype(np.float32)
    layer[y0:y1, x0:x1] = changed
    return layer, alpha


_MAKERS = {
    "cutpaste": _cutpaste,
    "scratch": _scratch,
    "spots": _spots,
    "crack": _crack,
    "stain": _stain,
    "texture": _texture,
}


# ------------------------------------------------------------------------------------------------ drawing


def ellipse_alpha(
    shape: tuple[int, int],
    centre: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    edge: float,
    distortion: np.ndarray | None = None,
) -> np.ndarray:
    """Anti-aliased ellipse in [0, 1] with a linear edge ``edge`` px wide; ``distortion`` (HxW) warps its outline."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dy, dx = ys - centre[0], xs - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = (dx * c + dy * s) / radii[1], (-dx * s + dy * c) / radii[0]
    q = np.sqrt(u * u + v * v)
    if distortion is not None:
        q = q * distortion
    return np.clip(0.5 - (q - 1.0) * math.sqrt(radii[0] * radii[1]) / edge, 0.0, 1.0).astype(np.float32)


def _irregular_blob(scene: Scene, size: float, softness: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Soft ellipse with a wavy outline, placed by the scene's weights."""
    shape = scene.shape
    centre = scene.position(rng)
    radius = max(1.0, 0.56 * size)
    aspect = _log_uniform(rng, 0.4, 2.5)
    radii = (radius * math.sqrt(aspect), radius / math.sqrt(aspect))
    distortion = 1.0 + rng.uniform(0.2, 0.7) * (smooth_noise(shape, max(2.0, radius / 2), rng) - 0.5)
    edge = max(1.0, radius * rng.uniform(*softness))
    return ellipse_alpha(shape, centre, radii, rng.uniform(0.0, math.pi), edge, distortion)


def draw_polyline(shape: tuple[int, int], points_xy: np.ndarray, thickness: int) -> np.ndarray:
    """Anti-aliased open polyline (sub-pixel coordinates) as an alpha map in [0, 1]."""
    canvas = np.zeros(shape, np.uint8)
    pts = np.round(np.asarray(points_xy) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], False, 255, int(thickness), cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def random_walk(
    start: np.ndarray, theta: float, length: float, step: float, wiggle: float, rng: np.random.Generator
) -> np.ndarray:
    """Jagged path that keeps its overall direction: each heading is pulled back towards ``theta``."""
    n = max(2, int(length / step))
    heading = theta
    points = [np.asarray(start, dtype=np.float64)]
    for _ in range(n):
        heading = theta + 0.5 * (heading - theta) + rng.normal(0.0, wiggle)
        points.append(points[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
    return np.stack(points)


def smooth_noise(shape: tuple[int, int], cell: float, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [0, 1] with features about ``cell`` px across (bicubic-upsampled random grid)."""
    grid_h = max(2, int(math.ceil(shape[0] / cell)) + 1)
    grid_w = max(2, int(math.ceil(shape[1] / cell)) + 1)
    grid = rng.random((grid_h, grid_w)).astype(np.float32)
    return np.clip(cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def apply_albumentations(transform: A.BasicTransform, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Run an albumentations transform with its randomness drawn from ``rng`` (it otherwise keeps its own state)."""
    transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
    return transform(image=image)["image"]


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _stroke(extent: int, rng: np.random.Generator) -> int:
    """Line thickness in px: mostly 1 (anti-aliased), sometimes 2-3 on large images."""
    return max(1, int(round(rng.uniform(0.5, 1.6) * extent / 224)))


# -------------------------------------------------------------------------------------------------- utils


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"synthetic defects need an HxWx3 uint8 image, got {got}")
    if min(image.shape[:2]) < 4:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is too small for synthetic defects")


def _is_gray(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _unit(x: np.ndarray, min_range: float) -> np.ndarray:
    """Scale to [0, 1] by a high percentile (a few strong edges must not flatten the rest); all-zero when the map
    is essentially flat (no signal to follow)."""
    if float(x.max()) < min_range:
        return np.zeros_like(x)
    return np.clip(x / max(float(np.percentile(x, 98)), 1e-6), 0.0, 1.0)


def _odd(k: int) -> int:
    return k if k % 2 else k + 1
