"""Unit tests of the line scorer's pure parts: loading, preprocessing, scoring, metrics, bundle integrity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.bundle import BundleSpec, Threshold, load_bundle, write_bundle
from inspector.errors import BundleError, ImageError
from inspector.metrics import average_precision, rates_at_threshold, roc_auc
from inspector.preprocess import PreprocessConfig, Preprocessor, load_image
from inspector.scoring import ScoringConfig, anomaly_scores, knn_distances


def test_load_image_names_file_and_problem(bad_images: dict[str, Path]) -> None:
    assert load_image(bad_images["good"]).mode == "RGB"
    expected = {
        "empty": "empty file",
        "text": "not an image",
        "truncated": "cannot decode",
        "corrupt": "",
        "huge": "over the limit",
    }
    for kind, fragment in expected.items():
        with pytest.raises(ImageError) as info:
            load_image(bad_images[kind])
        assert str(bad_images[kind]) in str(info.value)
        assert fragment in str(info.value)


def test_letterbox_keeps_aspect_and_pads_to_zero() -> None:
    img = Image.fromarray(np.full((100, 40, 3), 200, np.uint8))  # portrait 40x100
    pre = Preprocessor(PreprocessConfig(height=50, width=50))
    x = pre(img)
    assert x.shape == (3, 50, 50) and x.dtype == np.float32
    # content is 20 px wide in the middle; padding is the mean colour, ~0 after normalisation
    assert np.allclose(x[:, :, :10], 0.0, atol=0.005) and np.allclose(x[:, :, -10:], 0.0, atol=0.005)
    assert np.allclose(x[:, :, 20:30], (200 / 255 - 0.5) / 0.5, atol=1e-6)
    stretched = Preprocessor(PreprocessConfig(height=50, width=50, resize="stretch"))(img)
    assert np.allclose(stretched, (200 / 255 - 0.5) / 0.5, atol=1e-6)


def test_grayscale_kept_one_channel_gives_the_rgb_array_bit_for_bit(tmp_path: Path) -> None:
    """The line keeps mono-camera images one channel through the resize (a third of the work): the array must be
    exactly what the RGB conversion that training sees gives, for every size, geometry and filter."""
    rng = np.random.default_rng(0)
    path = tmp_path / "mono.png"
    Image.fromarray(rng.integers(0, 255, (37, 90), dtype=np.uint8)).save(path)
    assert load_image(path).mode == "RGB" and load_image(path, keep_gray=True).mode == "L"
    for interpolation in ("bicubic", "bilinear", "nearest", "area"):
        for resize in ("letterbox", "stretch"):
            pre = Preprocessor(
                PreprocessConfig(
                    height=48,
                    width=64,
                    resize=resize,
                    interpolation=interpolation,
                    mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225),
                )
            )
            for h, w in ((37, 90), (90, 37), (48, 64), (200, 13)):
                gray = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8))
                assert np.array_equal(pre.resize(gray), pre.resize(gray.convert("RGB"))), (interpolation, resize, h, w)
            assert np.array_equal(pre.resize(load_image(path, keep_gray=True)), pre.resize(load_image(path)))


def test_preprocess_config_round_trip_and_validation() -> None:
    cfg = PreprocessConfig(height=96, width=160, mean=(0.1, 0.2, 0.3))
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        PreprocessConfig(resize="squash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reducing_gap"):
        PreprocessConfig(reducing_gap=0.5)


def test_two_step_resize_of_large_photos_and_old_bundles_keep_one_step() -> None:
    """A photo many times the input is shrunk in two steps (a box reduce, then the filter): within a grey level or
    two of one step; images under ``reducing_gap`` times the input resize exactly as before; a bundle written
    before the option existed keeps the one-step resize it was calibrated with."""
    legacy = {k: v for k, v in PreprocessConfig().to_dict().items() if k != "reducing_gap"}
    assert PreprocessConfig.from_dict(legacy).reducing_gap is None
    assert PreprocessConfig().reducing_gap == 3.0
    rng = np.random.default_rng(1)
    smooth = Image.fromarray(rng.integers(0, 255, (12, 15, 3), dtype=np.uint8)).resize(
        (1500, 1200), Image.Resampling.BICUBIC
    )
    two, one = (
        Preprocessor(PreprocessConfig(height=64, width=80)),
        Preprocessor(PreprocessConfig(height=64, width=80, reducing_gap=None)),
    )
    a, b = two.resize(smooth).astype(int), one.resize(smooth).astype(int)
    assert 0 < np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.5, "two steps: nearly, not exactly, one step"
    small = smooth.resize((380, 304), Image.Resampling.BICUBIC)  # 4.75x the input: a whole factor needs 2 gaps (6x)
    assert np.array_equal(two.resize(small), one.resize(small))


def test_knn_distances_chunked_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(53, 5)).astype(np.float32)
    brute = np.sort(np.linalg.norm(q[:, None] - r[None], axis=2), axis=1)[:, :3]
    assert np.allclose(knn_distances(q, r, k=3, chunk_size=4), brute, atol=1e-4)
    scores = anomaly_scores(q, r, ScoringConfig(k=3, aggregation="mean", chunk_size=10))
    assert np.allclose(scores, brute.mean(axis=1), atol=1e-4)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        knn_distances(q, r[:, :4])


def test_metrics_against_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) → 3 of 4
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    # ranking: 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5*1 + 0.5*(2/3)
    assert average_precision(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.5 + 1 / 3)
    rates = rates_at_threshold(labels, np.array([0.1, 0.4, 0.35, 0.8]), threshold=0.3)
    assert rates["false_reject_rate"] == pytest.approx(0.5) and rates["escape_rate"] == pytest.approx(0.0)


def _spec() -> BundleSpec:
    return BundleSpec(
        PreprocessConfig(height=32, width=32),
        ScoringConfig(k=2),
        Threshold(0.5, "manual"),
        model={"name": "m", "version": "3"},
    )


def test_bundle_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    refs = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    out = write_bundle(tmp_path / "b", b"not really onnx", refs, _spec())
    bundle = load_bundle(out)
    assert np.array_equal(bundle.references, refs)
    assert bundle.spec.scoring.k == 2 and bundle.model_version == "m:3"
    assert not list(tmp_path.glob(".b.*")), "no temp dirs left behind"
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(out, b"x", refs, _spec())
    (out / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="model.onnx.*does not match"):
        load_bundle(out)


def test_an_edited_manifest_is_refused_by_name_and_a_reformatted_one_loads(tmp_path: Path) -> None:
    """The threshold lives in inspector.json: raising it must not pass as the bundle that was verified."""
    from inspector.bundle import MANIFEST_DIGEST, manifest_digest

    out = write_bundle(tmp_path / "b", b"m", np.ones((2, 4), np.float32), _spec())
    manifest = json.loads((out / "inspector.json").read_text())
    assert manifest[MANIFEST_DIGEST] == manifest_digest(manifest)
    (out / "inspector.json").write_text(json.dumps(manifest, indent=None, sort_keys=False))  # same content, new bytes
    assert load_bundle(out).spec.threshold.value == 0.5
    for field, value in [("threshold", {"value": 5.0, "rule": "manual", "details": {}}), ("scoring", {"k": 9})]:
        edited = {**manifest, field: value}
        (out / "inspector.json").write_text(json.dumps(edited))
        with pytest.raises(BundleError, match=r"inspector.json: content sha256 .* does not match its recorded"):
            load_bundle(out)
    unsigned = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    (out / "inspector.json").write_text(json.dumps(unsigned))
    with pytest.raises(BundleError, match="inspector.json: no manifest_sha256 recorded"):
        load_bundle(out)
    (out / "inspector.json").write_text(json.dumps({**unsigned, "schema_version": 2}))  # written before digests
    assert load_bundle(out).spec.threshold.value == 0.5


def test_bundle_unknown_schema_refused(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", b"m", np.ones((1, 4), np.float32), _spec())
    manifest = json.loads((out / "inspector.json").read_text())
    manifest["schema_version"] = 99
    (out / "inspector.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown schema_version 99"):
        load_bundle(out)


def test_fast_normalize_and_decode_are_bit_identical_to_the_plain_formulas(tmp_path: Path) -> None:
    """The batch normalisation and the copy-free decode must not move a single pixel or float."""
    from PIL import ImageOps

    pre = Preprocessor(PreprocessConfig(height=24, width=24, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    pixels = np.random.default_rng(0).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    mean = np.asarray(pre.config.mean, np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(pre.config.std, np.float32) * 255.0)
    plain = np.moveaxis((pixels.astype(np.float32) - mean) * inv_std, -1, -3)
    fast = pre.normalize(pixels)
    assert fast.dtype == np.float32 and fast.flags.c_contiguous and np.array_equal(fast, plain)
    assert np.array_equal(pre.normalize(pixels[2]), plain[2])

    base = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90°
    base.save(tmp_path / "rotated.jpg", exif=exif)
    base.convert("P").save(tmp_path / "palette.png")
    base.convert("L").save(tmp_path / "grey.png")
    base.convert("CMYK").save(tmp_path / "cmyk.jpg")
    base.convert("RGBA").save(tmp_path / "alpha.png")
    for path in sorted(tmp_path.iterdir()):
        with Image.open(path) as img:
            img.load()
            expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        got = load_image(path)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), expected), path.name
    assert load_image(tmp_path / "rotated.jpg").size == (30, 40)


def test_pipelined_scoring_equals_one_batch_and_the_plain_path(
    tiny_bundle: Path, bad_images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """score_paths (decode of the next chunk and the search of the previous one overlapping this one's forward pass,
    or batches scored side by side on several cores) and the decode pool change no result, chunks of readable,
    unreadable and mixed images alike."""
    from inspector.engine import Inspector
    from inspector.scoring import GoldenBank

    rng = np.random.default_rng(3)
    goods = []
    for i in range(7):
        p = tmp_path / f"part{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + i, 16, 3), dtype=np.uint8)).save(p)
        goods.append(p)
    paths = [goods[0], bad_images["truncated"], *goods[1:4], bad_images["empty"], *goods[4:], bad_images["text"]]
    inspector = Inspector.from_bundle(tiny_bundle, threads=1)
    batch = inspector.score(paths)
    assert [r.error is None for r in batch] == [p in goods for p in paths]

    def same(
        results: list,
    ) -> bool:  # equal results; scores to float32 rounding (a GEMM's last bit follows the batch shape)
        return [{**r.to_dict(), "score": None} for r in results] == [
            {**r.to_dict(), "score": None} for r in batch
        ] and all(
            (a.score is None and b.score is None) or abs(a.score - b.score) <= 1e-6 for a, b in zip(results, batch)
        )

    assert inspector.embedder.streams == 1, "threads=1: one batch at a time, the three-stage pipeline"
    for chunk in (1, 2, 4, 100):
        assert same(list(inspector.score_paths(iter(paths), chunk=chunk))), chunk
    blobs = [p.read_bytes() for p in paths]

    def named_in_order(results: list) -> bool:  # in-memory images keep their place in the caller's list across chunks
        return (
            [r.source for r in results] == [f"<image {i}>" for i in range(len(blobs))]
            and [r.error is None for r in results] == [r.error is None for r in batch]
            and all(r.error is None or f"<image {i}>" in r.error for i, r in enumerate(results))
        )

    assert named_in_order(list(inspector.score_paths(blobs, chunk=3)))
    # one call with more images than a chunk streams through score_paths (bounded memory), same results
    import inspector.engine as engine

    monkeypatch.setattr(engine, "SCORE_CHUNK", 3)
    assert same(inspector.score(paths)) and named_in_order(inspector.score(blobs))
    monkeypatch.undo()
    serial = Inspector.from_bundle(tiny_bundle, threads=1, decode_workers=1).score(paths)
    assert same(serial)
    # batches side by side, each on one core (the default on a multi-core CPU); more streams than batches too
    for streams in (2, 3):
        side = Inspector.from_bundle(tiny_bundle, threads=streams, streams=streams)
        assert side.embedder.streams == streams
        for chunk in (1, 2, 4, 100):
            assert same(list(side.score_paths(iter(paths), chunk=chunk))), (streams, chunk)
        assert named_in_order(list(side.score_paths(blobs, chunk=3)))
    # the plain path: one image at a time through the preprocessor, brute-force scores of the ORT embeddings
    pre, embedder = inspector.embedder.preprocessor, inspector.embedder
    plain = embedder.run(np.stack([pre(load_image(p)) for p in goods[:4] + goods[4:]]))[0]
    on_part = embedder.patch_valid([load_image(p).size for p in goods], plain)
    assert on_part is not None and not on_part.all(), "these 16-px-wide parts are letterboxed: some patches are padding"
    brute = GoldenBank(inspector.bundle.references, cells=0).anomaly_scores(
        plain, inspector.bundle.spec.scoring, on_part
    )
    assert np.abs(np.array([r.score for r in batch if r.error is None]) - brute).max() <= 1e-5
    pruned = GoldenBank(inspector.bundle.references, cells=3, probes=1)
    pruned.min_queries = 1  # this tiny model has few patches: force the pruned search
    assert (
        pruned.cells == 3
        and np.abs(pruned.anomaly_scores(plain, inspector.bundle.spec.scoring, on_part) - brute).max() <= 1e-5
    )
    assert pruned.last_exact_searches < plain.shape[0] * plain.shape[1]


def test_large_jpegs_decode_at_a_reduced_scale_alike_on_every_path(tiny_bundle: Path, tmp_path: Path) -> None:
    """A JPEG many times the input decodes at a reduced DCT scale (still 3x the size it is resized to); the line,
    the service's in-memory route and the heatmaps see the same pixels; a truncated file still fails; EXIF
    rotation is honoured; bundles from before (no reducing_gap) decode in full."""
    from dataclasses import replace

    from inspector.engine import Inspector
    from inspector.heatmap import score_with_maps

    rng = np.random.default_rng(5)
    base = Image.fromarray(rng.integers(30, 220, (12, 16, 3), dtype=np.uint8)).resize(
        (640, 480), Image.Resampling.BICUBIC
    )
    photo = Image.fromarray(
        np.clip(np.asarray(base).astype(int) + rng.integers(-8, 9, (480, 640, 3)), 0, 255).astype(np.uint8)
    )
    path = tmp_path / "large.jpg"
    photo.save(path, quality=92)
    inspector = Inspector.from_bundle(tiny_bundle, threads=1)
    pre = inspector.embedder.preprocessor
    assert pre.config.reducing_gap == 3.0 and pre.config.height == pre.config.width == 32
    seen = pre.load(path)
    assert seen.size == (160, 120), "input 32 px: the part is 32x24, so 1/4 scale keeps >= 3x (96x72)"
    assert load_image(path).size == (640, 480)
    one_step = Preprocessor(replace(pre.config, reducing_gap=None))
    assert one_step.load(path).size == (640, 480), "a bundle written before reducing_gap decodes in full"
    diff = np.abs(pre.resize(seen).astype(int) - one_step.resize(load_image(path)).astype(int))
    assert diff.mean() < 2.0 and diff.max() < 40
    line = inspector.score([path])[0].score
    assert line is not None
    assert inspector.score([pre.load(path, keep_gray=True)])[0].score == line  # the service decodes, then scores
    result, _amap, overlay = score_with_maps(inspector, [path])[0]
    assert result.score == pytest.approx(line, abs=1e-6) and overlay is not None and overlay.size == (640, 480)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        pre.load(truncated)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: upright 480x640
    rotated = tmp_path / "rotated.jpg"
    photo.save(rotated, quality=92, exif=exif)
    upright = pre.load(rotated)
    assert upright.size == (120, 160) and load_image(rotated).size == (480, 640)
    assert np.abs(pre.resize(upright).astype(int) - one_step.resize(load_image(rotated)).astype(int)).mean() < 2.0


def test_a_version_1_bundle_loads_and_scores_as_before(tmp_path: Path) -> None:
    """Version 1 left the on-part rule implicit and scored the letterbox padding: read as version 2, it still does."""
    from dataclasses import replace

    import torch

    from inspector.bundle import MANIFEST, SCHEMA_VERSION
    from inspector.engine import Inspector, OnnxEmbedder
    from inspector.scoring import GoldenBank
    from models.export import export_onnx
    from models.siamese import EmbedderConfig, build_embedder

    torch.manual_seed(0)
    model = build_embedder(EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=8))
    onnx_path = export_onnx(model, tmp_path / "m.onnx", height=64, width=64)  # a 4 x 4 patch grid
    pre = PreprocessConfig(height=64, width=64)
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    bank = OnnxEmbedder(onnx_path, pre).embed(refs).embeddings
    spec = BundleSpec(
        pre, ScoringConfig(offset=0.5), Threshold(0.5), model={"name": "t", "version": "1", "mode": "patch"}
    )
    old = write_bundle(tmp_path / "v1", onnx_path, bank.reshape(-1, bank.shape[-1]), spec)
    manifest = json.loads((old / MANIFEST).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION == 3
    manifest["schema_version"] = 1
    del manifest["manifest_sha256"]
    del manifest["scoring"]["content_only"]  # as version 1 wrote it
    (old / MANIFEST).write_text(json.dumps(manifest))
    narrow = Image.fromarray(rng.integers(0, 255, (64, 24, 3), dtype=np.uint8))  # letterboxed: padding left and right
    v1 = Inspector.from_bundle(old, threads=1)
    assert not v1.scorer.scoring.content_only
    emb, valid, _, _ = v1.embed([narrow])
    assert valid is not None and 0 < valid.sum() < valid.size
    golden = GoldenBank(v1.bundle.references, cells=0)
    with_padding = float(golden.anomaly_scores(emb, v1.scorer.scoring)[0])  # what version 1 computed: every patch
    on_part = float(golden.anomaly_scores(emb, replace(v1.scorer.scoring, content_only=True), valid)[0])
    assert v1.score([narrow])[0].score == pytest.approx(with_padding, abs=1e-6)
    assert with_padding != pytest.approx(on_part, abs=1e-3), "the test image tells the two rules apart"
