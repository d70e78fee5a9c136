"""The Siamese network: one shared embedder (backbone, projection head, L2 norm) applied to both inputs.

Two granularities. ``patch`` (the default): mid-level backbone features (a small scratch is a local event;
global pooling dilutes it below the part-to-part variation) are fused, given a little neighbourhood context,
projected per location and L2-normalised: (N, P, D), one embedding per patch. ``global``: pooled features through
an MLP head, (N, D). The network knows nothing of training (the loop lives in ``models.training``): like
anomalib's ``torch_model``, it is a plain module with a typed constructor whose defaults work. The embedder alone
is what gets exported to ONNX and run on the line.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import Backbone, build_backbone, freeze_stages, head_stages

log = logging.getLogger(__name__)

Pooling = Literal["avg", "max", "gem"]
Mode = Literal["patch", "global"]


class GeM(nn.Module):
    """Generalised-mean pooling: between average (p=1) and max (p→∞); keeps small bright responses visible."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p).flatten(1)


def make_pooling(kind: Pooling) -> nn.Module:
    if kind == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if kind == "max":
        return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1))
    if kind == "gem":
        return GeM()
    raise ValueError(f"unknown pooling {kind!r}: use avg, max or gem")


@dataclass(frozen=True)
class EmbedderConfig:
    """Everything needed to rebuild an embedder (recorded in checkpoints, MLflow and the bundle)."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = "imagenet"
    mode: Mode = "patch"
    feature_stages: tuple[int, ...] = (3, 4)
    context: int = 1
    embedding_dim: int = 128
    hidden_dim: int = 512
    pooling: Pooling = "gem"
    trainable_stages: int = (
        0  # patch mode: stages before the deepest feature stage stay frozen; 0 = projection head only
    )
    keep_pretrained: bool = (
        True  # patch mode: each patch embedding carries the backbone's own features beside the head's
    )
    learned_weight: float = (
        0.5  # with keep_pretrained: the head's share of the joined squared distance (see PatchEmbedder)
    )
    density_stages: int = (
        4  # patch mode: the backbone's last N stages, pooled over the part, describe it whole (0 = off)
    )
    # the whole-part view leaves out the trunk's last N stages (then never run); None: its classifier head conv, where
    # it has one (models.backbones.head_stages)
    density_skip: int | None = None
    # the whole-part view's stages after the deepest feature stage run on its map average-pooled k x k: k² times
    # fewer cells through the costliest stages (a CNN trunk only)
    density_pool: int = 1
    density_downscales: tuple[int, ...] = ()  # the whole-part descriptor also from the input average-pooled k x k
    allow_download: bool = False  # weights="imagenet" not on this machine: fetch it (else a clear error)

    def __post_init__(self) -> None:
        if self.mode not in ("patch", "global"):
            raise ValueError(f"unknown embedder mode {self.mode!r}: use 'patch' or 'global'")
        if self.mode == "patch" and not self.feature_stages:
            raise ValueError("patch mode needs at least one feature stage")
        object.__setattr__(self, "feature_stages", tuple(int(i) for i in self.feature_stages))
        if not 0.0 < self.learned_weight < 1.0:
            raise ValueError(f"learned_weight must be in (0, 1), got {self.learned_weight}")
        if self.density_stages < 0:
            raise ValueError(f"density_stages must be >= 0 (0 = no whole-part descriptor), got {self.density_stages}")
        if self.density_pool < 1:
            raise ValueError(f"density_pool must be >= 1 (1 = no pooling), got {self.density_pool}")
        if self.density_skip is not None and self.density_skip < 0:
            raise ValueError(f"density_skip must be >= 0 (stages left out at the end), got {self.density_skip}")
        object.__setattr__(self, "density_downscales", tuple(int(k) for k in self.density_downscales))
        if any(k < 2 for k in self.density_downscales) or len(set(self.density_downscales)) != len(
            self.density_downscales
        ):
            raise ValueError(
                f"density_downscales must be distinct factors >= 2 (the full-size pass is always made), "
                f"got {self.density_downscales}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedderConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("keep_pretrained", False)  # configs written before the option existed meant the head alone
        known.setdefault("density_stages", 0)  # nor did they describe the whole part
        known.setdefault("density_downscales", ())  # or did so at the input's own scale only
        known.setdefault("density_skip", 0)  # and ran the trunk to its last stage for it
        known.setdefault("density_pool", 1)  # at full resolution
        return cls(**known)


class Embedder(nn.Module):
    """Image-level embedder: (N,3,H,W) → pooled backbone features → MLP → L2-normalised (N, D)."""

    mode: Mode = "global"

    def __init__(
        self, backbone: Backbone, embedding_dim: int = 128, hidden_dim: int = 512, pooling: Pooling = "gem"
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = make_pooling(pooling)
        channels = int(backbone.out_channels)
        self.head = nn.Sequential(
            nn.Linear(channels, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, embedding_dim)
        )
        self.embedding_dim = embedding_dim

    def features(self, x: Tensor) -> Tensor:
        """The backbone's spatial feature map (N,C,h,w)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(self.pool(self.features(x)))
        return F.normalize(z.float(), p=2.0, dim=1)


class PatchEmbedder(nn.Module):
    """Patch-level embedder: (N,3,H,W) → (N, P, D), one L2-normalised embedding per location of the feature grid.

    Features of ``feature_stages`` (indices into ``backbone.stages``; later stages are never run) are average-pooled
    to the coarsest grid, concatenated, smoothed over a ``context``×``context`` neighbourhood (a defect pixel then
    shows in the patches around it, not just one) and projected by a 1×1 convolution. The projection starts
    orthogonal, so the untrained embedder keeps the pretrained features' geometry, as long as ``embedding_dim`` is at
    least the feature channels; a narrower head starts as a lossy projection (a warning is logged: stages 4+5 of
    Lite0, 192 channels, scored 0.766 untrained at 128-d against 0.811 at 192-d on the magnetic tiles).

    With ``keep_pretrained`` the embedding is the head's output and the backbone's features, each L2-normalised,
    joined and scaled back to unit length: the squared distance between two patches is the mean of the two views'
    squared distances. Training on a few hundred defect photos makes the head over-specialise to the defects it
    saw; the pretrained half still places a never-seen defect far from the references (measured on the magnetic
    tiles: see ``benchmarks/README.md``). It adds no parameters, and untrained it scores exactly like the features.
    """

    mode: Mode = "patch"

    def __init__(
        self,
        backbone: Backbone,
        feature_stages: tuple[int, ...] = (3, 4),
        embedding_dim: int = 128,
        context: int = 1,
        keep_pretrained: bool = True,
        learned_weight: float = 0.5,
        density_stages: int = 0,
        density_downscales: tuple[int, ...] = (),
        density_skip: int = 0,
        density_pool: int = 1,
    ) -> None:
        super().__init__()
        stages = list(backbone.stages)
        if max(feature_stages) >= len(stages) or min(feature_stages) < 0:
            raise ValueError(
                f"feature_stages {feature_stages} out of range: the backbone has stages 0..{len(stages) - 1}"
            )
        self.backbone = backbone
        self.feature_stages = tuple(sorted(feature_stages))
        #: indices of the stages whose pooled statistics form the whole-part descriptor (:meth:`forward_parts`)
        self.density_stages = density_stage_indices(len(stages), density_stages, density_skip)
        if density_pool > 1 and backbone.patch_size > 1:
            raise ValueError("density_pool needs a CNN trunk: a vision transformer's tokens are not a map to pool")
        #: the stages after the deepest feature stage see its map average-pooled this many times (forward_parts)
        self.density_pool = density_pool if self.density_stages else 1
        #: the descriptor is computed again on the input average-pooled by each of these factors (see forward_parts)
        self.density_downscales = tuple(density_downscales) if self.density_stages else ()
        self.context = context
        channels, density_channels = self._channels()
        #: descriptor columns per density stage and scale (each channel's mean and standard deviation): one Gaussian
        #: each, the input's own scale first, then each downscale in order
        self.descriptor_blocks = tuple(2 * c for c in density_channels) * (1 + len(self.density_downscales))
        if embedding_dim < channels:
            log.warning(
                "embedding_dim %d is below the %d feature channels of stages %s: the untrained head is a lossy "
                "projection, not the pretrained features; use embedding_dim >= %d",
                embedding_dim,
                channels,
                self.feature_stages,
                channels,
            )
        self.head = nn.Conv2d(channels, embedding_dim, kernel_size=1)
        nn.init.orthogonal_(self.head.weight)
        assert self.head.bias is not None  # a Conv2d built with its default bias=True
        nn.init.zeros_(self.head.bias)
        self.keep_pretrained = keep_pretrained
        self.learned_weight = learned_weight
        self.embedding_dim = embedding_dim + (channels if keep_pretrained else 0)

    def _channels(self) -> tuple[int, list[int]]:
        """One dry run: the fused feature channels, and the channels of each density stage."""
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            side = -(-64 // self.backbone.patch_size) * self.backbone.patch_size  # a vision transformer: whole patches
            maps = self._stage_maps(torch.zeros(1, 3, side, side), self.density_stages)
            self.backbone.train(was)
        n = len(self.feature_stages)
        return sum(int(m.shape[1]) for m in maps[:n]), [int(m.shape[1]) for m in maps[n:]]

    def _stage_maps(self, x: Tensor, extra: tuple[int, ...] = ()) -> list[Tensor]:
        """The maps of ``feature_stages`` in order, then those of ``extra`` (running only as deep as either needs)."""
        return stage_maps(
            x, self.backbone, self.feature_stages + tuple(extra), (max(self.feature_stages), self.density_pool)
        )

    def features(self, x: Tensor) -> Tensor:
        """Fused multi-stage feature map (N, C, h, w) on the coarsest selected grid, with neighbourhood context."""
        return self._fuse(self._stage_maps(x))

    def _fuse(self, maps: list[Tensor]) -> Tensor:
        h, w = maps[-1].shape[-2:]
        fused = torch.cat([m if m.shape[-2:] == (h, w) else F.adaptive_avg_pool2d(m, (h, w)) for m in maps], dim=1)
        if self.context > 1:
            fused = F.avg_pool2d(fused, self.context, stride=1, padding=self.context // 2, count_include_pad=False)
        return fused

    def forward_map(self, x: Tensor) -> Tensor:
        """Patch embeddings as a map (N, D, h, w), L2-normalised over D."""
        return self._embed(self.features(x))

    def _embed(self, features: Tensor) -> Tensor:
        learned = self.head(features)
        return (
            join_with_pretrained(learned, features, self.learned_weight)
            if self.keep_pretrained
            else F.normalize(learned.float(), p=2.0, dim=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_map(x).flatten(2).transpose(1, 2)

    def forward_parts(self, x: Tensor, placement: Tensor) -> tuple[Tensor, Tensor]:
        """Patch embeddings (N, P, D) and the whole-part descriptor (N, K) from one pass of the backbone.

        ``placement`` (N, 4) is where each part sits on the letterboxed input: left, top, width, height in input
        pixels. The descriptor is, for each of ``density_stages``, the mean and standard deviation of every channel
        over the cells whose centre lies on the part (never the padding), side by side. Why: the worst patch finds
        a local defect, but not a part that is off all over (low-contrast shading, a spread of fine cracks), where
        every patch is near *some* good patch; the statistics of the whole part see that (inspector.density).

        With ``density_downscales`` the same statistics are taken again from a pass over the input average-pooled
        k x k: the same stages then see a k times larger share of the part, so a shading or crack network that
        spans the part changes them more. Off by default: on the magnetic tiles a half-size pass lifted the frozen
        fused score by +0.011 to +0.013 on all 392 defects (`uneven` +0.05) but the trained product split by
        -0.007, for about a quarter of the line's images/s (docs/decisions.md).
        """
        if not self.density_stages:
            raise ValueError("this embedder has no density stages (EmbedderConfig.density_stages = 0)")
        maps = self._stage_maps(x, self.density_stages)
        patches = self._embed(self._fuse(maps[: len(self.feature_stages)])).flatten(2).transpose(1, 2)
        size = (x.shape[-2], x.shape[-1])
        descriptor = [pooled_on_part(m, placement, size) for m in maps[len(self.feature_stages) :]]
        for k in self.density_downscales:  # a downscaled pass needs no patch features
            small = stage_maps(F.avg_pool2d(x, k), self.backbone, self.density_stages)
            descriptor += [pooled_on_part(m, placement, size) for m in small]
        return patches, torch.cat(descriptor, dim=1)


def density_skip_of(cfg: EmbedderConfig) -> int:
    """The stages the whole-part view leaves out at the trunk's end: as set, else the trunk's classifier head conv."""
    return cfg.density_skip if cfg.density_skip is not None else head_stages(cfg.backbone)


def density_stage_indices(n_stages: int, count: int, skip: int = 0) -> tuple[int, ...]:
    """The ``count`` stages that describe the whole part, ending ``skip`` stages before the trunk's last.

    Why a skip: a trunk's last stages are its costliest per pixel of output and the least needed to see a part as a
    whole; on Lite0 the 1280-channel head conv alone is a fifth of the default line model's forward
    (benchmarks/README.md, "A cheaper whole-part view")."""
    if count <= 0:
        return ()
    end = n_stages - skip
    if end < 1:
        raise ValueError(f"density_skip={skip} leaves none of the trunk's {n_stages} stages for the whole-part view")
    return tuple(range(max(0, end - count), end))


def stage_maps(x: Tensor, backbone: Backbone, order: tuple[int, ...], pool: tuple[int, int] = (0, 1)) -> list[Tensor]:
    """The output maps (N, C, h, w) of the stages numbered in ``order`` (in that order), running only as deep as the
    deepest; a vision transformer's token outputs are laid back on its patch grid (``Backbone.feature_map``).
    ``pool`` = (stage, k): the stages after that one run on its output average-pooled k x k (partial cells kept)."""
    wanted = set(order)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    found: dict[int, Tensor] = {}
    after, k = pool
    for i, stage in enumerate(backbone.stages[: max(wanted) + 1]):
        x = stage(x)
        if i in wanted:
            found[i] = backbone.feature_map(x, size)
        if i == after and k > 1:
            x = F.avg_pool2d(x, k, ceil_mode=True)
    return [found[i] for i in order]


def on_part_weights(placement: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(N, 1, h, w) 1.0 for the cells of an ``h`` x ``w`` grid over an input of ``size`` whose centre lies inside
    each part's ``placement`` (left, top, width, height), else 0 (the line's patch rule, inspector.preprocess);
    a part too small to cover any centre gets every cell."""
    (h, w), (height, width) = grid, size
    # whole numbers on both sides, as inspector.preprocess.cells_on_part compares them (exact in float32)
    ys = (2.0 * torch.arange(h, dtype=torch.float32, device=placement.device) + 1.0) * height
    xs = (2.0 * torch.arange(w, dtype=torch.float32, device=placement.device) + 1.0) * width
    left, top, part_w, part_h = (placement[:, i, None].float() for i in range(4))
    rows = ((ys[None, :] >= top * (2 * h)) & (ys[None, :] < (top + part_h) * (2 * h))).float()
    cols = ((xs[None, :] >= left * (2 * w)) & (xs[None, :] < (left + part_w) * (2 * w))).float()
    weights = rows[:, None, :, None] * cols[:, None, None, :]
    empty = (weights.sum(dim=(1, 2, 3), keepdim=True) == 0).float()
    return weights + empty * (1.0 - weights)


def pooled_on_part(feature_map: Tensor, placement: Tensor, size: tuple[int, int], eps: float = 1e-6) -> Tensor:
    """(N, 2C): each channel's mean and standard deviation over the on-part cells of ``feature_map`` (N, C, h, w)."""
    weights = on_part_weights(placement, (int(feature_map.shape[-2]), int(feature_map.shape[-1])), size)
    count = weights.sum(dim=(2, 3))
    fmap = feature_map.float()
    mean = (fmap * weights).sum(dim=(2, 3)) / count
    var = (((fmap - mean[:, :, None, None]) ** 2) * weights).sum(dim=(2, 3)) / count
    return torch.cat([mean, (var + eps).sqrt()], dim=1)


def join_with_pretrained(learned: Tensor, features: Tensor, learned_weight: float = 0.5) -> Tensor:
    """Unit-length join of two (N, C, ...) maps, each L2-normalised over C: the squared distance between two joins is
    ``learned_weight`` times the learned squared distance plus the rest times the pretrained one (checked once, by
    :class:`EmbedderConfig`, not on every forward)."""
    return torch.cat(
        [
            F.normalize(learned.float(), p=2.0, dim=1) * learned_weight**0.5,
            F.normalize(features.float(), p=2.0, dim=1) * (1.0 - learned_weight) ** 0.5,
        ],
        dim=1,
    )


class SiameseNetwork(nn.Module):
    """Two weight-sharing branches: ``forward(x1, x2)`` returns each pair's embedding distance D.

    Image embeddings: the Euclidean distance. Patch embeddings: how far the worst patch of ``x2`` is from every
    patch of ``x1`` (x1 the reference, x2 the part under test), the same rule the line scores with.
    """

    def __init__(self, embedder: Embedder | PatchEmbedder) -> None:
        super().__init__()
        self.embedder = embedder

    def embed(self, x: Tensor) -> Tensor:
        return self.embedder(x)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        z = self.embedder(torch.cat([x1, x2]))
        z1, z2 = z[: len(x1)], z[len(x1) :]
        return pair_distance(z1, z2)


def pair_distance(z1: Tensor, z2: Tensor, eps: float = 1e-12) -> Tensor:
    """Distance per pair, with a finite gradient when embeddings coincide.

    (N, D): Euclidean distance per row. (N, P, D): max over the patches of ``z2`` of the distance to the nearest
    patch of ``z1``.
    """
    if z1.dim() == 2:
        return (z1 - z2).pow(2).sum(dim=1).clamp_min(eps).sqrt()
    d2 = (z2.pow(2).sum(-1)[:, :, None] + z1.pow(2).sum(-1)[:, None, :] - 2.0 * z2 @ z1.transpose(1, 2)).clamp_min(eps)
    return d2.min(dim=2).values.max(dim=1).values.sqrt()


def build_embedder(
    config: EmbedderConfig | None = None, *, weights: str | Path | Literal["config"] | None = "config"
) -> Embedder | PatchEmbedder:
    """Build an embedder from its config; ``weights`` overrides the backbone weights (e.g. None when loading a
    checkpoint)."""
    cfg = config or EmbedderConfig()
    backbone_weights = cfg.weights if weights == "config" else weights
    backbone = build_backbone(cfg.backbone, weights=backbone_weights, allow_download=cfg.allow_download)
    if backbone_weights is not None:
        trainable = cfg.trainable_stages
        if cfg.mode == "patch" and trainable >= 0:
            # count from the deepest stage the patch embedder runs; later stages are never used
            trainable += len(backbone.stages) - 1 - max(cfg.feature_stages)
        freeze_stages(backbone, trainable)
    if cfg.mode == "patch":
        return PatchEmbedder(
            backbone,
            feature_stages=cfg.feature_stages,
            embedding_dim=cfg.embedding_dim,
            context=cfg.context,
            keep_pretrained=cfg.keep_pretrained,
            learned_weight=cfg.learned_weight,
            density_stages=cfg.density_stages,
            density_downscales=cfg.density_downscales,
            density_skip=density_skip_of(cfg),
            density_pool=cfg.density_pool,
        )
    return Embedder(backbone, embedding_dim=cfg.embedding_dim, hidden_dim=cfg.hidden_dim, pooling=cfg.pooling)


class FrozenGlobalEmbedder(nn.Module):
    """The training-free baseline: ImageNet backbone, global average pool, L2 norm — no projection, no training.

    Every training run evaluates it on the same test split, so the value added by training is always on record.
    """

    mode: Mode = "global"

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        weights: str | Path | None = "imagenet",
        *,
        allow_download: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, weights=weights, allow_download=allow_download)
        self.embedding_dim = int(self.backbone.out_channels)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.backbone(x).mean(dim=(2, 3)).float(), p=2.0, dim=1)
