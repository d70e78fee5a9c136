"""Shared fixtures: environment for offline runs, small generated datasets, image files of every bad kind."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# a flow run without an API starts a temporary server; its default 20 s start is tight on a loaded 2-core machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs files side by side: one Prefect home each
    import tempfile

    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix=f"prefect-home-{worker}-"))

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.parts import textured_parts

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MAGNETIC_TILES = SHARED_DATA / "magnetic_tile_defect" / "magnetic_tile"


@pytest.fixture(autouse=True)
def _restore_mlflow_uris() -> Iterator[None]:
    """``mlflow.set_tracking_uri``/``set_registry_uri`` (the flows call them) also export ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_REGISTRY_URI`` for subprocesses; put both back after each test so a later test's servers, services and
    workers never inherit a store that is gone."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {name: os.environ.get(name) for name in names}
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated MVTec-layout dataset shared by the tests that only read it."""
    from models.demo_data import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_dataset(root, seed=0, n_train_good=48, n_test_good=16, n_test_per_defect=6, height=64, width=64)
    return root


@pytest.fixture()
def bad_images(tmp_path: Path) -> dict[str, Path]:
    """One file of each kind the line must survive: corrupt, empty, truncated, not an image, absurd size."""
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(good)
    jpeg = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:40] + b"\x00" * 200)
    huge = tmp_path / "huge.png"
    Image.new("L", (12000, 12000)).save(huge)  # 144 MP, small on disk
    return {"good": good, "truncated": truncated, "empty": empty, "text": text, "corrupt": corrupt, "huge": huge}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle (tiny patch CNN exported to ONNX, a real reference bank, threshold 0.5) for line-side tests."""
    import torch

    from inspector.bundle import BundleSpec, Threshold, write_bundle
    from inspector.engine import OnnxEmbedder
    from inspector.preprocess import PreprocessConfig
    from inspector.scoring import ScoringConfig
    from models.export import export_onnx
    from models.siamese import EmbedderConfig, build_embedder

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("bundle")
    model = build_embedder(EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=8))
    onnx_path = export_onnx(model, tmp / "m.onnx", height=32, width=32)
    pre = PreprocessConfig(height=32, width=32)
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    bank = OnnxEmbedder(onnx_path, pre).embed(refs).embeddings
    spec = BundleSpec(pre, ScoringConfig(), Threshold(0.5), model={"name": "tiny", "version": "1", "mode": "patch"})
    return write_bundle(tmp / "bundle", onnx_path, bank.reshape(-1, bank.shape[-1]), spec)


@pytest.fixture(scope="session")
def density_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Path]]]:
    """A real bundle whose golden parts vary in brightness from 0.3 to 0.7, each part uniform; calibration goods
    alike; 'patchy' parts are half 0.3 and half 0.7: every patch matches some golden patch, the whole part does not."""
    import torch

    from inspector.bundle import BundleSpec, Threshold, write_bundle
    from inspector.engine import OnnxEmbedder
    from inspector.preprocess import PreprocessConfig
    from inspector.scorer import Scorer
    from inspector.scoring import ScoringConfig
    from models.export import export_onnx
    from models.siamese import EmbedderConfig, build_embedder

    tmp = tmp_path_factory.mktemp("density")
    torch.manual_seed(0)
    model = build_embedder(
        EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=8, density_stages=2)
    ).eval()
    path = export_onnx(model, tmp / "m.onnx", height=32, width=32)
    pre = PreprocessConfig(height=32, width=32)
    onnx = OnnxEmbedder(path, pre)
    rng = np.random.default_rng(1)
    files: dict[str, list[Path]] = {}
    for name, n in (("refs", 40), ("cal", 24), ("good", 12), ("more", 4)):
        files[name] = []
        for i, img in enumerate(textured_parts(rng, n, (0.3, 0.7))):
            files[name].append(tmp / f"{name}{i}.png")
            img.save(files[name][-1])
    files["patchy"] = []
    for i in range(12):
        low, high = (
            np.asarray(textured_parts(rng, 1, (0.3, 0.32))[0]),
            np.asarray(textured_parts(rng, 1, (0.68, 0.7))[0]),
        )
        img = np.concatenate([low[:, :16], high[:, 16:]], axis=1)
        files["patchy"].append(tmp / f"patchy{i}.png")
        Image.fromarray(img).save(files["patchy"][-1])
    refs = onnx.embed(files["refs"])
    cal = onnx.embed(files["cal"])
    bank = refs.embeddings.reshape(-1, refs.embeddings.shape[-1])
    scorer = Scorer.of(bank, ScoringConfig(), part_references=refs.descriptors, part_blocks=model.descriptor_blocks)
    cal_raw = scorer.raw(cal.embeddings, None, cal.descriptors)
    scorer = scorer.fitted_on(cal_raw)
    cal_scores = scorer.fuse(cal_raw)
    density = scorer.density_spec(["initial"] * 40)
    threshold = Threshold(float(np.quantile(cal_scores, 0.99)), rule="good_quantile")
    spec = BundleSpec(
        pre, ScoringConfig(), threshold, model={"name": "tiny", "version": "1", "mode": "patch"}, density=density
    )
    return write_bundle(tmp / "bundle", path, bank, spec, descriptors=refs.descriptors), files
