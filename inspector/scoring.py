"""Anomaly score of a part: its distance to the nearest golden references, and the verdict against a threshold.

Two granularities share one code path. *Image* embeddings (N, D): the score is the distance to the k nearest
reference embeddings. *Patch* embeddings (N, P, D): every patch of the part is compared with a bank of patches
of the golden parts and the part's score is its worst patch (a small scratch is one far patch, which an
image-level average would dilute). Pure numpy, so the line, training-time evaluation and the registry's pyfunc
share one implementation. Queries and the bank are scanned in chunks, so a bank of 100,000 references never
needs a full queries x references matrix in memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Aggregation = Literal["mean", "max", "min"]


@dataclass(frozen=True)
class ScoringConfig:
    """How distances to the references become one score (stored in the bundle)."""

    distance: Literal["euclidean"] = "euclidean"
    k: int = 1
    aggregation: Aggregation = "mean"
    patch_aggregation: Literal["max"] = "max"
    chunk_size: int = 8192

    def __post_init__(self) -> None:
        if self.distance != "euclidean":
            raise ValueError(f"unknown distance {self.distance!r}: only 'euclidean' is supported")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.aggregation not in ("mean", "max", "min"):
            raise ValueError(f"unknown aggregation {self.aggregation!r}: use mean, max or min")
        if self.patch_aggregation != "max":
            raise ValueError(f"unknown patch aggregation {self.patch_aggregation!r}: only 'max' is supported")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoringConfig":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def knn_distances(queries: np.ndarray, references: np.ndarray, k: int = 1, chunk_size: int = 8192) -> np.ndarray:
    """Euclidean distances from each query to its k nearest references, ascending: shape (Q, k).

    Queries go in blocks of 1024 and the bank in chunks of ``chunk_size`` rows, keeping a running top-k, so memory
    stays at about ``1024 × chunk_size`` floats whatever the sizes.
    """
    q = np.asarray(queries, dtype=np.float32)
    r = np.asarray(references, dtype=np.float32)
    if q.ndim != 2 or r.ndim != 2:
        raise ValueError(f"queries and references must be 2-D, got {q.shape} and {r.shape}")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"embedding sizes differ: queries {q.shape[1]}, references {r.shape[1]}")
    if len(r) == 0:
        raise ValueError("the reference bank is empty: add golden references first")
    r_sq = np.einsum("ij,ij->i", r, r)
    block = 1024
    out = [_knn_block(q[i : i + block], r, r_sq, min(k, len(r)), chunk_size) for i in range(0, len(q), block)]
    return np.concatenate(out) if out else np.zeros((0, min(k, len(r))), np.float32)


def _knn_block(q: np.ndarray, r: np.ndarray, r_sq: np.ndarray, k: int, chunk_size: int) -> np.ndarray:
    """k smallest squared distances of a block of queries, via |r|² − 2q·r (|q|² is added once at the end)."""
    best = np.full((len(q), 0), np.inf, dtype=np.float32)
    for start in range(0, len(r), chunk_size):
        partial = q @ r[start : start + chunk_size].T
        partial *= -2.0
        partial += r_sq[None, start : start + chunk_size]
        if k == 1:
            best = partial.min(axis=1, keepdims=True) if best.shape[1] == 0 else np.minimum(best, partial.min(axis=1, keepdims=True))
            continue
        merged = np.concatenate([best, partial], axis=1)
        if merged.shape[1] > k:
            merged = np.take_along_axis(merged, np.argpartition(merged, k - 1, axis=1)[:, :k], axis=1)
        best = merged
    best.sort(axis=1)
    best += np.einsum("ij,ij->i", q, q)[:, None]
    return np.sqrt(np.maximum(best, 0.0))


def patch_distances(embeddings: np.ndarray, references: np.ndarray, config: ScoringConfig | None = None) -> np.ndarray:
    """Per-query (image mode, shape (N,)) or per-patch (patch mode, shape (N, P)) distance to the references.

    ``references`` is a 2-D bank (M, D); a 3-D stack of reference patch embeddings (R, P, D) is flattened to one.
    """
    cfg = config or ScoringConfig()
    emb = np.asarray(embeddings, dtype=np.float32)
    bank = np.asarray(references, dtype=np.float32)
    if bank.ndim == 3:
        bank = bank.reshape(-1, bank.shape[-1])
    if emb.ndim not in (2, 3):
        raise ValueError(f"embeddings must be (N, D) or (N, P, D), got shape {emb.shape}")
    flat = emb.reshape(-1, emb.shape[-1])
    agg = {"mean": np.mean, "max": np.max, "min": np.min}[cfg.aggregation]
    d = agg(knn_distances(flat, bank, k=cfg.k, chunk_size=cfg.chunk_size), axis=1).astype(np.float32)
    return d.reshape(emb.shape[:-1])


def anomaly_scores(embeddings: np.ndarray, references: np.ndarray, config: ScoringConfig | None = None) -> np.ndarray:
    """One score per image (higher = more anomalous): distance to the golden references, worst patch in patch mode."""
    if len(embeddings) == 0:
        return np.zeros((0,), dtype=np.float32)
    d = patch_distances(embeddings, references, config)
    return d if d.ndim == 1 else d.max(axis=1)


def verdicts(scores: np.ndarray, threshold: float) -> np.ndarray:
    """True where a part is flagged as anomalous (score strictly above the threshold)."""
    return np.asarray(scores) > threshold
