"""The line scorer: a verified bundle, an onnxruntime session and the scoring rule, behind one small API.

``Inspector.from_bundle(path).score(images)`` is what the CLI, the HTTP service and the pipelines' evaluation
call. A bad image fails that item (``ScoreResult.error``), never the batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from inspector.bundle import Bundle, load_bundle
from inspector.errors import ImageError, InspectorError
from inspector.preprocess import PreprocessConfig, Preprocessor, load_image
from inspector.scoring import anomaly_scores

ImageSource = str | Path | bytes | Image.Image


@dataclass(frozen=True)
class ScoreResult:
    """The verdict for one image; ``error`` is set (and score is None) when the image could not be read."""

    source: str
    score: float | None
    threshold: float
    anomalous: bool | None
    model_version: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.source,
            "score": self.score,
            "threshold": self.threshold,
            "verdict": None if self.anomalous is None else ("anomalous" if self.anomalous else "good"),
            "model_version": self.model_version,
            "error": self.error,
        }


def make_session(model_path: str | Path, *, threads: int | None = None, providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session with full graph optimisation; CUDA first when the runtime has it."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads if threads is not None else int(os.environ.get("INSPECTOR_THREADS", "0"))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=list(providers))


def _source_name(source: ImageSource, index: int) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<image {index}>"


class OnnxEmbedder:
    """Decode, preprocess and embed images with an ONNX embedder: the line's (and evaluation's) only path."""

    def __init__(self, model_path: str | Path, preprocessing: PreprocessConfig, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, batch_size: int = 32) -> None:
        self.preprocessing = preprocessing
        self.preprocessor = Preprocessor(preprocessing)
        self.session = make_session(model_path, threads=threads, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        out_dim = self.session.get_outputs()[0].shape[-1]
        self.embedding_dim: int | None = out_dim if isinstance(out_dim, int) else None
        self.batch_size = batch_size

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Embed an already-preprocessed float32 NCHW batch, in chunks of ``batch_size``."""
        if len(batch) == 0:
            return np.zeros((0, self.embedding_dim or 0), dtype=np.float32)
        outs = [
            self.session.run(None, {self.input_name: np.ascontiguousarray(batch[i : i + self.batch_size], dtype=np.float32)})[0]
            for i in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def _decode(self, source: ImageSource, name: str) -> Image.Image:
        if isinstance(source, Image.Image):
            return source.convert("RGB")
        return load_image(source, max_pixels=self.preprocessing.max_pixels, name=name)

    def embed(self, images: Sequence[ImageSource]) -> tuple[np.ndarray, list[str | None]]:
        """Embeddings of the images that could be read (rows in input order) and a per-image error (or None)."""
        arrays: list[np.ndarray] = []
        errors: list[str | None] = []
        for i, source in enumerate(images):
            try:
                arrays.append(self.preprocessor(self._decode(source, _source_name(source, i))))
                errors.append(None)
            except ImageError as exc:
                errors.append(str(exc))
        if not arrays:
            return np.zeros((0, self.embedding_dim or 0), dtype=np.float32), errors
        return self.embed_arrays(np.stack(arrays)), errors


class Inspector:
    """Scores part images against the golden references of one bundle."""

    def __init__(self, bundle: Bundle, *, threads: int | None = None, providers: Sequence[str] | None = None, batch_size: int = 32) -> None:
        self.bundle = bundle
        self.embedder = OnnxEmbedder(bundle.model_path, bundle.spec.preprocessing, threads=threads, providers=providers, batch_size=batch_size)
        dim = self.embedder.embedding_dim
        if dim is not None and dim != bundle.references.shape[1]:
            raise InspectorError(f"{bundle.path}: model outputs {dim}-d embeddings but references are {bundle.references.shape[1]}-d")

    @classmethod
    def from_bundle(cls, path: str | Path, **kwargs: Any) -> "Inspector":
        return cls(load_bundle(path), **kwargs)

    @property
    def threshold(self) -> float:
        return self.bundle.spec.threshold.value

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    def embed(self, images: Sequence[ImageSource]) -> tuple[np.ndarray, list[str | None]]:
        return self.embedder.embed(images)

    def score_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return anomaly_scores(embeddings, self.bundle.references, self.bundle.spec.scoring)

    def score(self, images: Sequence[ImageSource] | ImageSource) -> list[ScoreResult]:
        """Score one or many images; unreadable ones get a result with ``error`` set instead of failing the batch."""
        if isinstance(images, (str, Path, bytes, Image.Image)):
            images = [images]
        images = list(images)
        embeddings, errors = self.embed(images)
        scores = iter(self.score_embeddings(embeddings).tolist())
        results = []
        for i, (source, error) in enumerate(zip(images, errors)):
            name = _source_name(source, i)
            if error is not None:
                results.append(ScoreResult(name, None, self.threshold, None, self.model_version, error))
                continue
            s = float(next(scores))
            results.append(ScoreResult(name, s, self.threshold, s > self.threshold, self.model_version))
        return results

    def score_paths(self, paths: Iterable[str | Path], chunk: int = 256) -> Iterable[ScoreResult]:
        """Stream results for a long list of files, decoding ``chunk`` at a time to bound memory."""
        pending: list[str | Path] = []
        for p in paths:
            pending.append(p)
            if len(pending) >= chunk:
                yield from self.score(pending)
                pending = []
        if pending:
            yield from self.score(pending)
