"""The one scorer: training-time validation scores parts exactly as the line does, and the torch and numpy rules
for "this patch is on the part" are one rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inspector.engine import OnnxEmbedder
from inspector.preprocess import PreprocessConfig, Preprocessor, cells_on_part
from inspector.scorer import RawScores, Scorer, golden_rows
from inspector.scoring import ScoringConfig, patch_mask
from models.export import export_onnx
from models.siamese import EmbedderConfig, build_embedder, on_part_weights
from models.training import ValidationData, validation_views
from tests.parts import textured_parts


def test_torch_and_numpy_patch_on_part_rules_agree_for_any_image_size() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(8, 400, 2))
        grid = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        cfg = PreprocessConfig(height=height, width=width)
        sizes = [(int(w), int(h)) for w, h in rng.integers(1, 2000, (6, 2))]
        pre = Preprocessor(cfg)
        numpy_rule = pre.content_mask(sizes, grid)
        torch_rule = on_part_weights(torch.from_numpy(pre.placements(sizes)), grid, (height, width)) > 0
        # the torch rule gives a part that covers no cell centre every cell, as the line's patch mask does
        fallback = patch_mask(np.zeros((len(sizes), grid[0] * grid[1], 1)), ScoringConfig(), numpy_rule)
        expected = numpy_rule if fallback is None else fallback
        np.testing.assert_array_equal(torch_rule.reshape(len(sizes), -1).numpy(), expected, err_msg=f"{cfg} {sizes}")


def test_cells_on_part_counts_whole_cells() -> None:
    # a 2x4 grid over 32x64: the part covers x in [16, 48), so the cells centred at x = 24 and 40
    cells = cells_on_part((16, 0, 32, 32), (2, 4), (32, 64))
    np.testing.assert_array_equal(cells, [[False, True, True, False], [False, True, True, False]])
    # a cell centre on the part's left edge is on the part, one on its right edge is not
    np.testing.assert_array_equal(cells_on_part((8, 0, 16, 8), (1, 4), (8, 32))[0], [False, True, True, False])


@pytest.fixture(scope="module")
def scored_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A patch embedder with a whole-part view, its ONNX export, and letterboxed parts of several shapes on disk."""
    tmp = tmp_path_factory.mktemp("scorer")
    torch.manual_seed(0)
    model = build_embedder(
        EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=8, density_stages=2)
    ).eval()
    cfg = PreprocessConfig(height=32, width=48)
    onnx_path = export_onnx(model, tmp / "m.onnx", height=cfg.height, width=cfg.width)
    rng = np.random.default_rng(3)
    files: dict[str, list[Path]] = {"refs": [], "good": [], "bad": []}
    shapes = [(40, 32), (24, 40), (60, 30), (48, 32)]
    for name, n, level in (("refs", 12, (0.4, 0.6)), ("good", 8, (0.4, 0.6)), ("bad", 6, (0.1, 0.9))):
        for i in range(n):
            img = textured_parts(rng, 1, level, size=shapes[i % len(shapes)])[0]
            files[name].append(tmp / f"{name}{i}.png")
            img.save(files[name][-1])
    return {"model": model, "onnx": onnx_path, "cfg": cfg, "files": files}


def test_training_validation_scores_equal_the_lines(scored_parts: dict[str, object]) -> None:
    model, cfg, files = scored_parts["model"], scored_parts["cfg"], scored_parts["files"]
    assert isinstance(cfg, PreprocessConfig) and isinstance(files, dict)
    pre = Preprocessor(cfg)
    scoring = ScoringConfig(offset=0.5)
    queries = files["good"] + files["bad"]

    def load(paths: list[Path]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        images = [pre.load(p) for p in paths]
        return torch.from_numpy(pre.normalize(np.stack([pre.resize(i) for i in images]))), [i.size for i in images]

    refs, ref_sizes = load(files["refs"])
    query_batch, query_sizes = load(queries)
    labels = np.r_[np.zeros(len(files["good"])), np.ones(len(files["bad"]))]
    data = ValidationData(refs, query_batch, labels, scoring, query_sizes, cfg, ref_sizes)
    views, _ = validation_views(model, data)  # type: ignore[arg-type]

    line = OnnxEmbedder(scored_parts["onnx"], cfg, threads=1)  # type: ignore[arg-type]
    golden, embedded = line.embed(files["refs"]), line.embed(queries)
    scorer = Scorer.of(
        golden_rows(golden.embeddings, scoring, golden.valid),
        scoring,
        part_references=golden.descriptors,
        part_blocks=model.descriptor_blocks,  # type: ignore[attr-defined]
    )
    raw = scorer.raw(embedded.embeddings, embedded.valid, embedded.descriptors)
    scorer = scorer.fitted_on(raw.subset(labels == 0))
    assert embedded.valid is not None and not embedded.valid.all(), "some parts are letterboxed"
    np.testing.assert_allclose(views["patch"], raw.patch, rtol=1e-5, atol=1e-5)
    assert raw.part is not None
    np.testing.assert_allclose(views["part"], raw.part, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(views["fused"], scorer.fuse(raw), rtol=1e-5, atol=1e-5)


def test_raw_scores_subset_and_patch_only() -> None:
    raw = RawScores(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]))
    part = raw.subset(np.array([True, False, True]))
    assert part.patch.tolist() == [1.0, 3.0] and part.part is not None and part.part.tolist() == [4.0, 6.0]
    scorer = Scorer.of(np.zeros((2, 3)), ScoringConfig())
    assert not scorer.fuses and scorer.fuse(raw).tolist() == [1.0, 2.0, 3.0]
