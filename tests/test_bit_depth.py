"""Mono line cameras store 10-, 12- or 14-bit pixels in 16-bit PNG or TIFF. Pillow's own conversion to 8 bits
clips every value above 255, so such a part used to reach the model as a white picture: these tests hold the
product to scaling them by the camera's full range on every path, and to refusing what it cannot scale."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.engine import Inspector
from inspector.errors import ImageError
from inspector.heatmap import score_with_maps
from inspector.preprocess import PreprocessConfig, Preprocessor, load_image, significant_bits


def _save16(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array.astype(np.uint16)).save(path)
    return path


def _twelve_bit(eight: np.ndarray) -> np.ndarray:
    """An 8-bit picture as a 12-bit camera would store it (scaling back to 8 bits gives the same values)."""
    return np.rint(eight.astype(np.float64) * 4095 / 255).astype(np.uint16)


def test_high_bit_images_scale_by_the_camera_depth_and_bad_ones_are_refused_by_name(tmp_path: Path) -> None:
    eight = np.random.default_rng(0).integers(0, 256, (24, 40), dtype=np.uint8)
    png, tif = _save16(_twelve_bit(eight), tmp_path / "part.png"), _save16(_twelve_bit(eight), tmp_path / "part.tif")
    big_endian = tmp_path / "part_mm.tif"  # I;16B, which Pillow has no getextrema for
    Image.fromarray(_twelve_bit(eight).astype(">u2")).save(big_endian)
    assert Image.open(big_endian).mode == "I;16B"
    for path in (png, tif, big_endian):
        raw = load_image(path, bit_depth="keep")
        assert raw.mode.startswith("I") and significant_bits(raw) == 12
        assert np.array_equal(np.asarray(load_image(path, bit_depth=12)), np.repeat(eight[..., None], 3, axis=2))
        assert load_image(path, bit_depth=12, keep_gray=True).mode == "L"
        # a 16-bit model scales by 65535: darker, not clipped
        assert np.asarray(load_image(path, bit_depth=16, keep_gray=True)).max() == round(
            int(_twelve_bit(eight).max()) * 255 / 65535
        )
        with pytest.raises(ImageError) as info:  # a model built on 8-bit images: an error, not a white part
            load_image(path)
        assert str(path) in str(info.value) and "12-bit" in str(info.value) and "bit_depth" in str(info.value)
    full = _save16(np.full((8, 8), 60000), tmp_path / "sixteen.png")
    assert significant_bits(load_image(full, bit_depth="keep")) == 16
    with pytest.raises(ImageError, match="do not fit this model's 12-bit range") as info:  # the camera changed
        load_image(full, bit_depth=12)
    assert str(full) in str(info.value)
    assert significant_bits(load_image(_save16(np.full((8, 8), 900), tmp_path / "dark.png"), bit_depth="keep")) == 10
    assert significant_bits(Image.new("L", (4, 4), 200)) == 8 and significant_bits(Image.new("RGB", (4, 4))) == 8
    floats = tmp_path / "float.tif"
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(floats)
    with pytest.raises(ImageError, match="floating-point") as info:
        load_image(floats, bit_depth=16)
    assert str(floats) in str(info.value)


def test_bit_depth_in_the_config_round_trip_and_validation() -> None:
    config = PreprocessConfig(bit_depth=12)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PreprocessConfig.from_dict({"height": 32, "width": 32}).bit_depth is None  # bundles from before: 8-bit only
    with pytest.raises(ValueError, match="bit_depth"):
        PreprocessConfig(bit_depth=11)
    eight = np.random.default_rng(1).integers(0, 256, (30, 20), dtype=np.uint8)
    pre = Preprocessor(PreprocessConfig(height=32, width=32, bit_depth=12))
    stream = io.BytesIO()
    Image.fromarray(_twelve_bit(eight)).save(stream, format="PNG")
    plain = io.BytesIO()
    Image.fromarray(eight).save(plain, format="PNG")
    # bytes, as the service receives them
    assert np.array_equal(pre.resize(pre.load(stream.getvalue())), pre.resize(pre.load(plain.getvalue())))


def test_a_twelve_bit_camera_trains_and_scores_like_its_8_bit_twin(demo_root: Path, tmp_path: Path) -> None:
    """The same parts as 12-bit and as 8-bit mono PNGs through ingest, the bundle build and the line: the depth is
    found at ingest, stored in the bundle, and every score matches; an 8-bit model refuses a 12-bit part by name."""
    import torch

    from models.siamese import build_embedder
    from pipelines.bundle_building import build_bundle
    from pipelines.data.layouts import scan_mvtec
    from pipelines.data.manifest import Manifest, build_manifest
    from pipelines.data.split import DataSplit
    from pipelines.recipe import resolve_bit_depth, tiny_recipe

    roots = {"8": tmp_path / "eight", "12": tmp_path / "twelve"}
    for source in sorted(demo_root.rglob("*.png")):
        rel = source.relative_to(demo_root)
        gray = np.asarray(Image.open(source).convert("L"))
        for depth, root in roots.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            if "ground_truth" in rel.parts or depth == "8":
                Image.fromarray(gray).save(root / rel)
            else:
                _save16(_twelve_bit(gray), root / rel)
    bundles, scores = {}, {}
    for depth, root in roots.items():
        manifest = build_manifest(scan_mvtec(root))
        assert not manifest.rejected and {e.bits for e in manifest.entries} == {int(depth)}
        assert Manifest.from_json(manifest.to_json()).entries == manifest.entries
        recipe = resolve_bit_depth(
            tiny_recipe(preprocess=PreprocessConfig(height=64, width=64)), [e.bits for e in manifest.entries]
        )
        assert recipe.preprocess.bit_depth == (12 if depth == "12" else None)
        records = manifest.records()  # the split by hand: the content-keyed one differs with the bytes
        train = sorted(r.path for r in records if r.is_good and r.source_split == "train")
        split = DataSplit(
            train_good=train[:-8],
            train_defective=[],
            calibration_good=train[-8:],
            validation_defective=[],
            test=sorted((r for r in records if r.source_split == "test"), key=lambda r: str(r.path)),
        )
        torch.manual_seed(0)  # both twins' projection heads start alike
        bundles[depth] = build_bundle(
            build_embedder(recipe.embedder).eval(), split, recipe, tmp_path / f"bundle{depth}"
        )
        inspector = Inspector.from_bundle(bundles[depth])
        assert inspector.bundle.spec.preprocessing.bit_depth == recipe.preprocess.bit_depth
        results = inspector.score([r.path for r in split.test])
        assert all(r.error is None for r in results)
        scores[depth] = np.array([r.score for r in results])
    assert np.allclose(
        scores["12"], scores["8"], rtol=1e-4, atol=1e-4
    )  # same pixels (tested above); two builds round alike only to ~1e-5
    assert np.ptp(scores["12"]) > 0  # not every part alike, as a white picture would make them

    twelve_part = next(roots["12"].rglob("test/good/*.png"))
    eight_part = roots["8"] / twelve_part.relative_to(roots["12"])
    results = Inspector.from_bundle(bundles["8"]).score([eight_part, twelve_part])
    assert results[0].error is None and results[0].score is not None
    assert results[1].score is None and str(twelve_part) in results[1].error and "8-bit" in results[1].error
    ((result, heat, photo),) = score_with_maps(Inspector.from_bundle(bundles["12"]), [twelve_part])
    assert result.error is None and heat is not None and photo is not None
    assert (
        photo.size == Image.open(twelve_part).size and np.asarray(photo).max() < 255
    )  # the overlay scaled, not clipped
