"""Synthetic images of a turned metal flange, good and defective, in the MVTec AD layout.

The demo, the end-to-end tests and the quickstart need a dataset that exists everywhere, costs nothing to make and
behaves like the real problem: good parts that differ a little from each other (position, rotation, lighting,
machining texture, sensor noise), so that a model cannot win by pixel matching, and the defects factories see
(scratch, crack, pit, stain, missing material, contamination) from clearly visible down to a few pixels, with
pixel-exact masks. Only numpy and Pillow are used, so the generator imports anywhere (a line PC included) and the
defaults render in well under a second. Output is deterministic: every image draws from its own
``np.random.default_rng([seed, split, ...])`` stream, so the same arguments give byte-identical PNG files.

Run ``python -m models.demo_data OUT`` to write a dataset.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "DEFECT_TYPES",
    "DemoDataset",
    "add_defect",
    "generate_demo_dataset",
    "main",
    "part_mask",
    "render_good_part",
]

DEFECT_TYPES: tuple[str, ...] = ("scratch", "crack", "pit", "stain", "missing", "contamination")

# Split indices used in the per-image seeds; fixed so that adding a split or a defect type never changes old images.
_SPLIT_TRAIN_GOOD = 0
_SPLIT_TEST_GOOD = 1
_SPLIT_TEST_DEFECT = 2

# Mask threshold on a defect's opacity: below it a pixel is left untouched, so the mask marks every changed pixel.
_ALPHA_MIN = 0.2

_Array = np.ndarray


@dataclass(frozen=True)
class DemoDataset:
    """What :func:`generate_demo_dataset` wrote, so callers need not re-scan the folder."""

    root: Path
    n_train_good: int
    n_test_good: int
    defect_counts: dict[str, int]


# ----------------------------------------------------------------------------------------------------------------
# small numpy helpers


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[_Array, _Array]:
    """Pixel-centre coordinates (y, x), computed once per image size (read-only: they are shared)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> _Array:
    """Low-frequency noise (unit std, float32): a coarse random grid upsampled with smooth separable weights."""
    ch = max(2, round(cells * height / max(height, width))) + 1
    cw = max(2, round(cells * width / max(height, width))) + 1
    coarse = rng.standard_normal((ch, cw)).astype(np.float32)
    up = _upsample_weights(height, ch) @ coarse @ _upsample_weights(width, cw).T
    return up / max(float(up.std()), 1e-6)


@lru_cache(maxsize=32)
def _upsample_weights(n_out: int, n_in: int) -> _Array:
    """(n_out, n_in) interpolation matrix with smoothstep weights (no visible creases at the coarse nodes)."""
    pos = np.linspace(0.0, n_in - 1.0, n_out, dtype=np.float32)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    t = pos - lo
    t = t * t * (3.0 - 2.0 * t)
    w = np.zeros((n_out, n_in), dtype=np.float32)
    w[np.arange(n_out), lo] = 1.0 - t
    w[np.arange(n_out), lo + 1] += t
    w.setflags(write=False)
    return w


def _dilate(mask: _Array, steps: int = 1) -> _Array:
    """Binary dilation by ``steps`` pixels (diamond), by shifting: no scipy on the line."""
    out = mask.astype(bool, copy=True)
    for _ in range(steps):
        p = np.pad(out, 1)
        out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def _erode(mask: _Array, steps: int = 1) -> _Array:
    return ~_dilate(~mask.astype(bool), steps)


def _luminance(image: _Array) -> _Array:
    img = image.astype(np.float32)
    return 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


def _to_uint8(image: _Array) -> _Array:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _polyline_distance(
    points: _Array, height: int, width: int, pad: float
) -> tuple[_Array, _Array, tuple[slice, slice]]:
    """Distance from each pixel of the polyline's bounding box to the polyline, and the arc parameter (0..1).

    Only the bounding box (grown by ``pad``) is computed, so long images cost nothing extra.
    """
    y0 = max(int(math.floor(points[:, 0].min() - pad)), 0)
    y1 = min(int(math.ceil(points[:, 0].max() + pad)) + 1, height)
    x0 = max(int(math.floor(points[:, 1].min() - pad)), 0)
    x1 = min(int(math.ceil(points[:, 1].max() + pad)) + 1, width)
    box = (slice(y0, max(y1, y0)), slice(x0, max(x1, x0)))
    if y1 <= y0 or x1 <= x0:
        empty = np.zeros((0, 0), np.float32)
        return empty, empty, box
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    p = np.stack([py.ravel(), px.ravel()], axis=1)[:, None, :]  # (P, 1, 2)
    a = points[:-1][None].astype(np.float32)  # (1, M, 2)
    ab = (points[1:] - points[:-1])[None].astype(np.float32)
    denom = np.maximum((ab**2).sum(-1), 1e-6)
    t = np.clip(((p - a) * ab).sum(-1) / denom, 0.0, 1.0)  # (P, M)
    d = np.sqrt((((a + t[..., None] * ab) - p) ** 2).sum(-1))
    seg = d.argmin(axis=1)
    rows = np.arange(d.shape[0])
    dist = d[rows, seg].reshape(py.shape)
    u = ((seg + t[rows, seg]) / max(len(points) - 1, 1)).reshape(py.shape)
    return dist, u.astype(np.float32), box


# ----------------------------------------------------------------------------------------------------------------
# the good part


def render_good_part(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Render one good turned-steel flange (HxWx3 uint8) on a dark table; every call varies it a little.

    The flange has an outer chamfer, a raised hub, a centre bore and six bolt holes (which make rotation
    visible). Per image: position (+-3 px at 96 px), rotation (+-8 deg), scale (+-1 %), brightness, light
    direction, the machining texture (concentric turning grooves and tangential streaks), the anisotropic
    highlight of turned metal, vignetting and sensor noise. Good parts therefore never match pixel for pixel but
    remain obviously the same part.
    """
    if height < 16 or width < 16:
        raise ValueError(f"image size {height}x{width} is too small (minimum 16x16)")
    yy, xx = _grid(height, width)
    s = float(min(height, width))
    scale = s / 96.0
    cy = (height - 1) / 2.0 + rng.uniform(-3.0, 3.0) * scale
    cx = (width - 1) / 2.0 + rng.uniform(-3.0, 3.0) * scale
    rot = math.radians(rng.uniform(-8.0, 8.0))
    k = 1.0 + rng.normal(0.0, 0.01)
    r_out, r_hub, r_bore = 0.42 * s * k, 0.235 * s * k, 0.125 * s * k
    r_bolt_circle, r_hole = 0.325 * s * k, 0.045 * s * k
    light = math.radians(-130.0 + rng.normal(0.0, 6.0))  # direction the light comes from (image y down)
    brightness = 150.0 * (1.0 + rng.normal(0.0, 0.035))

    dy, dx = yy - cy, xx - cx
    r = np.sqrt(dy * dy + dx * dx)
    theta = np.arctan2(dy, dx)
    facing = np.cos(theta - light)  # +1 where a surface normal pointing outward faces the light

    # Coverage with a one-pixel antialiased edge.
    outer = np.clip(r_out - r + 0.5, 0.0, 1.0)
    bore = np.clip(r_bore - r + 0.5, 0.0, 1.0)
    holes = np.zeros_like(r)
    hole_rim = np.zeros_like(r)
    chamfer = 1.4 * scale + 0.6
    for j in range(6):
        a = rot + j * math.pi / 3.0 + math.pi / 6.0
        hy, hx = dy - r_bolt_circle * math.sin(a), dx - r_bolt_circle * math.cos(a)
        d = np.sqrt(hy * hy + hx * hx)
        holes = np.maximum(holes, np.clip(r_hole - d + 0.5, 0.0, 1.0))
        band = np.clip(1.0 - np.abs(d - r_hole - chamfer / 2) / (chamfer / 2 + 0.5), 0.0, 1.0)
        hole_rim += band * (-(hy * math.sin(light) + hx * math.cos(light)) / np.maximum(d, 1e-3))
    material = outer * (1.0 - bore) * (1.0 - holes)

    # Machining texture: fine concentric turning grooves, tangential streaks, isotropic grain.
    nr = int(r_out * 4) + 8
    grooves = rng.standard_normal(nr).astype(np.float32)
    grooves = 0.6 * grooves + 0.4 * np.roll(grooves, 1)
    ri = np.clip((r * 4).astype(np.int32), 0, nr - 1)
    nt = 512
    streak = rng.standard_normal((nr // 2 + 1, nt)).astype(np.float32)
    win = 40
    c = np.cumsum(np.concatenate([streak, streak[:, :win]], axis=1), axis=1)
    streak = (c[:, win:] - c[:, :-win]) / math.sqrt(win)
    ti = (((theta - rot) / (2 * math.pi) + 1.0) * nt).astype(np.int32) % nt
    streaks = streak[ri // 2, ti]
    grain = rng.standard_normal(r.shape).astype(np.float32)
    texture = 0.028 * grooves[ri] + 0.035 * streaks + 0.012 * grain

    # Turned faces reflect in a bow-tie perpendicular to the light; the hub face is finished finer and sits higher.
    sheen = rng.uniform(0.10, 0.18)
    spec = np.exp(-(np.sin(theta - light - math.pi / 2) ** 2) / 0.12)
    on_hub = np.clip(r_hub - r + 0.5, 0.0, 1.0)
    face = 1.0 + sheen * spec + texture * (1.0 - 0.5 * on_hub) + 0.05 * on_hub

    # Edges: outer chamfer and hub step face outward, the bore chamfer inward; lit sides bright, far sides dark.
    def ring(radius: float, inside: bool) -> _Array:
        centre = radius - chamfer / 2 if inside else radius + chamfer / 2
        return np.clip(1.0 - np.abs(r - centre) / (chamfer / 2 + 0.5), 0.0, 1.0)

    edges = 0.30 * ring(r_out, True) * facing - 0.28 * ring(r_bore, False) * facing
    edges += 0.22 * ring(r_hub, False) * np.clip(facing, -0.6, 1.0) + 0.25 * hole_rim
    gradient = 1.0 + 0.18 * (dx * math.cos(light) + dy * math.sin(light)) / s * -1.0
    part = brightness * face * (1.0 + edges) * gradient

    # Table: dark, slightly mottled, with the part's soft shadow away from the light; through-holes look darker.
    table_level = 42.0 * (1.0 + rng.normal(0.0, 0.05))
    table = table_level * (1.0 + 0.06 * _smooth_noise(rng, height, width, 6)) * gradient
    off = 2.5 * scale
    rs = np.sqrt((dy + off * math.sin(light)) ** 2 + (dx + off * math.cos(light)) ** 2)
    table = table * (1.0 - 0.35 * np.clip((r_out + 2.5 * scale - rs) / (3.0 * scale + 1.0), 0.0, 1.0))
    table = table * (1.0 - 0.45 * np.clip(bore + holes, 0.0, 1.0))

    tint_part = np.array([0.975, 1.0, 1.035], np.float32) + rng.normal(0.0, 0.006, 3).astype(np.float32)
    tint_table = np.array([0.97, 1.0, 0.96], np.float32)
    m = material[..., None]
    img = (part[..., None] * tint_part) * m + (table[..., None] * tint_table) * (1.0 - m)
    vignette = 1.0 - 0.12 * ((r / (0.72 * s)) ** 2)
    img = img * vignette[..., None]
    sigma = rng.uniform(1.5, 3.0)
    noise = rng.standard_normal(r.shape).astype(np.float32)[..., None] * sigma
    noise = noise + rng.standard_normal(img.shape).astype(np.float32) * (0.4 * sigma)
    return _to_uint8(img + noise)


def part_mask(image: np.ndarray) -> np.ndarray:
    """Where the part's material is (HxW bool), from brightness alone: the part is much brighter than the table.

    Otsu separates table and part; the cut is placed at 30 % of the way from the table to the part so that
    antialiased edge pixels count as part. Used to put defects on the part and to check masks in tests.
    """
    lum = np.clip(_luminance(image), 0, 255).astype(np.uint8)
    hist = np.bincount(lum.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * levels)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    t = int(np.argmax(between))
    cut = mu0[t] + 0.3 * (mu1[t] - mu0[t])
    return lum > cut


# ----------------------------------------------------------------------------------------------------------------
# defects


@dataclass(frozen=True)
class _Scene:
    """What a defect renderer needs to know about the image it draws on."""

    image: _Array  # float32 HxWx3
    material: _Array  # bool HxW, the part (antialiased edges included)
    inner: _Array  # bool HxW, the part away from its edges: where surface defects may sit
    scale: float  # pixels per 1/96 of the short side

    @property
    def shape(self) -> tuple[int, int]:
        return self.material.shape


def _size_class(rng: np.random.Generator) -> int:
    """0 small, 1 medium, 2 large: small defects are the common and the hard case."""
    return int(rng.choice(3, p=[0.35, 0.35, 0.30]))


def _strength(rng: np.random.Generator) -> float:
    """Contrast factor: mostly clear, sometimes subtle."""
    return float(rng.uniform(0.45, 0.7) if rng.random() < 0.25 else rng.uniform(0.7, 1.0))


def _random_point(rng: np.random.Generator, allowed: _Array) -> _Array:
    idx = np.flatnonzero(allowed)
    if idx.size == 0:
        idx = np.array([allowed.size // 2 + allowed.shape[1] // 2])
    flat = int(idx[rng.integers(idx.size)])
    y, x = divmod(flat, allowed.shape[1])
    return np.array([y + rng.uniform(-0.4, 0.4), x + rng.uniform(-0.4, 0.4)], np.float32)


def _stroke_alpha(scene: _Scene, points: _Array, widths: _Array | float) -> _Array:
    """Opacity (HxW) of an antialiased stroke along ``points`` whose width may vary along its length."""
    h, w = scene.shape
    alpha = np.zeros((h, w), np.float32)
    wmax = float(np.max(widths))
    dist, u, box = _polyline_distance(points, h, w, pad=wmax / 2 + 1.5)
    if dist.size == 0:
        return alpha
    if np.ndim(widths):
        wv = np.interp(u, np.linspace(0, 1, np.size(widths)), widths).astype(np.float32)
    else:
        wv = np.float32(widths)
    cover = np.clip(wv / 2 + 0.5 - dist, 0.0, 1.0) * np.minimum(wv, 1.0)
    alpha[box] = cover
    return alpha


def _finish(scene: _Scene, alpha: _Array, where: _Array) -> _Array:
    """Clip an opacity to where the defect may be and zero the faint fringe, so mask == (alpha > 0)."""
    alpha = np.where(where & (alpha >= _ALPHA_MIN), alpha, 0.0).astype(np.float32)
    return alpha


def _blend_colour(image: _Array, alpha: _Array, colour: _Array) -> _Array:
    a = alpha[..., None]
    return image * (1.0 - a) + colour * a


def _scratch(scene: _Scene, rng: np.random.Generator) -> tuple[_Array, _Array]:
    """A tool or handling scratch: a thin smooth curve, bright (cuts through to clean metal) or dark."""
    size = _size_class(rng)
    lo, hi = [(6.0, 12.0), (12.0, 24.0), (24.0, 48.0)][size]
    length = max(rng.uniform(lo, hi) * scene.scale, 4.0)
    p0 = _random_point(rng, scene.inner)
    ang = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.sin(ang), math.cos(ang)], np.float32)
    normal = np.array([-direction[1], direction[0]], np.float32)
    p2 = p0 + length * direction
    p1 = (p0 + p2) / 2 + normal * length * rng.uniform(-0.25, 0.25)
    t = np.linspace(0, 1, max(int(length / 1.5), 3) + 1, dtype=np.float32)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = max(rng.uniform(0.8, 1.8) * scene.scale, 0.9)
    widths = width * np.clip(np.sin(np.pi * np.linspace(0.02, 0.98, 9)) ** 0.3, 0.5, 1.0)
    alpha = _finish(scene, _stroke_alpha(scene, pts, widths), scene.inner)
    k = _strength(rng)
    img = scene.image
    # Bright where the surface is dull, dark where it is already in the highlight: either way a human sees it.
    under = float(_luminance(img)[alpha > 0].mean()) if (alpha > 0).any() else 0.0
    if rng.random() < (0.8 if under < 165.0 else 0.2):
        target = img + (252.0 - img) * 0.85 * k
    else:
        target = img * (1.0 - 0.6 * k)
    return _blend_colour(img, alpha, target), alpha


def _walk(rng: np.random.Generator, start: _Array, heading: float, length: float, step: float, jag: float) -> _Array:
    n = max(int(length / step), 2)
    turns = rng.normal(0.0, jag, n)
    kinks = rng.random(n) < 0.15
    turns[kinks] += rng.choice([-1.0, 1.0], int(kinks.sum())) * rng.uniform(0.4, 0.9, int(kinks.sum()))
    angles = heading + np.cumsum(turns) * 0.5
    steps = step * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return np.vstack([start[None], start[None] + np.cumsum(steps, axis=0)]).astype(np.float32)


def _crack(scene: _Scene, rng: np.random.Generator) -> tuple[_Array, _Array]:
    """A fatigue or quench crack: a jagged, dark, hairline path that tapers at its ends, sometimes branched."""
    size = _size_class(rng)
    lo, hi = [(5.0, 10.0), (10.0, 22.0), (22.0, 40.0)][size]
    length = max(rng.uniform(lo, hi) * scene.scale, 5.0)
    start = _random_point(rng, scene.inner)
    heading = rng.uniform(0, 2 * math.pi)
    width = max(rng.uniform(0.9, 1.8) * scene.scale, 1.0)
    main_path = _walk(rng, start, heading, length, 1.2, 0.55)
    taper = width * np.clip(np.sin(np.pi * np.linspace(0.05, 0.95, 11)) ** 0.5, 0.45, 1.0)
    alpha = _stroke_alpha(scene, main_path, taper)
    if size > 0 and rng.random() < 0.5:
        at = main_path[int(rng.integers(len(main_path) // 4, max(len(main_path) * 3 // 4, len(main_path) // 4 + 1)))]
        branch = _walk(rng, at, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), length * 0.4, 1.2, 0.6)
        alpha = np.maximum(alpha, _stroke_alpha(scene, branch, taper * 0.75))
    alpha = _finish(scene, alpha, scene.inner)
    depth = 0.45 + 0.4 * _strength(rng)
    return scene.image * (1.0 - depth * alpha[..., None]), alpha


def _disc_alpha(scene: _Scene, centre: _Array, radius: float) -> _Array:
    yy, xx = _grid(*scene.shape)
    d = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    return np.clip(radius + 0.5 - d, 0.0, 1.0).astype(np.float32)


def _pit(scene: _Scene, rng: np.random.Generator) -> tuple[_Array, _Array]:
    """Casting porosity or corrosion pits: one to a few small dark holes with a lit lower rim."""
    size = _size_class(rng)
    n = int(rng.integers(1, 3)) if size == 0 else int(rng.integers(1, 5))
    rmax = [1.5, 2.3, 3.3][size]
    centre = _random_point(rng, _erode(scene.inner, 2))
    img = scene.image.copy()
    total = np.zeros(scene.shape, np.float32)
    for i in range(n):
        c = centre if i == 0 else centre + rng.normal(0.0, 3.0 * scene.scale, 2).astype(np.float32)
        radius = max(rng.uniform(1.0, rmax) * scene.scale, 1.0)
        hole = _finish(scene, _disc_alpha(scene, c, radius), scene.inner)
        lit = _disc_alpha(scene, c + np.array([0.6, 0.6], np.float32) * radius, radius * 0.9)
        rim = _finish(scene, np.clip(lit - hole, 0.0, 1.0) * 0.8, scene.inner)
        dark = 0.65 + 0.3 * _strength(rng)
        img = img * (1.0 - dark * hole[..., None])
        img = img + (235.0 - img) * 0.35 * rim[..., None]
        total = np.maximum(total, np.maximum(hole, rim))
    return img, total


def _blob_alpha(scene: _Scene, rng: np.random.Generator, centre: _Array, radius: float, soft: float) -> _Array:
    """A soft, irregular blob: a radius wobbling with angle, a soft edge and mottled inside."""
    yy, xx = _grid(*scene.shape)
    dy, dx = yy - centre[0], xx - centre[1]
    d = np.sqrt(dy * dy + dx * dx)
    th = np.arctan2(dy, dx)
    wobble = np.ones_like(d)
    for k in (2, 3, 5):
        wobble = wobble + rng.uniform(0.0, 0.18) * np.cos(k * th + rng.uniform(0, 2 * math.pi))
    edge = radius * wobble
    alpha = np.clip((edge - d) / soft + 0.5, 0.0, 1.0)
    mottle = 0.75 + 0.25 * np.clip(_smooth_noise(rng, *scene.shape, 12), -1.0, 1.0)
    return (alpha * mottle).astype(np.float32)


def _stain(scene: _Scene, rng: np.random.Generator) -> tuple[_Array, _Array]:
    """Rust, oil or a dried coolant mark: a low-to-medium contrast soft blotch that shifts colour and brightness."""
    size = _size_class(rng)
    lo, hi = [(2.0, 4.0), (4.0, 7.5), (7.5, 13.0)][size]
    radius = max(rng.uniform(lo, hi) * scene.scale, 1.5)
    centre = _random_point(rng, scene.inner)
    soft = max(0.3 * radius, 1.0)
    alpha = _blob_alpha(scene, rng, centre, radius, soft)
    kind = int(rng.integers(3))
    k = _strength(rng)
    if kind == 2:  # coolant mark: a darker ring where the residue dried, lighter inside
        inner = _blob_alpha(scene, rng, centre, radius * 0.7, soft)
        alpha = np.clip(alpha - 0.7 * inner, 0.0, 1.0) + 0.25 * inner
    alpha = _finish(scene, alpha, scene.inner)
    tints = [
        np.array([0.92, 0.66, 0.42], np.float32),  # rust
        np.array([0.62, 0.64, 0.70], np.float32),  # oil
        np.array([0.78, 0.76, 0.66], np.float32),  # coolant residue
    ]
    factor = 1.0 + (tints[kind] - 1.0) * (0.55 + 0.45 * k) * alpha[..., None]
    return scene.image * factor, alpha


def _missing(scene: _Scene, rng: np.random.Generator) -> tuple[_Array, _Array]:
    """A chipped edge: a jagged chunk of material gone from the outer rim (sometimes the bore), showing the table."""
    h, w = scene.shape
    material = scene.material
    boundary = material & _dilate(~material, 1)
    ys, xs = np.nonzero(material)
    centroid = np.array([ys.mean(), xs.mean()], np.float32) if ys.size else np.array([h / 2, w / 2], np.float32)
    by, bx = np.nonzero(boundary)
    dist = np.sqrt((by - centroid[0]) ** 2 + (bx - centroid[1]) ** 2)
    outer = dist > 0.85 * dist.max() if dist.size else np.zeros(0, bool)
    pick = outer if (rng.random() < 0.8 and outer.any()) else (dist < 0.5 * dist.max() if dist.size else outer)
    if not pick.any():
        pick = np.ones_like(dist, bool)
    j = int(rng.integers(int(pick.sum())))
    p = np.array([by[pick][j], bx[pick][j]], np.float32)
    outward = p - centroid
    outward = outward / max(float(np.linalg.norm(outward)), 1e-3)
    if dist.size and dist[pick][j] < 0.5 * dist.max():
        outward = -outward  # on the bore the "outside" points to the centre
    size = _size_class(rng)
    lo, hi = [(2.0, 3.5), (3.5, 6.0), (6.0, 10.0)][size]
    radius = max(rng.uniform(lo, hi) * scene.scale, 1.8)
    centre = p + outward * radius * rng.uniform(0.1, 0.6)
    yy, xx = _grid(h, w)
    dy, dx = yy - centre[0], xx - centre[1]
    th = np.arctan2(dy, dx)
    edge = radius * (1.0 + 0.1 * np.cos(3 * th + rng.uniform(0, 6.3)) + 0.07 * np.cos(7 * th + rng.uniform(0, 6.3)))
    edge = edge * (1.0 + 0.08 * rng.standard_normal(64)[((th + math.pi) / (2 * math.pi) * 64).astype(int) % 64])
    chunk = (np.sqrt(dy * dy + dx * dx) < edge) & material
    if not chunk.any():
        chunk = _dilate(np.zeros((h, w), bool) | (np.abs(yy - p[0]) < 1) & (np.abs(xx - p[1]) < 1), 1) & material
    # Fill with the local table colour (shadowed, noisy), read from table pixels near the chip.
    table = ~_dilate(material, 2)
    y0, y1 = max(int(p[0] - 12 * scene.scale), 0), min(int(p[0] + 12 * scene.scale) + 1, h)
    x0, x1 = max(int(p[1] - 12 * scene.scale), 0), min(int(p[1] + 12 * scene.scale) + 1, w)
    local = scene.image[y0:y1, x0:x1][table[y0:y1, x0:x1]]
    if local.shape[0] < 8:
        local = scene.image[table] if table.any() else scene.image.reshape(-1, 3)
    bg = np.median(local, axis=0) * 0.85
    noise_sigma = float(np.clip(local.std(axis=0).mean(), 1.0, 4.0))
    img = scene.image.copy()
    fill = bg + rng.normal(0.0, noise_sigma, (int(chunk.sum()), 3)).astype(np.float32)
    img[chunk] = fill
    # The fresh fracture face: a one-pixel rim, bright where it faces the light, dark elsewhere.
    rim = _dilate(chunk, 1) & material & ~chunk
    ry, rx = np.nonzero(rim)
    lit = (ry - centre[0]) * -0.77 + (rx - centre[1]) * -0.64 < 0  # rim faces back into the chunk, light top-left
    img[ry, rx] = img[ry, rx] * np.where(lit, 1.25, 0.7)[:, None]
    alpha = (chunk | rim).astype(np.float32)
    return img, alpha


def _contamination(scene: _Scene, rng: np.random.Generator) -> tuple[_Array, _Array]:
    """Foreign matter on the surface: dirt specks, a textile fibre, or a curl of swarf, in a colour not the part's."""
    kind = int(rng.integers(3))
    size = _size_class(rng)
    img = scene.image
    if kind == 0:  # dirt or grit specks, dark brown to black
        centre = _random_point(rng, _erode(scene.inner, 2))
        n = int(rng.integers(1, 3 + 2 * size))
        alpha = np.zeros(scene.shape, np.float32)
        for i in range(n):
            c = centre if i == 0 else centre + rng.normal(0.0, (2.0 + 2.0 * size) * scene.scale, 2).astype(np.float32)
            rad = max(rng.uniform(0.8, [1.6, 2.4, 3.4][size]) * scene.scale, 0.9)
            alpha = np.maximum(alpha, _blob_alpha(scene, rng, c, rad, 0.8) * 1.3)
        alpha = _finish(scene, np.clip(alpha, 0, 1), scene.inner)
        colour = np.array(rng.choice([[62, 46, 30], [30, 28, 26], [95, 70, 40]]), np.float32)
    else:
        lo, hi = [(5.0, 11.0), (11.0, 22.0), (22.0, 36.0)][size]
        length = max(rng.uniform(lo, hi) * scene.scale, 5.0)
        start = _random_point(rng, scene.inner)
        if kind == 1:  # fibre: thin, smoothly bending, coloured
            path = _walk(rng, start, rng.uniform(0, 2 * math.pi), length, 1.0, 0.18)
            width = max(rng.uniform(0.8, 1.3) * scene.scale, 0.9)
            colour = np.array(rng.choice([[40, 70, 170], [175, 45, 40], [30, 30, 35], [230, 225, 210]]), np.float32)
        else:  # swarf: a bright curl of chip metal, wider and brassy
            turns = np.linspace(0, rng.uniform(1.5, 3.5) * math.pi, max(int(length), 6))
            rad = length / 6
            path = start + np.stack(
                [rad * np.sin(turns) + turns * rad * 0.25, rad * np.cos(turns) + turns * rad * 0.15], axis=1
            ).astype(np.float32)
            width = max(rng.uniform(1.0, 1.8) * scene.scale, 1.0)
            colour = np.array(rng.choice([[215, 170, 90], [245, 240, 225]]), np.float32)
        alpha = _finish(scene, _stroke_alpha(scene, path, width), scene.inner)
    noise = rng.normal(0.0, 4.0, img.shape).astype(np.float32)
    opacity = 0.75 + 0.25 * _strength(rng)
    return _blend_colour(img, alpha * opacity, colour + noise), alpha


_RENDERERS: dict[str, Callable[[_Scene, np.random.Generator], tuple[_Array, _Array]]] = {
    "scratch": _scratch,
    "crack": _crack,
    "pit": _pit,
    "stain": _stain,
    "missing": _missing,
    "contamination": _contamination,
}


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Put one defect of type ``kind`` on the part in ``image``; return the new image and its exact mask.

    The part is found from brightness (:func:`part_mask`), so this works on any image this module rendered.
    The mask (HxW bool, never empty) marks exactly the pixels the defect changed, and lies on the part. Sizes run
    from a few percent of the part area down to a few pixels; contrast from clear to subtle.
    """
    if kind not in _RENDERERS:
        raise ValueError(f"unknown defect type {kind!r}; expected one of {', '.join(DEFECT_TYPES)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    material = part_mask(image)
    scale = min(image.shape[:2]) / 96.0
    inner = _erode(material, max(2, round(2 * scale)))
    if not inner.any():
        inner = material if material.any() else np.ones(material.shape, bool)
    scene = _Scene(image=image.astype(np.float32), material=material, inner=inner, scale=scale)
    out, alpha = scene.image, np.zeros(material.shape, np.float32)
    for _ in range(20):  # a stroke that wandered off the part leaves an empty mask: draw another
        out, alpha = _RENDERERS[kind](scene, rng)
        if (alpha > 0).any():
            break
    mask = alpha > 0
    if not mask.any():  # pathological image (no part found): a single dark pit in the middle of what there is
        y, x = _random_point(rng, inner).astype(int)
        mask[y, x] = True
        out = scene.image.copy()
        out[y, x] *= 0.3
    return _to_uint8(out), mask


# ----------------------------------------------------------------------------------------------------------------
# dataset writer and CLI


def _write_png(array: _Array, path: Path) -> None:
    """Write a PNG next to its final name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def generate_demo_dataset(
    root: str | Path,
    *,
    seed: int = 0,
    n_train_good: int = 80,
    n_test_good: int = 24,
    n_test_per_defect: int = 8,
    height: int = 96,
    width: int = 96,
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> DemoDataset:
    """Write a demo dataset in the MVTec AD layout under ``root`` and say what was written.

    ``root/train/good``, ``root/test/good``, ``root/test/<defect>`` and ``root/ground_truth/<defect>/NNN_mask.png``
    (L mode, values 0 and 255). Only the files it generates are overwritten; other files under ``root`` are left
    alone. Each image has its own random stream derived from ``seed``, its split and its index (and the defect
    type's position in :data:`DEFECT_TYPES`), so the output is byte-identical for the same arguments, and asking
    for fewer images or fewer defect types never changes the images that remain.
    """
    unknown = [d for d in defect_types if d not in _RENDERERS]
    if unknown:
        raise ValueError(f"unknown defect type(s) {unknown}; expected some of {list(DEFECT_TYPES)}")
    if min(n_train_good, n_test_good, n_test_per_defect) < 0:
        raise ValueError("image counts must be >= 0")
    root = Path(root)
    digits = max(3, len(str(max(n_train_good, n_test_good, n_test_per_defect, 1) - 1)))

    def name(i: int) -> str:
        return f"{i:0{digits}d}"

    for split, folder, n in ((_SPLIT_TRAIN_GOOD, "train", n_train_good), (_SPLIT_TEST_GOOD, "test", n_test_good)):
        for i in range(n):
            rng = np.random.default_rng([seed, split, i])
            _write_png(render_good_part(rng, height, width), root / folder / "good" / f"{name(i)}.png")
    counts: dict[str, int] = {}
    for kind in dict.fromkeys(defect_types):
        type_index = DEFECT_TYPES.index(kind)
        for i in range(n_test_per_defect):
            rng = np.random.default_rng([seed, _SPLIT_TEST_DEFECT, type_index, i])
            image, mask = add_defect(render_good_part(rng, height, width), kind, rng)
            _write_png(image, root / "test" / kind / f"{name(i)}.png")
            _write_png(np.where(mask, 255, 0).astype(np.uint8), root / "ground_truth" / kind / f"{name(i)}_mask.png")
        counts[kind] = n_test_per_defect
    return DemoDataset(root=root, n_train_good=n_train_good, n_test_good=n_test_good, defect_counts=counts)


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 96x96 or 96, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 16:
        raise argparse.ArgumentTypeError(f"size must be HxW with both sides >= 16, got {text!r}")
    return values[0], values[1]


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m models.demo_data OUT [--seed N] [--size HxW] [--train N] [--test-good N] [--per-defect N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m models.demo_data",
        description="Write a synthetic inspection dataset (turned flange, six defect types) in the MVTec AD layout.",
    )
    parser.add_argument("out", type=Path, help="output folder (created; only generated files are overwritten)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_parse_size, default=(96, 96), metavar="HxW", help="image size (default 96x96)")
    parser.add_argument("--train", type=int, default=80, metavar="N", help="good training images (default 80)")
    parser.add_argument("--test-good", type=int, default=24, metavar="N", help="good test images (default 24)")
    parser.add_argument(
        "--per-defect", type=int, default=8, metavar="N", help="test images per defect type (default 8)"
    )
    parser.add_argument(
        "--defects",
        default=",".join(DEFECT_TYPES),
        help=f"comma-separated defect types (default {','.join(DEFECT_TYPES)})",
    )
    args = parser.parse_args(argv)
    defects = [d.strip() for d in args.defects.split(",") if d.strip()]
    if any(d not in _RENDERERS for d in defects) or min(args.train, args.test_good, args.per_defect) < 0:
        parser.print_usage(sys.stderr)
        print(f"error: defect types must be among {','.join(DEFECT_TYPES)} and counts >= 0", file=sys.stderr)
        return 2
    height, width = args.size
    ds = generate_demo_dataset(
        args.out,
        seed=args.seed,
        n_train_good=args.train,
        n_test_good=args.test_good,
        n_test_per_defect=args.per_defect,
        height=height,
        width=width,
        defect_types=defects,
    )
    n_defect = sum(ds.defect_counts.values())
    print(
        f"{ds.root}: {ds.n_train_good} train good, {ds.n_test_good} test good, {n_defect} defective "
        f"({', '.join(f'{k} {v}' for k, v in ds.defect_counts.items())})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
