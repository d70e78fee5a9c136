"""The whole-part score: how unlikely a part's overall feature statistics are under the golden parts' Gaussian.

Why: the patch score (inspector.scoring) is a part's worst patch, which finds a local defect but not a part that
is off all over — low-contrast shading, a spread of fine cracks — where every patch is near *some* good patch.
The model also outputs a descriptor of the whole part (per late backbone stage, each channel's mean and standard
deviation over the part); a Gaussian fitted to the golden parts' descriptors scores it by Mahalanobis distance
(Rippel et al. 2020). On the magnetic tiles, frozen features, every defect image: patch score 0.75 image AUROC,
this score 0.84, the two fused 0.87, cracks 0.60 → 0.86 and uneven shading 0.57 → 0.82 (benchmarks/README.md).

It stays a golden-reference model: the Gaussian is refitted from the reference descriptors whenever the bundle is
loaded, so adding golden parts needs no retraining. Covariance: Ledoit-Wolf shrinkage (a few hundred references
for up to a few thousand channels), inverted through the Woodbury identity, so fitting costs one n x n solve per
stage and scoring one n-vector per part. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from inspector.errors import InspectorError

#: how the patch and whole-part scores become one (inspector.scorer), each standardised on the calibration goods:
#: their mean (the default: a part off a little in both views counts, and a view that is noise for a product costs
#: less than under the max), the larger ("max": no part hides behind its good view), or the whole-part view alone
#: ("part": where calibration's evidence showed the patch view only adding noise; the patch view still draws the
#: heatmap). Measured on later goods in docs/decisions.md, "Views chosen on the same evidence".
COMBINE = "mean"
COMBINES = (COMBINE, "max", "part")
#: what a bundle that names no rule was fused by (bundles written before the rule was recorded)
LEGACY_COMBINE = "max"


@dataclass(frozen=True)
class _Block:
    """One stage's Gaussian: mean, centred references X, and what Woodbury needs of the shrunk covariance
    ``a·I + b·XᵀX``: ``a`` and ``M = (I/b + X·Xᵀ/a)⁻¹`` (None when b = 0, an isotropic covariance)."""

    mean: np.ndarray
    centred: np.ndarray
    a: float
    m: np.ndarray | None


def ledoit_wolf_shrinkage(centred: np.ndarray) -> tuple[float, float]:
    """(shrinkage, mu) of Ledoit & Wolf (2004) for centred samples (n, p): the covariance used is
    ``(1 - shrinkage)·XᵀX/n + shrinkage·mu·I``. Computed from the n x n Gram matrix, so p may exceed n."""
    n, p = centred.shape
    sq_norms = np.einsum("ij,ij->i", centred, centred)
    mu = float(sq_norms.sum()) / (n * p)
    gram = centred @ centred.T
    delta_ = float(np.sum(gram * gram)) / n**2  # ||S||_F^2
    beta_ = float(np.sum(sq_norms**2))
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * float(sq_norms.sum()) / n + p * mu**2) / p
    beta = min(beta, delta)
    return (0.0 if beta <= 0 or delta <= 0 else beta / delta), mu


def _fit_block(x: np.ndarray) -> _Block:
    n = len(x)
    mean = x.mean(axis=0)
    centred = x - mean
    shrinkage, mu = ledoit_wolf_shrinkage(centred)
    a = max(shrinkage * mu, 1e-6 * mu, 1e-12)  # a floor keeps a rank-deficient covariance invertible
    b = (1.0 - shrinkage) / n
    if b <= 0:
        return _Block(mean, centred, a, None)
    m = np.linalg.inv(np.eye(n) / b + (centred @ centred.T) / a)
    return _Block(mean, centred, a, m)


class GaussianDensity:
    """Gaussians over the golden parts' descriptors, one per block of columns (a backbone stage), scored by the sum
    of the blocks' Mahalanobis distances."""

    def __init__(self, descriptors: np.ndarray, blocks: Sequence[int]) -> None:
        x = np.asarray(descriptors, dtype=np.float64)
        blocks = [int(b) for b in blocks]
        if x.ndim != 2 or len(x) < 2:
            raise InspectorError(f"the whole-part Gaussian needs at least 2 reference descriptors, got shape {x.shape}")
        if any(b < 1 for b in blocks) or sum(blocks) != x.shape[1]:
            raise InspectorError(f"descriptor blocks {blocks} do not add up to the descriptors' {x.shape[1]} columns")
        if not np.all(np.isfinite(x)):
            raise InspectorError("reference descriptors contain NaN or infinite values")
        self.blocks = tuple(blocks)
        edges = np.cumsum([0, *blocks])
        self._slices = [slice(int(s), int(e)) for s, e in pairwise(edges)]
        self._fits = [_fit_block(x[:, s]) for s in self._slices]

    @property
    def dim(self) -> int:
        return sum(self.blocks)

    def distances(self, descriptors: np.ndarray) -> np.ndarray:
        """(N,) the sum over blocks of each part's Mahalanobis distance to the golden parts' Gaussian."""
        q = np.asarray(descriptors, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InspectorError(f"descriptors must be (N, {self.dim}), got shape {q.shape}")
        total = np.zeros(len(q))
        for s, fit in zip(self._slices, self._fits):
            d = q[:, s] - fit.mean
            sq = np.einsum("ij,ij->i", d, d) / fit.a
            if fit.m is not None:
                v = d @ fit.centred.T
                sq -= np.einsum("ij,ij->i", v @ fit.m, v) / fit.a**2
            total += np.sqrt(np.maximum(sq, 0.0))
        return total


@dataclass(frozen=True)
class ScoreScale:
    """Where a score's good parts sit: their median and spread (interquartile range), from the calibration goods."""

    median: float
    spread: float

    @classmethod
    def of(cls, good_scores: np.ndarray) -> ScoreScale:
        values = np.asarray(good_scores, dtype=np.float64)
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise InspectorError("a score scale needs at least one finite calibration score")
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        floor = max(1e-9, 1e-6 * abs(float(median)))
        return cls(float(median), max(float(q3 - q1), floor))

    def standardise(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, dtype=np.float64) - self.median) / self.spread

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "spread": self.spread}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreScale:
        return cls(float(data["median"]), float(data["spread"]))


@dataclass(frozen=True)
class DensitySpec:
    """The whole-part score's settings in the bundle: descriptor blocks, the two scales, one id per descriptor row."""

    blocks: tuple[int, ...]
    patch_scale: ScoreScale
    density_scale: ScoreScale
    ids: tuple[str, ...] = ()
    combine: str = COMBINE

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": list(self.blocks),
            "patch_scale": self.patch_scale.to_dict(),
            "density_scale": self.density_scale.to_dict(),
            "ids": list(self.ids),
            "combine": self.combine,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DensitySpec:
        combine = str(data.get("combine", LEGACY_COMBINE))
        if combine not in COMBINES:
            raise ValueError(f"unknown density combine rule {combine!r}: this inspector knows {', '.join(COMBINES)}")
        return cls(
            tuple(int(b) for b in data["blocks"]),
            ScoreScale.from_dict(data["patch_scale"]),
            ScoreScale.from_dict(data["density_scale"]),
            tuple(str(i) for i in data.get("ids", [])),
            combine,
        )
