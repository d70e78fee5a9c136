"""The registered MLflow model: a pyfunc that scores with ``inspector`` (the line's only scoring implementation).

Why a module of its own: it is shipped inside every logged model as code, with ``inspector``, and MLflow builds the
model by running :mod:`pipelines.pyfunc_entry` (models from code), so loading a registered model never unpickles an
object from the artifact store. It imports mlflow, pandas and ``inspector`` only (no torch).

Inputs: image paths (a DataFrame with a ``path`` column, a list, one path), or image bytes as base64 in an
``image_b64`` column (with an optional ``name`` column), which is what a remote client of ``mlflow models serve``
can send. Output: one row per image with path (or name), score, threshold, verdict, model_version and error.
"""

from __future__ import annotations

import base64
import binascii
import shutil
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema

from inspector.engine import Inspector, ScoreResult
from inspector.errors import ImageError
from inspector.registry_contract import BUNDLE_ARTIFACT

OUTPUT_COLUMNS = ("path", "score", "threshold", "verdict", "model_version", "error")
SERVING_PACKAGES = ("onnxruntime", "numpy", "pillow", "pydantic")
#: the column that carries image bytes, base64-encoded
BYTES_COLUMN = "image_b64"
#: the file MLflow runs to build the model (models from code)
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")


def _as_paths(model_input: Any) -> list[str]:
    """A DataFrame with a ``path`` column (or a single column), a Series, a list of paths or one path."""
    if isinstance(model_input, pd.DataFrame):
        if "path" in model_input.columns:
            column = model_input["path"]
        elif model_input.shape[1] == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a DataFrame with a 'path' column, got columns {list(model_input.columns)}")
        return [str(p) for p in column.tolist()]
    if isinstance(model_input, pd.Series):
        return [str(p) for p in model_input.tolist()]
    if isinstance(model_input, (str, Path)):
        return [str(model_input)]
    if isinstance(model_input, Mapping) and "path" in model_input:
        return _as_paths(model_input["path"])
    if hasattr(model_input, "tolist"):  # numpy array of paths
        model_input = model_input.tolist()
    if isinstance(model_input, (list, tuple)):
        return [str(p) for p in model_input]
    raise TypeError(
        f"expected image paths (DataFrame with a 'path' column, list or str), got {type(model_input).__name__}"
    )


def _decoded(frame: pd.DataFrame) -> list[tuple[str, bytes | None, str | None]]:
    """(name, bytes, error) per row of an ``image_b64`` frame: a row that is not base64 is an error of that row."""
    names = frame["name"].tolist() if "name" in frame.columns else [f"<image {i}>" for i in range(len(frame))]
    out: list[tuple[str, bytes | None, str | None]] = []
    for name, text in zip(names, frame[BYTES_COLUMN].tolist()):
        try:
            out.append((str(name), base64.b64decode(str(text), validate=True), None))
        except (binascii.Error, ValueError):
            out.append((str(name), None, f"{BYTES_COLUMN} is not base64"))
    return out


class InspectorModel(PythonModel):
    """The bundle as an MLflow pyfunc: ``predict`` scores image files or image bytes through ``inspector``."""

    def __init__(self) -> None:
        self._inspector: Inspector | None = None

    def load_context(self, context: PythonModelContext) -> None:
        self._inspector = Inspector.from_bundle(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if self._inspector is None:
            self.load_context(context)
        assert self._inspector is not None
        if isinstance(model_input, pd.DataFrame) and BYTES_COLUMN in model_input.columns:
            rows = self._score_bytes(_decoded(model_input))
        else:
            paths = _as_paths(model_input)
            rows = [r.to_dict() for r in self._inspector.score(paths)] if paths else []
        frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
        frame["score"] = frame["score"].astype("float64")
        frame["threshold"] = frame["threshold"].astype("float64")
        return frame

    def _score_bytes(self, images: list[tuple[str, bytes | None, str | None]]) -> list[dict[str, Any]]:
        """Each image's row under its ``name``: decoded as the line decodes uploads (errors name the image), then
        scored together; an image that could not be decoded keeps its error and the others are scored."""
        assert self._inspector is not None
        inspector = self._inspector
        failed = ScoreResult("", None, inspector.threshold, None, inspector.model_version)
        rows: list[dict[str, Any]] = [{}] * len(images)
        decoded = []
        for i, (name, data, error) in enumerate(images):
            try:
                if data is None:
                    raise ImageError(name, error or "no image")
                decoded.append((i, inspector.embedder.preprocessor.load(data, name=name, keep_gray=True)))
            except ImageError as exc:
                rows[i] = {**failed.to_dict(), "path": name, "error": str(exc)}
        results = inspector.score([image for _, image in decoded])
        for (i, _), result in zip(decoded, results):
            rows[i] = {**result.to_dict(), "path": images[i][0]}
        return rows


def model_signature() -> ModelSignature:
    """Outputs only: inputs stay free-form (paths in several shapes, or base64 bytes), which a column schema would
    reject before ``predict`` sees them."""
    return ModelSignature(
        inputs=None,
        outputs=Schema(
            [
                ColSpec("string", "path"),
                ColSpec("double", "score", required=False),
                ColSpec("double", "threshold"),
                ColSpec("string", "verdict", required=False),
                ColSpec("string", "model_version"),
                ColSpec("string", "error", required=False),
            ]
        ),
    )


def serving_requirements() -> list[str]:
    """The pyfunc's pip requirements: what ``inspector`` needs, pinned to what produced the logged scores."""
    reqs = []
    for package in SERVING_PACKAGES:
        try:
            reqs.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            reqs.append(package)
    return reqs


def stage_code(dst: Path) -> list[str]:
    """Copy ``inspector`` and this module (nothing torch) so the logged model loads where the project is absent."""
    import inspector

    shutil.copytree(
        Path(inspector.__file__).parent, dst / "inspector", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    (dst / "pipelines").mkdir()
    (dst / "pipelines" / "__init__.py").write_text('"""Only the pyfunc module, shipped with a logged model."""\n')
    shutil.copyfile(Path(__file__), dst / "pipelines" / "pyfunc_model.py")
    return [str(dst / "inspector"), str(dst / "pipelines")]
