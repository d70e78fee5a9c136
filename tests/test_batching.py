"""Requests scored together when they queue behind a running batch: same results as alone, in order, errors kept
to the request they belong to, through a real Inspector on a real ONNX bundle."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")  # the batcher lives in the service package, which needs the serve extra

from inspector.engine import Inspector
from inspector.service.batching import RequestBatcher


def _parts(seed: int, n: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(n)]


def test_queued_requests_are_combined_and_each_gets_its_own_results(tiny_bundle: Path) -> None:
    inspector = Inspector.from_bundle(tiny_bundle, threads=1)
    seen: list[tuple[int, int]] = []
    batcher = RequestBatcher(max_images=8, on_batch=lambda requests, images: seen.append((requests, images)))
    requests = [_parts(seed, 1 + seed % 3) for seed in range(48)]  # 1 to 3 parts a request
    alone = [[r.score for r in inspector.score(images)] for images in requests]
    start = threading.Barrier(12)

    def one(i: int) -> list[float]:
        if i < 12:
            start.wait()  # twelve cameras post at once: most of them queue behind the first batch
        return [r.score for r in batcher.score(inspector, requests[i])]

    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(one, range(len(requests))))

    for got, expected in zip(together, alone):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert sum(r for r, _ in seen) == len(requests) == batcher.requests
    assert sum(n for _, n in seen) == sum(map(len, requests))
    assert max(n for _, n in seen) <= 8 and len(seen) < len(requests)  # combined, never past the cap
    assert not batcher._busy and not batcher._queue  # nobody left leading or waiting


def test_a_failing_request_fails_alone(tiny_bundle: Path) -> None:
    """A source ``Inspector.score`` cannot even name (not a path, bytes or image) raises; the requests it was
    combined with are scored alone and answered."""
    inspector = Inspector.from_bundle(tiny_bundle, threads=1)
    batcher = RequestBatcher(max_images=16)
    requests: list[list[object]] = [list(_parts(seed, 2)) for seed in range(10)]
    requests[3] = [object()]
    start = threading.Barrier(10)

    def one(i: int) -> object:
        start.wait()
        try:
            return [r.score for r in batcher.score(inspector, requests[i])]
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(one, range(10)))

    assert isinstance(outcomes[3], Exception)
    for i, got in enumerate(outcomes):
        if i != 3:
            np.testing.assert_allclose(got, [r.score for r in inspector.score(requests[i])], rtol=1e-4, atol=1e-5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        RequestBatcher(0)
