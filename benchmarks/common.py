"""What the benchmarks share: best-of-N timing, the JSON file each writes its figures to, and stand-in weights for
trunks whose pretrained files this machine cannot fetch."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` calls of ``fn`` after one warm-up call: the least disturbed by other jobs."""
    fn()
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved_rates(
    fns: Mapping[str, Callable[[], object]], items: Mapping[str, int], rounds: int = 5
) -> dict[str, float]:
    """Best-of-``rounds`` items per second of several functions measured in turn, so that load from other jobs
    falls on all of them alike (``items``: how many each call processes)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: items[name] / best[name] for name in fns}


def write_json(path: Path | None, figures: Mapping[str, Any]) -> None:
    """Write ``figures`` to ``path`` (nothing without one): what scripts and the smoke tests read back."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=float) + "\n")


def generated_weights(backbone: str, folder: Path, seed: int = 0) -> Path:
    """A weights file of ``backbone``'s own names and shapes, from its builder's seeded random init: a stand-in for a
    pretrained file, so the trunk loads and freezes as it would with real weights (speed does not depend on the
    values). Written once per folder."""
    import torch

    from models.backbones import build_backbone

    path = folder / f"{backbone}-generated-{seed}.pth"
    if not path.is_file():
        torch.manual_seed(seed)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(build_backbone(backbone).state_dict(), path)
    return path
