"""Greedy k-center coreset: a small bank of reference patches that still covers every normal patch seen.

A patch bank of all golden parts is hundreds of thousands of vectors; scoring cost on the line grows with it.
Random subsampling drops rare-but-normal patches (edges, markings) and turns them into false rejects; the greedy
k-center choice (PatchCore, Roth et al. 2022) keeps the point farthest from the bank at every step, so rare
patches survive. Distances are computed on a random projection to keep the selection fast. Started from centres
already chosen (``given``), it adds only what those miss: the rare patches a random subset left uncovered.
"""

from __future__ import annotations

import numpy as np
import torch


def greedy_coreset(
    points: np.ndarray,
    size: int,
    *,
    given: np.ndarray | None = None,
    projection_dim: int = 64,
    seed: int = 0,
    block: int = 65536,
) -> np.ndarray:
    """Indices of ``size`` points chosen by greedy k-center (farthest-point) selection, sorted; all if fewer.

    ``given``: indices of centres already in the bank; the choice then starts from them and returns only new
    indices (never one of ``given``), each the point farthest from everything chosen so far.
    """
    n = len(points)
    taken = np.unique(np.asarray(given, dtype=np.int64)) if given is not None else np.zeros(0, np.int64)
    if taken.size and (taken.min() < 0 or taken.max() >= n):
        raise ValueError(f"given centre indices must be in [0, {n}), got {taken.min()}..{taken.max()}")
    if size >= n - len(taken):
        return np.setdiff1d(np.arange(n), taken)
    if size < 1:
        raise ValueError(f"coreset size must be >= 1, got {size}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    if x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=gen) / projection_dim**0.5
        x = x @ proj
    sq = (x * x).sum(1)
    min_d = torch.full((n,), float("inf"))
    for start in range(0, len(taken), 256):  # distance of every point to its nearest given centre
        c = x[torch.from_numpy(taken[start : start + 256])]
        d = (sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min(0).min(1).values
        torch.minimum(min_d, d, out=min_d)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = int(torch.argmax(min_d)) if len(taken) else int(torch.randint(n, (1,), generator=gen))
    for i in range(1, size + 1):
        c = x[chosen[i - 1]]
        d = (sq - 2.0 * (x @ c) + (c * c).sum()).clamp_min(0)
        torch.minimum(min_d, d, out=min_d)
        if i == size:
            break
        chosen[i] = int(torch.argmax(min_d))
    return np.sort(chosen)
