"""The whole-part score: the Gaussian of the golden parts' descriptors, the descriptor itself, and the bundle path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from inspector.bundle import load_bundle, write_bundle
from inspector.density import DensitySpec, GaussianDensity, ScoreScale
from inspector.engine import Inspector, OnnxEmbedder
from inspector.errors import BundleError, InspectorError
from inspector.preprocess import PreprocessConfig
from inspector.references import ReferencesError, add_references, remove_references
from inspector.scorer import RawScores, Scorer, ViewScales
from inspector.scoring import GoldenBank, ScoringConfig
from models.export import check_parity, export_onnx
from models.siamese import EmbedderConfig, build_embedder, pooled_on_part, stage_maps
from tests.parts import textured_parts


@pytest.mark.parametrize("n,p", [(60, 12), (25, 80)])
def test_gaussian_matches_ledoit_wolf_mahalanobis_even_with_more_channels_than_references(n: int, p: int) -> None:
    rng = np.random.default_rng(n)
    refs = rng.normal(size=(n, p)) * rng.uniform(0.2, 4.0, size=p)
    queries = rng.normal(size=(9, p)) * 3
    half = p // 2
    expected = sum(
        np.sqrt(LedoitWolf().fit(refs[:, s]).mahalanobis(queries[:, s])) for s in (slice(0, half), slice(half, p))
    )
    got = GaussianDensity(refs, [half, p - half]).distances(queries)
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_gaussian_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(InspectorError, match="at least 2"):
        GaussianDensity(np.ones((1, 4)), [4])
    with pytest.raises(InspectorError, match="do not add up"):
        GaussianDensity(np.ones((5, 4)), [3])
    with pytest.raises(InspectorError, match="NaN"):
        GaussianDensity(np.full((5, 2), np.nan), [2])
    # identical references: a degenerate covariance still gives finite distances, 0 at the references
    same = GaussianDensity(np.ones((5, 3)), [3])
    assert np.all(np.isfinite(same.distances(np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]]))))
    assert same.distances(np.ones((1, 3)))[0] == pytest.approx(0.0)


def test_fused_score_is_the_views_mean_or_the_larger_in_units_of_the_goods_spread() -> None:
    patch_scale, part_scale = (
        ScoreScale.of(np.array([1.0, 2.0, 3.0, 4.0, 5.0])),
        ScoreScale.of(np.array([10.0, 20.0, 30.0])),
    )
    assert (patch_scale.median, patch_scale.spread) == (3.0, 2.0)
    scorer = Scorer(GoldenBank(np.zeros((1, 2))), ScoringConfig(), scales=ViewScales(patch_scale, part_scale))
    scorer.part_model = GaussianDensity(np.eye(3), [3])  # fusion needs a whole-part view; the raw scores are given
    raw = RawScores(np.array([3.0, 9.0, 3.0]), np.array([20.0, 20.0, 60.0]))  # standardised: [0, 3, 0], [0, 0, 4]
    np.testing.assert_allclose(scorer.fuse(raw), [0.0, 1.5, 2.0])
    np.testing.assert_allclose(scorer.with_combine("max").fuse(raw), [0.0, 3.0, 4.0])
    np.testing.assert_allclose(scorer.with_combine("part").fuse(raw), [0.0, 0.0, 4.0])
    spec = scorer.density_spec(["a"] * 3)
    assert spec is not None and DensitySpec.from_dict(spec.to_dict()).combine == "mean"
    unnamed = {k: v for k, v in spec.to_dict().items() if k != "combine"}
    assert DensitySpec.from_dict(unnamed).combine == "max", "a bundle that names no rule was fused by the larger"
    np.testing.assert_allclose(scorer.patch_only().fuse(RawScores(np.array([3.0, 9.0]))), [3.0, 9.0])


def test_descriptor_pools_over_the_part_only() -> None:
    fmap = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    placement = torch.tensor(
        [[16.0, 0.0, 16.0, 32.0], [0.0, 0.0, 48.0, 32.0]]
    )  # image 0: the middle third of a 32x48 input
    out = pooled_on_part(fmap, placement, (32, 48))
    changed = fmap.clone()
    changed[0, :, :, :2] = 100.0  # padding of image 0 (cells whose centre is left of x = 16)
    changed[0, :, :, 4:] = -100.0
    np.testing.assert_allclose(pooled_on_part(changed, placement, (32, 48))[0], out[0], rtol=1e-6)
    # each channel's mean and sqrt(variance + eps) over the on-part cells, against float64; an absolute tolerance
    # too, since a mean of 8 normal draws can sit near 0, where float32 rounding is large relative to it
    for i, cells in ((0, fmap[0, :, :, 2:4]), (1, fmap[1])):
        cells = cells.reshape(3, -1).double()
        np.testing.assert_allclose(out[i, :3], cells.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[i, 3:], (cells.var(1, unbiased=False) + 1e-6).sqrt(), rtol=1e-5, atol=1e-6)


def _embedder(density_stages: int = 2, density_downscales: tuple[int, ...] = ()) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_embedder(
        EmbedderConfig(
            backbone="tiny_cnn",
            weights=None,
            feature_stages=(2, 3),
            embedding_dim=8,
            density_stages=density_stages,
            density_downscales=density_downscales,
        )
    ).eval()


@pytest.mark.parametrize("downscales", [(), (2,)])
def test_onnx_describes_letterboxed_parts_as_torch_does(tmp_path: Path, downscales: tuple[int, ...]) -> None:
    model = _embedder(density_downscales=downscales)
    path = export_onnx(model, tmp_path / "m.onnx", height=32, width=32)
    pre = PreprocessConfig(height=32, width=32)
    onnx = OnnxEmbedder(path, pre)
    assert onnx.describes_parts
    images = textured_parts(
        np.random.default_rng(0), 3, (0.3, 0.7), size=(48, 20)
    )  # wide parts: letterbox above and below
    prepared = onnx.prepare(images)
    emb, desc = onnx.run(prepared.batch, prepared.sizes)
    placement = onnx.placements(prepared.sizes)
    assert placement[0].tolist() == [0.0, 9.0, 32.0, 13.0]
    with torch.no_grad():
        t_emb, t_desc = model.forward_parts(torch.from_numpy(prepared.batch), torch.from_numpy(placement))
    np.testing.assert_allclose(emb, t_emb.numpy(), atol=1e-4)
    np.testing.assert_allclose(desc, t_desc.numpy(), rtol=1e-4, atol=1e-4)
    assert desc.shape == (3, sum(model.descriptor_blocks))
    assert check_parity(model, path, prepared.batch, placement=placement) <= 1e-4


def test_downscaled_pass_describes_the_part_again_from_the_pooled_input() -> None:
    """Each downscale adds one block per density stage: the same statistics of a pass over the average-pooled input,
    over the same part; configs written before the option read back without it."""
    torch.manual_seed(0)
    cfg = dict(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=8, density_stages=2)
    single = build_embedder(EmbedderConfig(**cfg, density_downscales=())).eval()
    double = build_embedder(EmbedderConfig(**cfg, density_downscales=(2,))).eval()
    double.load_state_dict(single.state_dict())
    assert double.descriptor_blocks == single.descriptor_blocks * 2
    x = torch.rand(2, 3, 64, 48)
    placement = torch.tensor([[0.0, 0.0, 48.0, 64.0], [8.0, 0.0, 32.0, 64.0]])
    with torch.no_grad():
        emb1, d1 = single.forward_parts(x, placement)
        emb2, d2 = double.forward_parts(x, placement)
        small = stage_maps(torch.nn.functional.avg_pool2d(x, 2), double.backbone, double.density_stages)
    width = sum(single.descriptor_blocks)
    torch.testing.assert_close(emb2, emb1)
    torch.testing.assert_close(d2[:, :width], d1)
    expected = torch.cat([pooled_on_part(m, placement, (64, 48)) for m in small], dim=1)
    torch.testing.assert_close(d2[:, width:], expected)
    assert not torch.allclose(d2[:, width:], d1)
    assert EmbedderConfig.from_dict({"density_stages": 4}).density_downscales == ()
    with pytest.raises(ValueError, match="density_downscales"):
        EmbedderConfig(density_downscales=(1,))


def test_whole_part_score_finds_parts_whose_every_patch_looks_good(
    density_bundle: tuple[Path, dict[str, list[Path]]],
) -> None:
    from inspector.metrics import roc_auc

    bundle_path, files = density_bundle
    inspector = Inspector.from_bundle(bundle_path)
    assert inspector.scorer.fuses
    good, patchy = files["good"], files["patchy"]
    onnx = inspector.embedder
    emb = onnx.embed(good + patchy)
    labels = np.r_[np.zeros(len(good)), np.ones(len(patchy))]
    patch_only = inspector.scorer.raw(emb.embeddings, emb.valid, emb.descriptors).patch
    fused = np.array([r.score for r in inspector.score(good + patchy)])
    assert roc_auc(labels, fused) > 0.95
    assert roc_auc(labels, fused) > roc_auc(labels, patch_only) + 0.2
    np.testing.assert_allclose(fused, inspector.score_embeddings(emb.embeddings, emb.valid, emb.descriptors))
    with pytest.raises(InspectorError, match="descriptors"):
        inspector.score_embeddings(emb.embeddings, emb.valid)
    # the heatmap colour scale is the patch distance that flags a part whose whole-part view is the goods' median:
    # under the views' mean, twice the threshold above the patch view's median
    spec = inspector.bundle.spec.density
    assert spec.combine == "mean"
    assert inspector.patch_threshold == pytest.approx(
        spec.patch_scale.median + 2 * inspector.threshold * spec.patch_scale.spread
    )
    larger = inspector.scorer.with_combine("max")
    assert larger.patch_threshold == pytest.approx(spec.patch_scale.median + larger.threshold * spec.patch_scale.spread)


def test_density_bundle_round_trip_and_tampering(
    density_bundle: tuple[Path, dict[str, list[Path]]], tmp_path: Path
) -> None:
    bundle_path, _ = density_bundle
    bundle = load_bundle(bundle_path)
    assert bundle.descriptors is not None and bundle.descriptors.shape[0] == 40
    assert isinstance(bundle.spec.density, DensitySpec) and len(bundle.spec.density.ids) == 40
    with pytest.raises(BundleError, match="come together"):
        write_bundle(tmp_path / "x", bundle.model_path, bundle.references, bundle.spec)
    copy = tmp_path / "copy"
    write_bundle(copy, bundle.model_path, bundle.references, bundle.spec, descriptors=bundle.descriptors)
    np.save(copy / "descriptors.npy", bundle.descriptors[::-1].copy())
    with pytest.raises(BundleError, match="descriptors.npy: sha256"):
        load_bundle(copy)


def test_new_golden_parts_join_the_gaussian_without_retraining(
    density_bundle: tuple[Path, dict[str, list[Path]]], tmp_path: Path
) -> None:
    bundle_path, files = density_bundle
    parent = load_bundle(bundle_path)
    grown = add_references(bundle_path, files["more"], tmp_path / "grown", recalibrate_good=files["cal"])
    child = load_bundle(grown)
    assert child.descriptors.shape[0] == 44
    assert child.spec.density.ids[:40] == ("initial",) * 40 and len(set(child.spec.density.ids[40:])) == 4
    np.testing.assert_array_equal(child.descriptors[:40], parent.descriptors)
    # re-calibrated as the grown bundle's line scores the goods: both view scales re-measured on them, the threshold
    # the calibration front end's on their fused scores
    from inspector.calibration import calibrate

    line = Inspector.from_bundle(grown)
    cal = line.embedder.embed(files["cal"])
    raw = line.scorer.raw(cal.embeddings, cal.valid, cal.descriptors)
    got, want, before = line.scorer.scales, ViewScales.of_goods(raw), Inspector.from_bundle(bundle_path).scorer.scales
    for view in ("patch", "part"):
        assert getattr(got, view).to_dict() == pytest.approx(getattr(want, view).to_dict(), rel=1e-5), view
        assert getattr(got, view) != getattr(before, view), view
    assert child.spec.threshold.value == pytest.approx(calibrate(line.scorer.fuse(raw)).value, rel=1e-5)
    assert child.spec.threshold.details["previous"] == parent.spec.threshold.to_dict()
    added = [i for i in child.spec.density.ids if i != "initial"]
    shrunk = load_bundle(remove_references(grown, added[:2], tmp_path / "shrunk"))
    assert shrunk.descriptors.shape[0] == 42 and not set(added[:2]) & set(shrunk.spec.density.ids)
    assert shrunk.spec.threshold == child.spec.threshold  # removing references keeps the threshold
    with pytest.raises(ReferencesError, match="at least 2"):
        remove_references(grown, ["initial", *added[:3]], tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    assert all(r.error is None for r in Inspector.from_bundle(shrunk.path).score(files["good"][:2]))


def test_heatmap_scores_are_the_line_scores(density_bundle: tuple[Path, dict[str, list[Path]]], tmp_path: Path) -> None:
    from inspector.heatmap import write_heatmaps

    bundle_path, files = density_bundle
    inspector = Inspector.from_bundle(bundle_path)
    paths = files["good"][:3] + files["patchy"][:3]
    written = list(write_heatmaps(inspector, paths, tmp_path / "maps"))
    np.testing.assert_allclose([r.score for r, _ in written], [r.score for r in inspector.score(paths)], rtol=1e-6)
    assert all(p is not None and p.is_file() for _, p in written)


def test_each_verdict_says_which_view_flagged_it(
    density_bundle: tuple[Path, dict[str, list[Path]]], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from inspector.cli import main

    bundle_path, files = density_bundle
    results = Inspector.from_bundle(bundle_path).score(files["good"][:2] + files["patchy"][:2])
    for r in results:
        assert r.views is not None and set(r.views) == {"patch", "part"}
        assert r.score == pytest.approx(np.mean(list(r.views.values())))  # the bundle fuses by the mean
    assert all(r.views["part"] > r.views["patch"] for r in results[2:])  # a patchy part is off as a whole
    main(["score", *map(str, files["patchy"][:2]), "--bundle", str(bundle_path), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(set(row["views"]) == {"patch", "part"} for row in rows)
    main(["check", str(bundle_path)])
    check = json.loads(capsys.readouterr().out)
    assert check["whole_part_score"]["references"] == 40 and check["whole_part_score"]["combine"] == "mean"


def test_a_view_decides_alone_only_when_held_out_defects_clearly_prefer_it() -> None:
    from pipelines.bundle_building import choose_views

    rng = np.random.default_rng(0)

    def views(patch: np.ndarray, part: np.ndarray) -> dict[str, np.ndarray]:
        return {"patch": patch, "part": part, "fused": 0.5 * (patch + part), "max": np.maximum(patch, part)}

    sharp_good, sharp_bad = rng.normal(0, 1, 60), rng.normal(4, 1, 30)  # a view that separates well
    noise_good, noise_bad = rng.normal(0, 3, 60), rng.normal(0.5, 3, 30)  # a view that is only noise
    chosen, info = choose_views(views(sharp_good, noise_good), views(sharp_bad, noise_bad))
    assert chosen == "patch" and not info["kept"] and info["wins_over_fused"]["patch"] >= 0.95
    assert info["validation_auroc"]["patch"] > info["validation_auroc"]["fused"]
    chosen, info = choose_views(views(noise_good, sharp_good), views(noise_bad, sharp_bad))
    assert chosen == "part" and info["kept"] and info["wins_over_fused"]["part"] >= 0.95
    twin_good, twin_bad = sharp_good + 0.01 * rng.normal(size=60), sharp_bad + 0.01 * rng.normal(size=30)
    assert choose_views(views(sharp_good, twin_good), views(sharp_bad, twin_bad))[0] == "fused", "a tie: the default"
    assert choose_views(views(sharp_good, noise_good), None)[0] == "fused", "no validation defects: the default"
    # defects of two kinds, each seen by one view only: the mean halves each, the larger keeps it
    goods = rng.normal(0, 1, (2, 200))
    kind = np.arange(100) < 50
    bad_patch = np.where(kind, rng.normal(4, 1, 100), rng.normal(0, 1, 100))
    bad_part = np.where(kind, rng.normal(0, 1, 100), rng.normal(4, 1, 100))
    chosen, info = choose_views(views(*goods), views(bad_patch, bad_part))
    assert chosen == "max" and info["combine"] == "max" and info["wins_over_fused"]["max"] >= 0.95
    # fewer than ten capture groups a side cannot move the default, however lopsided the resamples look
    tiles = [f"tile-{i % 3}" for i in range(60)]
    chosen, info = choose_views(views(sharp_good, noise_good), views(sharp_bad, noise_bad), good_groups=tiles)
    assert chosen == "fused" and info["resample_units"] == {"good": 3, "defective": 30}
    assert info["reason"].startswith("evidence from 3 good capture groups")
    chosen, info = choose_views(views(sharp_good[:8], noise_good[:8]), views(sharp_bad[:2], noise_bad[:2]))
    assert chosen == "fused" and info["reason"].startswith("evidence from 8 good and 2 defective capture groups")


def test_a_bundle_scored_by_its_whole_part_view_alone_scores_so_on_the_line(
    density_bundle: tuple[Path, dict[str, list[Path]]], tmp_path: Path
) -> None:
    """``combine: part`` in the bundle: the line's score is the standardised whole-part view, and it round-trips."""
    from dataclasses import replace

    bundle_path, images = density_bundle
    bundle = load_bundle(bundle_path)
    assert bundle.spec.density is not None
    spec = replace(bundle.spec, density=replace(bundle.spec.density, combine="part"))
    out = write_bundle(tmp_path / "part", bundle.model_path, bundle.references, spec, descriptors=bundle.descriptors)
    inspector = Inspector.from_bundle(out)
    results = inspector.score(images["good"][:3])
    assert all(r.score == pytest.approx(r.views["part"], abs=1e-6) for r in results)
    assert Scorer.from_bundle(load_bundle(out)).combine == "part"
    grown = add_references(out, images["more"], tmp_path / "grown", recalibrate_good=images["cal"])
    assert load_bundle(grown).spec.density.combine == "part", "re-calibration re-measures scales, not the rule"


def test_quantised_drift_is_measured_on_the_line_s_fused_score(
    density_bundle: tuple[Path, dict[str, list[Path]]], tmp_path: Path
) -> None:
    """INT8 moves the descriptors too: the drift and verdict flips are those of the score the threshold is in."""
    from inspector.quantize import quantize_bundle

    bundle_path, files = density_bundle
    calibration = files["cal"][:16]
    out = quantize_bundle(bundle_path, calibration, tmp_path / "q")
    drift = load_bundle(out).spec.provenance["quantization"]["drift"]
    assert "fused" in drift["score"] and {
        "patch_view_abs_diff_max",
        "part_view_abs_diff_max",
        "descriptor_drift_in_spreads",
    } <= set(drift)
    parent, child = Inspector.from_bundle(bundle_path), Inspector.from_bundle(out)
    fp32 = np.array([r.score for r in parent.score(calibration)])
    int8 = np.array([r.score for r in child.score(calibration)])
    assert drift["score_fp32_range"] == pytest.approx([fp32.min(), fp32.max()], rel=1e-6)
    assert drift["score_abs_diff_max"] == pytest.approx(np.abs(fp32 - int8).max(), rel=1e-4, abs=1e-6)
    assert drift["verdict_flips"] == int(np.sum((fp32 > parent.threshold) != (int8 > parent.threshold)))
    assert drift["part_view_abs_diff_max"] > 0


def test_late_stages_can_run_on_the_pooled_map(tmp_path: Path) -> None:
    """``density_pool``: the stages after the deepest feature stage run on its map pooled k x k (fewer cells through
    the costliest stages); the patch embeddings and the earlier stages' statistics stay exactly as they were, the
    ONNX export computes the same, and configs written before the option read back without it."""
    cfg = dict(backbone="tiny_cnn", weights=None, feature_stages=(1, 2), embedding_dim=8, density_stages=2)
    full = build_embedder(EmbedderConfig(**cfg)).eval()
    pooled = build_embedder(EmbedderConfig(**cfg, density_pool=2)).eval()
    pooled.load_state_dict(full.state_dict())
    assert pooled.density_stages == full.density_stages == (2, 3)
    x = torch.rand(2, 3, 64, 48)
    placement = torch.tensor([[0.0, 0.0, 48.0, 64.0], [8.0, 0.0, 32.0, 64.0]])
    with torch.no_grad():
        emb1, d1 = full.forward_parts(x, placement)
        emb2, d2 = pooled.forward_parts(x, placement)
        (stage2,) = stage_maps(x, pooled.backbone, (2,))
        stage3 = pooled.backbone.stages[3](torch.nn.functional.avg_pool2d(stage2, 2, ceil_mode=True))
    first = pooled.descriptor_blocks[0]
    torch.testing.assert_close(emb2, emb1)
    torch.testing.assert_close(d2[:, :first], d1[:, :first])
    torch.testing.assert_close(d2[:, first:], pooled_on_part(stage3, placement, (64, 48)))
    assert not torch.allclose(d2[:, first:], d1[:, first:])
    path = export_onnx(pooled, tmp_path / "m.onnx", height=64, width=48)
    assert check_parity(pooled, path, x.numpy(), placement=placement.numpy()) <= 1e-4
    assert EmbedderConfig.from_dict({"density_stages": 4}).density_pool == 1
    with pytest.raises(ValueError, match="density_pool"):
        EmbedderConfig(density_pool=0)
