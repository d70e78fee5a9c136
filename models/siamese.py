"""The Siamese network: one shared embedder (backbone, pooling, projection head, L2 norm) applied to both inputs.

The network knows nothing of training (the loop lives in ``models.training``): like anomalib's ``torch_model``, it
is a plain module with a typed constructor whose defaults work. The embedder alone is what gets exported to ONNX
and run on the line; the Siamese wrapper only exists for pair training and for computing a pair's distance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import build_backbone, freeze_stages

Pooling = Literal["avg", "max", "gem"]


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
    embedding_dim: int = 128
    hidden_dim: int = 512
    pooling: Pooling = "gem"
    trainable_stages: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbedderConfig":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Embedder(nn.Module):
    """Image batch (N,3,H,W) → L2-normalised embedding (N,D). Shared by both branches of the Siamese network."""

    def __init__(self, backbone: nn.Module, embedding_dim: int = 128, hidden_dim: int = 512, pooling: Pooling = "gem") -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = make_pooling(pooling)
        channels = int(backbone.out_channels)
        self.head = nn.Sequential(nn.Linear(channels, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, embedding_dim))
        self.embedding_dim = embedding_dim

    def features(self, x: Tensor) -> Tensor:
        """The backbone's spatial feature map (N,C,h,w), kept apart for patch-level scoring."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(self.pool(self.features(x)))
        return F.normalize(z.float(), p=2.0, dim=1)


class SiameseNetwork(nn.Module):
    """Two weight-sharing branches: ``forward(x1, x2)`` returns the Euclidean distance of each pair's embeddings."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def embed(self, x: Tensor) -> Tensor:
        return self.embedder(x)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        z = self.embedder(torch.cat([x1, x2]))
        z1, z2 = z[: len(x1)], z[len(x1) :]
        return pair_distance(z1, z2)


def pair_distance(z1: Tensor, z2: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance per row, with a finite gradient when the two embeddings coincide."""
    return (z1 - z2).pow(2).sum(dim=1).clamp_min(eps).sqrt()


def build_embedder(config: EmbedderConfig | None = None, *, weights: str | Path | None | Literal["config"] = "config") -> Embedder:
    """Build an embedder from its config; ``weights`` overrides the backbone weights (e.g. None when loading a checkpoint)."""
    cfg = config or EmbedderConfig()
    backbone_weights = cfg.weights if weights == "config" else weights
    backbone = build_backbone(cfg.backbone, weights=backbone_weights)
    if backbone_weights is not None:
        freeze_stages(backbone, cfg.trainable_stages)
    return Embedder(backbone, embedding_dim=cfg.embedding_dim, hidden_dim=cfg.hidden_dim, pooling=cfg.pooling)
