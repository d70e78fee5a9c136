"""ONNX export of the embedder and the parity check that proves the line computes what torch computed.

The exported file is a single ``model.onnx`` (weights inside, no side ``.data`` file), input ``images``
(N,3,H,W float32, dynamic batch), output ``embeddings`` (N,D). Parity is checked on real, preprocessed images
through onnxruntime; a mismatch raises :class:`ParityError` instead of shipping a model that scores differently.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


class ParityError(RuntimeError):
    """ONNX and torch disagree on the same inputs beyond tolerance."""


class _ExportWrapper(nn.Module):
    """Gives the exported graph a stable argument name (``x``) whatever the embedder's forward calls it."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder(x)


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
    model = _ExportWrapper(embedder).cpu().float().eval()
    dummy = torch.zeros(2, 3, height, width)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(
                    model,
                    (dummy,),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                    optimize=True,
                )
                program.save(str(tmp), external_data=False)
            else:
                torch.onnx.export(
                    model,
                    (dummy,),
                    str(tmp),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        embedder.to(device).train(was_training)
    return path


def onnx_embed(path: str | Path, batch: np.ndarray) -> np.ndarray:
    """Run the exported model on a float32 NCHW batch with onnxruntime's CPU provider."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


@torch.no_grad()
def check_parity(embedder: nn.Module, path: str | Path, batch: np.ndarray, *, atol: float = 1e-4) -> float:
    """Max |torch − onnxruntime| over ``batch`` (real preprocessed images); raises ParityError above ``atol``."""
    if len(batch) == 0:
        raise ValueError("parity check needs at least one image")
    was_training = embedder.training
    device = next(embedder.parameters()).device
    embedder.cpu().float().eval()
    try:
        expected = embedder(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()
    finally:
        embedder.to(device).train(was_training)
    actual = onnx_embed(path, batch)
    if actual.shape != expected.shape:
        raise ParityError(f"{path}: ONNX output shape {actual.shape} differs from torch {expected.shape}")
    diff = float(np.max(np.abs(actual - expected)))
    if not diff <= atol:
        raise ParityError(f"{path}: ONNX and torch embeddings differ by {diff:.3g} (> {atol:g}) on {len(batch)} images")
    log.info("ONNX parity on %d images: max abs diff %.2e", len(batch), diff)
    return diff
