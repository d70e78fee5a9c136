"""Patch-level embedding: labels from masks, the patch contrastive loss, patch scoring, coreset, pair dataset."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspector.preprocess import PreprocessConfig, Preprocessor, mask_pixels
from inspector.scoring import GoldenBank, ScoringConfig, anomaly_scores, knn_distances, patch_distances
from models.coreset import greedy_coreset
from models.losses import patch_contrastive_loss, patch_labels_from_masks
from models.siamese import EmbedderConfig, PatchEmbedder, SiameseNetwork, build_embedder
from models.training_data import PatchPairDataset

TINY_PATCH = EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=16, context=1)


def test_patch_labels_from_masks_marks_defect_ring_and_unknown() -> None:
    masks = torch.zeros(3, 16, 16)
    masks[0, 0:2, 0:2] = 1  # defect in the top-left cell of a 4x4 grid
    masks[2] = -1  # a real defect photo without a mask
    labels = patch_labels_from_masks(masks, (4, 4))
    assert labels[0, 0, 0] == 1
    assert labels[0, 0, 1] == -1 and labels[0, 1, 1] == -1  # the ring around it is ignored
    assert labels[0, 3, 3] == 0
    assert (labels[1] == 0).all() and (labels[2] == -1).all()


def test_patch_contrastive_loss_hand_example() -> None:
    # two images from the same source, one patch each, D=2.
    # image 0 good at (0,0); image 1 has a defect patch at (0.6,0).
    # normal term: image 0's only normal neighbour of another source → none (same source) → no normal term.
    # defect term: D to nearest normal = 0.6, margin 1 → 0.5*(0.4)^2 = 0.08
    patches = torch.tensor([[[0.0, 0.0]], [[0.6, 0.0]]], requires_grad=True)
    loss = patch_contrastive_loss(
        patches, torch.tensor([[0], [1]]), torch.tensor([0, 1]), torch.tensor([5, 5]), margin=1.0
    )
    assert loss.item() == pytest.approx(0.08, abs=1e-5)
    loss.backward()
    assert torch.isfinite(patches.grad).all()
    # a second good source 0.3 away adds the normal term 0.5*0.3^2 for each of the two good patches
    patches2 = torch.tensor([[[0.0, 0.0]], [[0.6, 0.0]], [[0.0, 0.3]]])
    loss2 = patch_contrastive_loss(
        patches2, torch.tensor([[0], [1], [0]]), torch.tensor([0, 1, 0]), torch.tensor([5, 5, 6]), margin=1.0
    )
    # defect nearest normal: min(0.6, sqrt(0.36+0.09)=0.67) = 0.6 → 0.08; normal: 0.5*0.09 = 0.045
    assert loss2.item() == pytest.approx(0.08 + 0.045, abs=1e-5)


def test_patch_scoring_is_worst_patch_distance() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 4)).astype(np.float32)
    queries = rng.normal(size=(3, 6, 4)).astype(np.float32)
    per_patch = patch_distances(queries, bank)
    assert per_patch.shape == (3, 6)
    expected = knn_distances(queries.reshape(-1, 4), bank, k=1)[:, 0].reshape(3, 6).max(axis=1)
    assert np.allclose(anomaly_scores(queries, bank, ScoringConfig()), expected, atol=1e-5)
    # a 3-D reference stack is the same as its flattened bank
    assert np.allclose(anomaly_scores(queries, bank.reshape(5, 10, 4)), expected, atol=1e-5)


def test_greedy_coreset_keeps_rare_points() -> None:
    rng = np.random.default_rng(0)
    common = rng.normal(scale=0.01, size=(1000, 8)).astype(np.float32)
    rare = np.full((3, 8), 5.0, np.float32) + rng.normal(scale=0.01, size=(3, 8)).astype(np.float32)
    points = np.concatenate([common, rare])
    chosen = greedy_coreset(points, 10, projection_dim=8)
    assert len(chosen) == 10 and len(set(chosen.tolist())) == 10
    # the far-away cluster is covered by one centre: the second one chosen, the farthest from any first
    assert np.count_nonzero(chosen >= 1000) == 1, "the far-away cluster must be covered, once"
    assert np.count_nonzero(greedy_coreset(points, 2, projection_dim=8) >= 1000) == 1
    assert np.array_equal(greedy_coreset(points, 5000), np.arange(len(points)))


def test_greedy_coreset_from_given_centres_adds_what_they_miss() -> None:
    rng = np.random.default_rng(1)
    common = rng.normal(scale=0.01, size=(1000, 8)).astype(np.float32)
    rare = np.array([[5.0] * 8, [-5.0] * 8, [5.0, -5.0] * 4], np.float32)
    points = np.concatenate([common, rare])
    given = np.arange(0, 1000, 10)  # a "random" subset that covers the common cluster only
    added = greedy_coreset(points, 3, given=given, projection_dim=8)
    assert sorted(added.tolist()) == [1000, 1001, 1002], "the three uncovered rare points come first"
    assert not set(greedy_coreset(points, 50, given=given, projection_dim=8).tolist()) & set(given.tolist())
    assert np.array_equal(greedy_coreset(points, 2000, given=given), np.setdiff1d(np.arange(len(points)), given))
    with pytest.raises(ValueError, match="given centre"):
        greedy_coreset(points, 3, given=np.array([5000]))


def test_reference_bank_random_subset_keeps_density_and_coreset_spreads() -> None:
    from pipelines.golden import reference_bank
    from pipelines.recipe import tiny_recipe

    rng = np.random.default_rng(0)
    common = rng.normal(scale=0.01, size=(50, 40, 8)).astype(np.float32)  # 50 parts x 40 patches
    common[0, :3] += 5.0  # three odd patches on one part
    flat = common.reshape(-1, 8)
    random_bank = reference_bank(common, tiny_recipe(max_bank_patches=100, bank_selection="random"))
    assert random_bank.shape == (100, 8)
    assert {tuple(r) for r in random_bank.tolist()} <= {tuple(r) for r in flat.tolist()}  # real patches, no duplicates
    assert len({tuple(r) for r in random_bank.tolist()}) == 100
    assert np.array_equal(
        random_bank, reference_bank(common, tiny_recipe(max_bank_patches=100, bank_selection="random"))
    )  # seeded
    assert (np.abs(random_bank).max(axis=1) > 1).sum() <= 1  # 3 in 2,000: a uniform subset rarely keeps an outlier
    coreset = reference_bank(common, tiny_recipe(max_bank_patches=100))  # the default
    assert (np.abs(coreset).max(axis=1) > 1).sum() >= 1  # k-center covers the far-away patches
    assert reference_bank(common, tiny_recipe(max_bank_patches=5000)).shape == (2000, 8)  # fewer than the cap: all
    assert reference_bank(common, tiny_recipe(max_bank_patches=0)).shape == (0, 8)
    with pytest.raises(ValueError, match="bank_selection"):
        reference_bank(common, tiny_recipe(max_bank_patches=100, bank_selection="kmeans"))


def test_patch_embedder_shapes_and_siamese_distance() -> None:
    torch.manual_seed(0)
    model = build_embedder(TINY_PATCH).eval()
    assert isinstance(model, PatchEmbedder)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z = model(x)
        channels = model.features(x).shape[1]
        assert z.shape == (2, 16, 16 + channels)  # stride 16 → 4x4 patches; head (16) beside the backbone's features
        assert model.embedding_dim == 16 + channels
        assert torch.allclose(z.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
        d = SiameseNetwork(model)(x, x)
    assert torch.allclose(d, torch.zeros(2), atol=1e-3)


def test_untrained_head_keeps_feature_distances_only_when_wide_enough(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    channels = build_embedder(TINY_PATCH).features(torch.zeros(1, 3, 64, 64)).shape[1]
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    for dim, isometric in [(channels, True), (channels // 4, False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="models.siamese"):
            model = build_embedder(replace(TINY_PATCH, embedding_dim=dim, keep_pretrained=False)).eval()
        assert ("lossy projection" in caplog.text) is not isometric
        with torch.no_grad():
            fa, fb = (torch.nn.functional.normalize(model.features(x), dim=1) for x in (a, b))
            ha, hb = (torch.nn.functional.normalize(model.head(f), dim=1).flatten(2)[0].T for f in (fa, fb))
            fa, fb = (f.flatten(2)[0].T for f in (fa, fb))
        same = torch.allclose(torch.cdist(ha, hb), torch.cdist(fa, fb), atol=1e-4)
        assert same is isometric


@pytest.mark.parametrize("weight", [0.5, 0.25])
def test_keep_pretrained_joins_head_and_features_as_weighted_squared_distance(weight: float) -> None:
    torch.manual_seed(0)
    model = build_embedder(replace(TINY_PATCH, learned_weight=weight)).eval()
    head_only = build_embedder(replace(TINY_PATCH, keep_pretrained=False)).eval()
    head_only.load_state_dict(model.state_dict())  # no parameters added: the same weights fit both
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight)  # a "trained" head, no longer orthogonal
        head_only.head.weight.copy_(model.head.weight)
        a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
        za, zb = model(a)[0], model(b)[0]
        ha, hb = head_only(a)[0], head_only(b)[0]
        fa = torch.nn.functional.normalize(model.features(a), dim=1).flatten(2)[0].T
        fb = torch.nn.functional.normalize(model.features(b), dim=1).flatten(2)[0].T
    joined = (za - zb).pow(2).sum(-1)
    assert torch.allclose(
        joined, weight * (ha - hb).pow(2).sum(-1) + (1 - weight) * (fa - fb).pow(2).sum(-1), atol=1e-5
    )
    assert torch.allclose(za.norm(dim=-1), torch.ones(len(za)), atol=1e-5)
    # configs saved before the options existed load as the head alone, and joins as equal halves
    assert (
        EmbedderConfig.from_dict(
            {k: v for k, v in TINY_PATCH.to_dict().items() if k != "keep_pretrained"}
        ).keep_pretrained
        is False
    )
    old_join = {k: v for k, v in TINY_PATCH.to_dict().items() if k != "learned_weight"}
    assert EmbedderConfig.from_dict(old_join).learned_weight == 0.5
    assert EmbedderConfig().learned_weight == 0.5


@pytest.mark.parametrize("weight", [0.0, 1.0, -0.1])
def test_learned_weight_must_leave_both_halves(weight: float) -> None:
    with pytest.raises(ValueError, match="learned_weight"):
        EmbedderConfig(learned_weight=weight)


def test_patch_pair_dataset_items(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = []
    for i in range(4):
        p = tmp_path / f"g{i}.png"
        Image.fromarray(rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)).save(p)
        good.append(p)
    bad, mask = tmp_path / "bad.png", tmp_path / "bad_mask.png"
    Image.fromarray(rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)).save(bad)
    m = np.zeros((40, 40), np.uint8)
    m[10:20, 10:20] = 255
    Image.fromarray(m).save(mask)
    pre = Preprocessor(PreprocessConfig(height=32, width=32))
    ds = PatchPairDataset(good, [bad], pre, defective_masks=[mask], synthetic_fraction=0.5, epoch_size=8, seed=3)
    kinds = set()
    for i in range(len(ds)):
        images, masks, sources, labels = ds[i]
        assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
        assert labels.tolist() == [0, 1] and (masks[0] == 0).all() and (masks[1] > 0).any()
        kinds.add("real" if sources[1] < 0 else "synthetic")
        if sources[1] >= 0:
            assert sources[0] == sources[1]  # synthetic defect made from the same good image
    assert kinds == {"real", "synthetic"}
    again = PatchPairDataset(good, [bad], pre, defective_masks=[mask], synthetic_fraction=0.5, epoch_size=8, seed=3)
    assert torch.equal(ds[5][0], again[5][0])


def test_masks_mark_the_defect_however_they_are_stored(tmp_path: Path) -> None:
    """0/255, 0/1, 16-bit and coloured masks mark the same pixels; a fixed 128 cut used to find none in a 0/1 mask,
    and the pair dataset then taught every patch of that defect photo as normal. A mask that marks nothing says
    nothing about where the defect is: the photo trains as "somewhere" (-1), like one without a mask."""
    region = np.zeros((40, 40), bool)
    region[10:20, 12:24] = True
    stored = {
        "255": Image.fromarray(region.astype(np.uint8) * 255),
        "01": Image.fromarray(region.astype(np.uint8)),
        "16bit": Image.fromarray(region.astype(np.uint16) * 65535),
        "red": Image.fromarray(
            np.stack([region * 255, np.zeros_like(region), np.zeros_like(region)], -1).astype(np.uint8)
        ),
        "jpeg-noise": Image.fromarray((region * 250 + (~region) * 6).astype(np.uint8)),
    }
    for name, mask in stored.items():
        assert np.array_equal(mask_pixels(mask), region), name
    assert not mask_pixels(Image.new("L", (8, 8))).any()

    rng = np.random.default_rng(0)
    good = []
    for i in range(2):
        good.append(tmp_path / f"g{i}.png")
        Image.fromarray(rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)).save(good[-1])
    bad = tmp_path / "bad.png"
    Image.fromarray(rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)).save(bad)
    stored["01"].save(tmp_path / "ones.png")
    Image.new("L", (40, 40)).save(tmp_path / "empty.png")
    pre = Preprocessor(PreprocessConfig(height=40, width=40))
    for mask, expect in ((tmp_path / "ones.png", region), (tmp_path / "empty.png", None)):
        ds = PatchPairDataset(
            good, [bad], pre, defective_masks=[mask], synthetic_fraction=0.0, augment=None, epoch_size=2, seed=0
        )
        _, masks, sources, _ = ds[0]
        assert sources[1] < 0  # a real defect photo
        if expect is None:
            assert (masks[1] == -1).all()
        else:
            assert np.array_equal(masks[1].numpy() > 0, expect)


def _scores_before_golden_bank(emb: np.ndarray, bank: np.ndarray, k: int, aggregation: str, chunk: int) -> np.ndarray:
    """The line's scoring as it was before the pruned search, frozen here as the equality oracle."""
    q, r = emb.reshape(-1, emb.shape[-1]).astype(np.float32), bank.astype(np.float32)
    r_sq = np.einsum("ij,ij->i", r, r)
    best = np.full((len(q), 0), np.inf, dtype=np.float32)
    for start in range(0, len(r), chunk):
        partial = q @ r[start : start + chunk].T * -2.0 + r_sq[None, start : start + chunk]
        merged = np.concatenate([best, partial], axis=1)
        best = (
            np.take_along_axis(merged, np.argpartition(merged, k - 1, axis=1)[:, :k], axis=1)
            if merged.shape[1] > k
            else merged
        )
    d = np.sqrt(np.maximum(np.sort(best, axis=1) + np.einsum("ij,ij->i", q, q)[:, None], 0.0))
    per_patch = {"mean": np.mean, "max": np.max, "min": np.min}[aggregation](d, axis=1).reshape(emb.shape[:-1])
    return per_patch.max(axis=1) if per_patch.ndim == 2 else per_patch


def _clustered_patches(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    """Unit vectors near a few centres, like the L2-normalised patch embeddings of one product."""
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=spread, size=(n, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("k", "aggregation"), [(1, "mean"), (3, "mean"), (3, "max"), (2, "min")])
def test_golden_bank_pruned_search_equals_the_old_brute_force(k: int, aggregation: str) -> None:
    rng = np.random.default_rng(k)
    centres = rng.normal(size=(40, 16))
    bank = _clustered_patches(rng, centres, 3000, 0.15)
    parts = _clustered_patches(rng, centres, 12 * 49, 0.15).reshape(12, 49, 16)
    parts[3, 7] = _clustered_patches(rng, rng.normal(size=(1, 16)), 1, 0.0)[0]  # a defect patch far from every cell
    parts[5, :10] = bank[:10]  # patches identical to references: distance 0 (rounding must not go negative)
    cfg = ScoringConfig(k=k, aggregation=aggregation, chunk_size=700)  # type: ignore[arg-type]
    expected = _scores_before_golden_bank(parts, bank, k, aggregation, chunk=700)
    direct = np.sort(
        np.linalg.norm(parts.reshape(-1, 1, 16).astype(np.float64) - bank[None].astype(np.float64), axis=2), axis=1
    )[:, :k]
    assert np.allclose(
        expected,
        {"mean": np.mean, "max": np.max, "min": np.min}[aggregation](direct, axis=1).reshape(12, 49).max(axis=1),
        atol=1e-5,
    )
    for cells, probes in ((None, 2), (7, 1), (400, 3)):  # default cells, very coarse cells, cells smaller than k
        golden = GoldenBank(bank, cells=cells, probes=probes, chunk_size=700)
        assert golden.cells > 1
        got = golden.anomaly_scores(parts, cfg)
        assert got.shape == (12,) and got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-5, (cells, probes)
        assert np.argmax(got) == 3
        if cells is None:
            assert golden.last_exact_searches < parts.shape[0] * parts.shape[1] // 2, (
                "the bounds must skip most patches"
            )
    assert np.abs(anomaly_scores(parts, bank, cfg) - expected).max() <= 1e-5  # the functional API prunes too
    assert np.allclose(patch_distances(parts, GoldenBank(bank), cfg).max(axis=1), expected, atol=1e-5)


def test_golden_bank_on_unstructured_data_and_small_inputs() -> None:
    """Random Gaussian patches (bounds prune little), one image (brute-force path), image mode, empty input."""
    rng = np.random.default_rng(7)
    bank = rng.normal(size=(2500, 8)).astype(np.float32)
    golden = GoldenBank(bank)
    for shape in ((6, 30, 8), (1, 30, 8), (9, 8)):
        emb = rng.normal(size=shape).astype(np.float32)
        assert np.abs(golden.anomaly_scores(emb) - _scores_before_golden_bank(emb, bank, 1, "mean", 8192)).max() <= 1e-5
    assert golden.anomaly_scores(np.zeros((0, 30, 8), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        golden.anomaly_scores(np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="empty"):
        GoldenBank(np.zeros((0, 8), np.float32))


def test_concurrent_searches_agree_and_leave_blas_on_one_thread() -> None:
    """The service scores from several request threads at once: same scores, and numpy's BLAS on one thread."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(11)
    centres = rng.normal(size=(20, 16))
    golden = GoldenBank(_clustered_patches(rng, centres, 2500, 0.2))
    parts = [_clustered_patches(rng, centres, 4 * 40, 0.2).reshape(4, 40, 16) for _ in range(16)]
    serial = [golden.anomaly_scores(p) for p in parts]  # pytest's main thread: the setting takes effect here
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(golden.anomaly_scores, parts))
    assert all(np.array_equal(a, b) for a, b in zip(serial, concurrent))
    blas = [info for info in threadpool_info() if info["user_api"] == "blas"]
    assert [info["num_threads"] for info in blas if "numpy" in info["filepath"]] == [1]


def test_offset_discounts_a_whole_part_shift_but_not_a_local_defect() -> None:
    """A good part that is off all over (another lighting) against a part with one far patch: with the offset the
    defect ranks first; without it the shifted good part does. The score is worst − offset × median, exactly."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 16))
    bank = _clustered_patches(rng, centres, 3000, 0.1)
    good = _clustered_patches(rng, centres, 3 * 64, 0.1).reshape(3, 64, 16)
    shifted = _clustered_patches(rng, centres, 64, 0.35).reshape(1, 64, 16)  # every patch a bit further away
    defect = _clustered_patches(rng, centres, 64, 0.1).reshape(1, 64, 16)
    far = defect[0, 10] + 0.1 * rng.normal(size=16)  # one patch moderately far: nearer than the shifted part's worst
    defect[0, 10] = far / np.linalg.norm(far)
    parts = np.concatenate([good, shifted, defect])
    exact = patch_distances(parts, bank)
    plain = anomaly_scores(parts, bank, ScoringConfig())
    assert np.argmax(plain) == 3, "without the offset the part that is off all over scores worst"
    for cells in (0, None):  # exact brute force, and the partitioned bank the line uses
        golden = GoldenBank(bank, cells=cells)
        for offset in (0.5, 1.0):
            cfg = ScoringConfig(offset=offset)
            scores = golden.anomaly_scores(parts, cfg)
            worst, typical = golden.worst_and_typical(parts, cfg)
            assert np.allclose(worst, exact.max(axis=1), atol=1e-5), "the worst patch stays exact"
            assert np.allclose(typical, np.median(exact, axis=1), rtol=0.05), "the typical distance is the median"
            assert np.allclose(scores, worst - offset * typical, atol=1e-6)
            assert np.allclose(golden.typical_distances(parts, cfg), typical)
        assert np.argmax(golden.anomaly_scores(parts, ScoringConfig(offset=1.0))) == 4, "with it, the local defect does"
    assert np.allclose(GoldenBank(bank, cells=0).typical_distances(parts), np.median(exact, axis=1), atol=1e-6)


def test_offset_settings_are_checked_and_old_bundles_keep_the_plain_score() -> None:
    with pytest.raises(ValueError, match="offset must be in"):
        ScoringConfig(offset=1.5)
    with pytest.raises(ValueError, match="patch embeddings"):
        GoldenBank(np.eye(4, dtype=np.float32)).worst_and_typical(np.eye(4, dtype=np.float32))
    assert ScoringConfig.from_dict({"k": 1, "aggregation": "mean"}).offset == 0.0  # written before the option existed
    assert ScoringConfig.from_dict(ScoringConfig(offset=0.5).to_dict()).offset == 0.5


def test_heatmap_maximum_is_the_offset_score() -> None:
    from inspector.scorer import Scorer

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(20, 8))
    bank = GoldenBank(_clustered_patches(rng, centres, 2500, 0.1))
    parts = _clustered_patches(rng, centres, 4 * 12, 0.2).reshape(4, 12, 8)
    cfg = ScoringConfig(offset=0.5)
    maps = Scorer(bank, cfg).patch_maps(parts, 16, 12)
    assert maps.shape == (4, 4, 3)
    assert np.allclose(maps.max(axis=(1, 2)), bank.anomaly_scores(parts, cfg), atol=1e-5)


def test_choose_offset_follows_where_the_defects_are() -> None:
    """Local defects on parts that vary as a whole → the full offset; goods with local quirks whose defects are a
    whole-part shift → none; too few held-out parts to tell → the configured offset."""
    from pipelines.bundle_building import choose_offset

    rng = np.random.default_rng(9)
    centres = rng.normal(size=(30, 16))
    bank = GoldenBank(_clustered_patches(rng, centres, 3000, 0.1))

    def one_far_patch(n: int, scale: float) -> np.ndarray:
        parts = np.stack([_clustered_patches(rng, centres, 64, 0.1) for _ in range(n)])
        far = parts[:, 5] + scale * rng.normal(size=(n, 16))
        parts[:, 5] = far / np.linalg.norm(far, axis=1, keepdims=True)
        return parts

    varied_good = np.stack([_clustered_patches(rng, centres, 64, s) for s in rng.uniform(0.1, 0.4, size=20)])
    local_defects = one_far_patch(20, 0.1)
    scoring = ScoringConfig(offset=0.5)
    chosen, info = choose_offset(bank, varied_good, local_defects, scoring, (0.0, 0.5, 1.0))
    assert chosen.offset == 1.0 and info["offset"] == 1.0 and set(info["offset_auroc"]) == {"0.0", "0.5", "1.0"}
    assert info["offset_auroc"]["1.0"] > info["offset_auroc"]["0.0"] + 0.2 and info["offset_wins"]["1.0"] >= 0.95
    assert chosen.k == scoring.k
    assert choose_offset(bank, varied_good, local_defects, scoring, (0.0, 0.5, 1.0))[1] == info, (
        "seeded: the same choice every time"
    )

    quirky_good = one_far_patch(20, 0.08)
    whole_defects = np.stack([_clustered_patches(rng, centres, 64, 0.25) for _ in range(20)])
    moved, why = choose_offset(bank, quirky_good, whole_defects, scoring, (0.0, 0.5, 1.0))
    assert moved.offset == 0.0 and why["offset_auroc"]["0.0"] > why["offset_auroc"]["0.5"] + 0.1

    few_parts, few = choose_offset(bank, varied_good[:6], local_defects[:4], scoring, (0.0, 0.5, 1.0))
    assert (
        few_parts.offset == 0.5
        and few["offset_auroc"]["1.0"] > few["offset_auroc"]["0.5"]
        and few["offset_wins"]["1.0"] < 0.95
        and few["offset_kept_because"].startswith("evidence from 6 good and 4 defective capture groups")
    )
    assert "offset_kept_because" not in info
    assert (
        choose_offset(bank, varied_good, local_defects, ScoringConfig(offset=0.0), ())[0].offset == 0.0
    )  # nothing else to try


def test_choose_offset_resamples_whole_capture_groups() -> None:
    """Sixteen photos of one part outvote four of another when each photo counts; with capture groups resampled,
    two parts that disagree are no evidence either way, so the configured offset stays."""
    from pipelines.bundle_building import _cluster_draws, choose_offset

    rng = np.random.default_rng(11)
    centres = rng.normal(size=(30, 16))
    bank = GoldenBank(_clustered_patches(rng, centres, 3000, 0.1))
    good = np.stack([_clustered_patches(rng, centres, 64, s) for s in rng.uniform(0.1, 0.4, size=24)])
    local = np.stack([_clustered_patches(rng, centres, 64, 0.1) for _ in range(16)])
    far = local[:, 5] + 0.1 * rng.normal(size=(16, 16))
    local[:, 5] = far / np.linalg.norm(far, axis=1, keepdims=True)
    whole = np.stack([_clustered_patches(rng, centres, 64, 0.45) for _ in range(4)])
    defects = np.concatenate([local, whole])
    scoring = ScoringConfig(offset=0.5)
    by_image, info = choose_offset(bank, good, defects, scoring, (0.0, 0.5, 1.0))
    assert by_image.offset == 1.0 and info["offset_resampled"] == "images"
    groups = ["tile-a"] * 16 + ["tile-b"] * 4
    by_group, why = choose_offset(
        bank, good, defects, scoring, (0.0, 0.5, 1.0), good_groups=[f"g{i}" for i in range(24)], defective_groups=groups
    )
    assert by_group.offset == 0.5 and why["offset_wins"]["1.0"] < 0.95
    assert why["offset_resampled"] == "groups" and why["offset_resample_units"] == {"good": 24, "defective": 2}
    assert why["offset_kept_because"].startswith("evidence from 2 defective capture groups")

    draws = _cluster_draws(["a", "a", "b", "c", "c", "c"], 6, 50, np.random.default_rng(0))
    for d in draws:  # every draw is whole groups: a group's members come together, as often as it was drawn
        counts = np.bincount(d, minlength=6)
        assert counts[0] == counts[1] and counts[3] == counts[4] == counts[5]
    with pytest.raises(ValueError, match="group ids"):
        _cluster_draws(["a"], 2, 1, np.random.default_rng(0))


def test_split_records_each_images_capture_group(tmp_path: Path) -> None:
    from models.demo_data import generate_demo_dataset
    from pipelines.data.layouts import scan_mvtec
    from pipelines.data.manifest import build_manifest
    from pipelines.data.split import SplitFractions, assign_splits

    generate_demo_dataset(tmp_path, seed=2, n_train_good=12, n_test_good=2, n_test_per_defect=2, height=32, width=32)
    records = scan_mvtec(tmp_path)
    manifest = build_manifest(records, group_of={r.path: f"part{i // 3}" for i, r in enumerate(records)})
    split = assign_splits(manifest, SplitFractions())
    assert set(split.groups) == {str(r.path) for r in records}
    ids = split.group_ids(split.calibration_good + split.train_good)
    assert len(set(ids)) < len(ids)  # photos of one part share a group
    assert split.group_ids([tmp_path / "unknown.png"]) == [f"image:{tmp_path / 'unknown.png'}"]


def test_content_mask_follows_the_letterbox() -> None:
    pre = Preprocessor(PreprocessConfig(height=64, width=32))  # an 8x4 grid of 8-px patches
    tall = pre.content_mask([(32, 64)], (8, 4))  # the canvas' own shape: every patch on the part
    assert tall.shape == (1, 32) and tall.all()
    wide = pre.content_mask([(64, 32)], (8, 4)).reshape(8, 4)  # 32x16 on the canvas, rows 24..40
    assert wide.all(axis=1).tolist() == [False, False, False, True, True, False, False, False]
    narrow = pre.content_mask([(4, 64)], (8, 4)).reshape(
        8, 4
    )  # x 14..18 on the canvas: no column centre (4, 12, 20, 28) on it
    assert not narrow.any()
    stretch = Preprocessor(PreprocessConfig(height=64, width=32, resize="stretch")).content_mask([(64, 32)], (8, 4))
    assert stretch.all(), "a stretched image has no padding"


@pytest.mark.parametrize("cells", [0, None])
@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_scores_use_only_the_patches_on_the_part(cells: int | None, offset: float) -> None:
    """Padding patches neither raise the score (a far one) nor lower the typical distance (near ones)."""
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(30, 16))
    bank = _clustered_patches(rng, centres, 3000, 0.1)
    parts = _clustered_patches(rng, centres, 5 * 64, 0.2).reshape(5, 64, 16)
    valid = np.ones((5, 64), bool)
    valid[1, :40] = False  # mostly padding
    valid[2, 5] = False
    parts[2, 5] = 3.0  # the far patch lies on the padding: it must not count
    valid[3] = False  # no patch on the part: all of them count rather than none
    exact = patch_distances(parts, bank)
    golden = GoldenBank(bank, cells=cells)
    cfg = ScoringConfig(offset=offset)
    worst, typical = golden.worst_and_typical(parts, cfg, valid)
    on = np.where(valid.any(axis=1, keepdims=True), valid, True)
    assert np.allclose(worst, [exact[i][on[i]].max() for i in range(5)], atol=1e-5)
    assert np.allclose(typical, [np.median(exact[i][on[i]]) for i in range(5)], rtol=0.05)
    scores = golden.anomaly_scores(parts, cfg, valid)
    assert np.allclose(scores, worst - offset * typical, atol=1e-5)
    assert scores[2] < exact[2].max() - 1.0, "the far padding patch is ignored"
    assert np.allclose(anomaly_scores(parts, golden, cfg, valid), scores, atol=1e-6)
    # a config that scores the padding (bundles written before the option) ignores the mask
    old = ScoringConfig(offset=offset, content_only=False)
    assert not old.content_only and np.allclose(
        golden.anomaly_scores(parts, old, valid), golden.anomaly_scores(parts, old), atol=1e-6
    )
    with pytest.raises(ValueError, match="one flag per patch"):
        golden.anomaly_scores(parts, cfg, valid[:, :10])


def test_heatmap_reads_zero_off_the_part_and_keeps_the_score() -> None:
    from inspector.scorer import Scorer

    rng = np.random.default_rng(6)
    centres = rng.normal(size=(20, 8))
    bank = GoldenBank(_clustered_patches(rng, centres, 2500, 0.1))
    parts = _clustered_patches(rng, centres, 3 * 12, 0.2).reshape(3, 12, 8)
    valid = np.ones((3, 12), bool)
    valid[0, :3] = False
    parts[0, 0] = 5.0
    cfg = ScoringConfig(offset=0.5)
    maps = Scorer(bank, cfg).patch_maps(parts, 16, 12, valid)
    assert (maps[0].ravel()[:3] == 0).all()
    assert np.allclose(maps.max(axis=(1, 2)), bank.anomaly_scores(parts, cfg, valid), atol=1e-5)


def test_golden_bank_holds_no_padding() -> None:
    from pipelines.golden import reference_bank
    from pipelines.recipe import tiny_recipe

    emb = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    valid = np.array([[True] * 6, [False, False, True, True, False, False]])
    assert reference_bank(emb, tiny_recipe(), valid).shape == (8, 3)
    assert reference_bank(emb, tiny_recipe()).shape == (12, 3)
