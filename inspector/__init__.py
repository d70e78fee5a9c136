"""Production-line scorer: onnxruntime + numpy only (no torch, torchvision, prefect or mlflow).

A line PC installs this package's core dependencies and scores parts with a bundle:
``Inspector.from_bundle(path).score(images)``.
"""

from inspector.bundle import Bundle, BundleSpec, Threshold, load_bundle, write_bundle
from inspector.engine import Inspector, OnnxEmbedder, ScoreResult
from inspector.errors import BundleError, ImageError, InspectorError
from inspector.preprocess import PreprocessConfig, Preprocessor, load_image
from inspector.scoring import ScoringConfig, anomaly_scores

__all__ = [
    "Bundle",
    "BundleError",
    "BundleSpec",
    "ImageError",
    "Inspector",
    "InspectorError",
    "OnnxEmbedder",
    "PreprocessConfig",
    "Preprocessor",
    "ScoreResult",
    "ScoringConfig",
    "Threshold",
    "anomaly_scores",
    "load_bundle",
    "load_image",
    "write_bundle",
]
