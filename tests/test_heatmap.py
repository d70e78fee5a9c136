"""Anomaly heatmaps: grid geometry, letterbox undone, consistency with the score, the CLI flag, pixel AUROC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.cli import main as inspector_main
from inspector.engine import Inspector
from inspector.heatmap import colourise, heatmap_filename, score_with_maps, to_image_map
from inspector.metrics import pixel_auroc
from inspector.preprocess import PreprocessConfig, Preprocessor, patch_grid


@pytest.mark.parametrize(
    ("p", "h", "w", "grid"),
    [(196, 224, 224, (14, 14)), (320, 320, 256, (20, 16)), (4, 32, 32, (2, 2)), (8, 64, 32, (4, 2))],
)
def test_patch_grid_keeps_input_aspect(p: int, h: int, w: int, grid: tuple[int, int]) -> None:
    assert patch_grid(p, h, w) == grid


def test_to_image_map_undoes_the_letterbox() -> None:
    # a 64x64 canvas; a 32 wide x 64 high image is letterboxed into the middle half (columns 16..47)
    pre = Preprocessor(PreprocessConfig(height=64, width=64))
    grid = np.zeros((4, 4), np.float32)
    grid[:, 1] = 1.0  # hot: canvas columns 16..31 = the left half of the image content
    amap = to_image_map(grid, pre, (32, 64))
    assert amap.shape == (64, 32)
    profile = amap.mean(axis=0)
    assert (
        5 <= int(np.argmax(profile)) <= 10 and profile.max() > 0.95
    )  # peak at the hot cell's centre (image column ~8)
    assert profile[24:].max() < 0.05


def test_pixel_auroc_perfect_random_and_checked() -> None:
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    perfect = mask.astype(np.float32)
    assert pixel_auroc([perfect, np.zeros((20, 20))], [mask, None]) == pytest.approx(1.0)
    assert pixel_auroc([1.0 - perfect], [mask]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="mask shape"):
        pixel_auroc([perfect], [np.zeros((10, 10), bool)])


def test_colours_are_threshold_relative() -> None:
    rgb = colourise(np.array([[0.0, 1.0, 1.5, 9.0]]), threshold=1.0)
    assert tuple(rgb[0, 0]) == (0, 0, 130) and tuple(rgb[0, 2]) == tuple(rgb[0, 3]) == (200, 0, 0)
    assert rgb[0, 1, 0] > 200 and rgb[0, 1, 1] > 150  # the threshold itself is yellow-ish


def test_unique_heatmap_names() -> None:
    taken: set[str] = set()
    assert heatmap_filename("a/x.png", 0, taken) == "x_heatmap.png"
    assert heatmap_filename("b/x.png", 1, taken) == "x_1_heatmap.png"


def test_map_maximum_is_the_score(tiny_bundle: Path, demo_root: Path, bad_images: dict[str, Path]) -> None:
    inspector = Inspector.from_bundle(tiny_bundle)
    paths = sorted((demo_root / "test").rglob("*.png"))[:6] + [bad_images["truncated"]]
    out = score_with_maps(inspector, paths)
    expected = inspector.score(paths)
    assert [r.source for r, _, _ in out] == [str(p) for p in paths]
    for (result, amap, img), ref in zip(out, expected):
        if ref.error:
            assert result.error == ref.error and amap is None
            continue
        assert result.score == pytest.approx(ref.score, rel=1e-5)
        assert amap.shape == (img.height, img.width)
        # bilinear upsampling never exceeds the grid's maximum, and the worst patch's value survives near its centre
        assert amap.max() <= result.score + 1e-5
        assert amap.max() >= 0.5 * result.score


def test_cli_writes_heatmaps(
    tiny_bundle: Path, demo_root: Path, bad_images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = sorted((demo_root / "test").rglob("*.png"))[:3]
    out = tmp_path / "maps"
    code = inspector_main(
        [
            "score",
            *map(str, images),
            str(bad_images["empty"]),
            "--bundle",
            str(tiny_bundle),
            "--heatmaps",
            str(out),
            "--json",
        ]
    )
    rows = json.loads(capsys.readouterr().out)
    assert code == 2  # one unreadable image: exit 2, the others still scored and drawn
    drawn = [r for r in rows if r["heatmap"]]
    assert len(drawn) == 3 and rows[-1]["heatmap"] is None and "empty" in rows[-1]["error"]
    for row, src in zip(drawn, images):
        png = Image.open(row["heatmap"])
        assert png.size == Image.open(src).size and png.mode == "RGB"


def test_heatmaps_find_the_defects(demo_root: Path, tmp_path: Path) -> None:
    """Frozen pretrained patch features on the generated parts: the map is hotter on the mask than off it."""
    import torch

    from models.siamese import build_embedder
    from pipelines.bundle_building import build_bundle
    from pipelines.data.layouts import scan_mvtec
    from pipelines.data.split import DataSplit
    from pipelines.recipe import tiny_recipe

    records = scan_mvtec(demo_root)
    train = [r.path for r in records if r.is_good and r.source_split == "train"]
    defects = [r for r in records if not r.is_good and r.mask is not None][:18]
    recipe = tiny_recipe(preprocess=PreprocessConfig(height=64, width=64))
    split = DataSplit(
        train_good=train[:-8], train_defective=[], calibration_good=train[-8:], validation_defective=[], test=[]
    )
    torch.manual_seed(0)  # the projection head's initial weights
    bundle = build_bundle(build_embedder(recipe.embedder).eval(), split, recipe, tmp_path / "bundle")
    scored = score_with_maps(Inspector.from_bundle(bundle), [r.path for r in defects])
    masks = [np.asarray(Image.open(r.mask).convert("L")) >= 128 for r in defects]
    value = pixel_auroc([m for _, m, _ in scored], masks)
    assert value > 0.75, value

    # the training run logs the same overlays as examples
    from pipelines.evaluation import evaluate_bundle
    from pipelines.plots import save_heatmap_examples

    goods = [r for r in records if r.is_good and r.source_split == "test"][:4]
    drawn = save_heatmap_examples(bundle, evaluate_bundle(bundle, defects[:4] + goods), tmp_path / "plots", per_kind=2)
    assert [p.name for p in drawn] == ["heatmaps.png"]
    assert Image.open(drawn[0]).size[0] > 300
