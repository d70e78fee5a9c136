"""ONNX export of the embedder and the parity check that proves the line computes what torch computed.

The exported file is a single ``model.onnx`` (weights inside, no side ``.data`` file), input ``images``
(N,3,H,W float32, dynamic batch), output ``embeddings`` (N,D) or (N,P,D). A patch embedder with density stages
also takes ``placement`` (N,4: left, top, width, height of each part on the input) and outputs ``descriptor``
(N,K), the whole-part statistics (``PatchEmbedder.forward_parts``). Parity is checked on real, preprocessed images
through onnxruntime; a mismatch raises :class:`ParityError` instead of shipping a model that scores differently.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from inspector.durable import replace_durably
from inspector.preprocess import full_placement
from models.siamese import PatchEmbedder

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
PLACEMENT_NAME = "placement"
DESCRIPTOR_NAME = "descriptor"


class ParityError(RuntimeError):
    """ONNX and torch disagree on the same inputs beyond tolerance."""


class _ExportWrapper(nn.Module):
    """Gives the exported graph a stable argument name (``x``) whatever the embedder's forward calls it."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder(x)


class _PartsWrapper(nn.Module):
    """Patch embeddings and the whole-part descriptor, arguments ``x`` and ``placement``."""

    def __init__(self, embedder: PatchEmbedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, x: torch.Tensor, placement: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder.forward_parts(x, placement)


def describes_parts(embedder: nn.Module) -> bool:
    """Whether ``embedder`` also outputs a whole-part descriptor (a patch embedder with density stages)."""
    return bool(getattr(embedder, "density_stages", ()))


def export_onnx(embedder: nn.Module, path: str | Path, *, height: int, width: int, dynamo: bool = True) -> Path:
    """Export ``embedder`` (in eval mode, on CPU, float32) to ``path`` atomically; returns the path.

    ``dynamo=True`` (torch's default exporter, needs onnxscript); ``dynamo=False`` is the legacy TorchScript
    exporter, kept as a fallback for architectures the new one rejects.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    was_training = embedder.training
    device = next(embedder.parameters()).device
    parts = describes_parts(embedder)
    wrapper = _PartsWrapper(cast(PatchEmbedder, embedder)) if parts else _ExportWrapper(embedder)
    model = wrapper.cpu().float().eval()
    dummy: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, height, width),)
    inputs, outputs = [INPUT_NAME], [OUTPUT_NAME]
    batch = torch.export.Dim("batch")
    shapes: dict[str, Any] = {"x": {0: batch}}
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if parts:
        dummy += (torch.from_numpy(full_placement(2, height, width)),)
        inputs.append(PLACEMENT_NAME)
        outputs.append(DESCRIPTOR_NAME)
        shapes["placement"] = {0: batch}
        axes.update({PLACEMENT_NAME: {0: "batch"}, DESCRIPTOR_NAME: {0: "batch"}})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(
                    model,
                    dummy,
                    input_names=inputs,
                    output_names=outputs,
                    dynamic_shapes=shapes,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                    optimize=True,
                )
                assert program is not None  # the dynamo exporter always returns its program
                program.save(str(tmp), external_data=False)
            else:
                torch.onnx.export(
                    model,
                    dummy,
                    str(tmp),
                    input_names=inputs,
                    output_names=outputs,
                    dynamic_axes=axes,
                    opset_version=17,
                    dynamo=False,
                )
        replace_durably(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        embedder.to(device).train(was_training)
    return path


def onnx_outputs(path: str | Path, batch: np.ndarray, placement: np.ndarray | None = None) -> list[np.ndarray]:
    """Every output of the exported model on a float32 NCHW batch (onnxruntime, CPU); a model that takes
    ``placement`` gets the one given, or parts filling the whole input."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)}
    if any(i.name == PLACEMENT_NAME for i in session.get_inputs()):
        feed[PLACEMENT_NAME] = (
            full_placement(len(batch), *batch.shape[-2:]) if placement is None else np.asarray(placement, np.float32)
        )
    return session.run(None, feed)


def onnx_embed(path: str | Path, batch: np.ndarray) -> np.ndarray:
    """Run the exported model on a float32 NCHW batch with onnxruntime's CPU provider: the embeddings."""
    return onnx_outputs(path, batch)[0]


@torch.no_grad()
def check_parity(
    embedder: nn.Module, path: str | Path, batch: np.ndarray, *, atol: float = 1e-4, placement: np.ndarray | None = None
) -> float:
    """Max |torch − onnxruntime| over ``batch`` (real preprocessed images) and, for a model that describes whole
    parts, over their descriptors (relative to each descriptor's scale); raises ParityError above ``atol``."""
    if len(batch) == 0:
        raise ValueError("parity check needs at least one image")
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    parts = describes_parts(embedder)
    if parts and placement is None:
        placement = full_placement(len(batch), *batch.shape[-2:])
    was_training = embedder.training
    device = next(embedder.parameters()).device
    embedder.cpu().float().eval()
    try:
        expected = (
            [t.numpy() for t in cast(PatchEmbedder, embedder).forward_parts(x, torch.from_numpy(placement))]
            if parts
            else [embedder(x).numpy()]
        )
    finally:
        embedder.to(device).train(was_training)
    actual = onnx_outputs(path, batch, placement)
    names = [OUTPUT_NAME, DESCRIPTOR_NAME]
    diffs = []
    for name, a, e in zip(names, actual, expected):
        if a.shape != e.shape:
            raise ParityError(f"{path}: ONNX output {name!r} shape {a.shape} differs from torch {e.shape}")
        scale = (
            max(1.0, float(np.max(np.abs(e)))) if name == DESCRIPTOR_NAME else 1.0
        )  # raw features are not unit-length
        diffs.append(float(np.max(np.abs(a - e))) / scale)
    diff = max(diffs)
    if not diff <= atol:
        raise ParityError(f"{path}: ONNX and torch embeddings differ by {diff:.3g} (> {atol:g}) on {len(batch)} images")
    log.info("ONNX parity on %d images: max abs diff %.2e", len(batch), diff)
    return diff
