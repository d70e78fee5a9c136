"""ONNX export: a single file, dynamic batch, torch == onnxruntime on real preprocessed images, clear failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inspector.engine import OnnxEmbedder
from inspector.preprocess import PreprocessConfig, Preprocessor, load_image
from models.export import ParityError, check_parity, export_onnx
from models.siamese import EmbedderConfig, build_embedder

TINY = EmbedderConfig(backbone="tiny_cnn", weights=None, mode="global", embedding_dim=16, hidden_dim=32)
CFG = PreprocessConfig(height=64, width=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_embedder(TINY).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", height=64, width=64)
    return model, path


def _real_batch(demo_root: Path, n: int = 5) -> tuple[list[Path], np.ndarray]:
    paths = sorted((demo_root / "test").rglob("*.png"))[::7][:n]
    return paths, Preprocessor(CFG).batch([load_image(p) for p in paths])


def test_single_file_dynamic_batch_and_parity(exported: tuple[torch.nn.Module, Path], demo_root: Path) -> None:
    model, path = exported
    assert path.is_file() and not list(path.parent.glob("*.data")), "weights must be inside model.onnx"
    _, batch = _real_batch(demo_root)
    assert check_parity(model, path, batch) <= 1e-4
    assert check_parity(model, path, batch[:1]) <= 1e-4  # batch of one works too


def test_inspector_embeddings_equal_torch_on_image_files(
    exported: tuple[torch.nn.Module, Path], demo_root: Path
) -> None:
    """The line's decode + preprocessing + ORT path gives what torch gives on the same files."""
    model, path = exported
    paths, batch = _real_batch(demo_root)
    embedded = OnnxEmbedder(path, CFG).embed(paths)
    ort_emb, errors = embedded.embeddings, embedded.errors
    assert errors == [None] * len(paths)
    with torch.no_grad():
        torch_emb = model(torch.from_numpy(batch)).numpy()
    assert np.max(np.abs(ort_emb - torch_emb)) <= 1e-4
    assert np.allclose(np.linalg.norm(ort_emb, axis=1), 1.0, atol=1e-5)


def test_parity_failure_raises_clear_error(exported: tuple[torch.nn.Module, Path], demo_root: Path) -> None:
    _, path = exported
    torch.manual_seed(1)
    other = build_embedder(TINY).eval()
    _, batch = _real_batch(demo_root)
    with pytest.raises(ParityError, match="differ by"):
        check_parity(other, path, batch)


def test_patch_embedder_exports_with_parity(tmp_path: Path, demo_root: Path) -> None:
    torch.manual_seed(0)
    model = build_embedder(
        EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=16)
    ).eval()
    path = export_onnx(model, tmp_path / "patch.onnx", height=64, width=64)
    _, batch = _real_batch(demo_root, n=3)
    assert check_parity(model, path, batch) <= 1e-4
    out = OnnxEmbedder(path, CFG).embed(sorted((demo_root / "train" / "good").glob("*.png"))[:2]).embeddings
    assert (
        out.shape == (2, 16, model.embedding_dim) and model.embedding_dim > 16
    )  # N x patches (4x4) x D (head + features)
