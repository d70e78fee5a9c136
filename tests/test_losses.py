"""Losses against hand-computed examples, against brute force, in the training loop, and on a toy problem."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.losses import (
    ContrastiveLoss,
    TripletLoss,
    contrastive_loss,
    in_batch_contrastive_loss,
    in_batch_triplet_loss,
    pairwise_distances,
    patch_labels_from_masks,
    patch_triplet_loss,
)


def points(*xs: float) -> torch.Tensor:
    """1-D positions as (N, 2) embeddings on the x axis, so distances are |x_i - x_j| and easy to do by hand."""
    return torch.tensor([[x, 0.0] for x in xs], requires_grad=True)


# --- distances ------------------------------------------------------------------------------------------------


def test_pairwise_distances_of_a_3_4_5_triangle() -> None:
    e = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    d = pairwise_distances(e)
    expected = torch.tensor([[0.0, 3.0, 4.0], [3.0, 0.0, 5.0], [4.0, 5.0, 0.0]])
    torch.testing.assert_close(d, expected)
    assert torch.equal(d.diagonal(), torch.zeros(3))  # exactly 0, not ~1e-6
    assert d.device == e.device and d.dtype == torch.float32


def test_pairwise_distances_keep_the_device() -> None:
    e = torch.empty(5, 8, device="meta")
    assert pairwise_distances(e).device.type == "meta"


def test_pairwise_distances_are_accurate_for_close_unit_vectors() -> None:
    # two L2-normalised embeddings ~1e-3 apart: the plain Gram form |a|²+|b|²-2a·b cancels in float32 (~0.1 %
    # error); centring on the batch mean removes most of the cancelling terms
    a = torch.nn.functional.normalize(torch.randn(1, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    b = torch.nn.functional.normalize(a + 1e-3 * torch.randn(1, 128, generator=torch.Generator().manual_seed(1)), dim=1)
    d = pairwise_distances(torch.cat([a, b]))[0, 1]
    torch.testing.assert_close(d.double(), (a.double() - b.double()).norm(), rtol=1e-4, atol=0)


def test_gradients_are_finite_when_two_embeddings_are_identical() -> None:
    base = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 0])
    for loss_fn in (
        lambda e: pairwise_distances(e).sum(),
        lambda e: in_batch_contrastive_loss(e, labels),
        lambda e: in_batch_contrastive_loss(e, labels, normal_label=None),
        lambda e: in_batch_triplet_loss(e, labels, mining="hard"),
        lambda e: in_batch_triplet_loss(e, labels, mining="all"),
        lambda e: patch_triplet_loss(
            e[:, None], torch.zeros(4, 1), torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 2, 3])
        ),
    ):
        e = base.clone()
        e[1] = e[0]  # rows 0 and 1 coincide
        e.requires_grad_(True)
        loss = loss_fn(e)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(e.grad).all()


# --- contrastive ----------------------------------------------------------------------------------------------


def test_contrastive_loss_hand_computed() -> None:
    # similar D=0.3:            0.5 * 0.3²               = 0.045
    # dissimilar D=0.4, m=1:    0.5 * max(0, 1-0.4)² = 0.5*0.36 = 0.18
    # dissimilar D=1.2 (> m):   0.5 * max(0, 1-1.2)² = 0
    # mean = (0.045 + 0.18 + 0) / 3 = 0.075
    d = torch.tensor([0.3, 0.4, 1.2])
    y = torch.tensor([0, 1, 1])
    assert contrastive_loss(d[:1], y[:1]).item() == pytest.approx(0.045)
    assert contrastive_loss(d[1:2], y[1:2]).item() == pytest.approx(0.18)
    assert contrastive_loss(d, y).item() == pytest.approx(0.075)
    # margin 2: dissimilar D=0.4 → 0.5 * 1.6² = 1.28; D=1.2 → 0.5 * 0.8² = 0.32; mean with 0.045 = 1.645/3
    assert contrastive_loss(d, y, margin=2.0).item() == pytest.approx(1.645 / 3)


def test_in_batch_contrastive_filters_pairs_by_normal_label() -> None:
    # positions 0.0 (good), 0.3 (good), 0.4 (defect A), 0.5 (defect B); m = 1
    # (0,1) good-good   D=0.3 similar     0.5*0.09        = 0.045
    # (0,2) good-A      D=0.4 dissimilar  0.5*0.6²        = 0.18
    # (0,3) good-B      D=0.5 dissimilar  0.5*0.5²        = 0.125
    # (1,2) good-A      D=0.1 dissimilar  0.5*0.9²        = 0.405
    # (1,3) good-B      D=0.2 dissimilar  0.5*0.8²        = 0.32
    # (2,3) A-B         D=0.1 dissimilar  0.5*0.9²        = 0.405   ← used only when normal_label=None
    e = points(0.0, 0.3, 0.4, 0.5)
    labels = torch.tensor([0, 0, 1, 2])
    assert in_batch_contrastive_loss(e, labels).item() == pytest.approx(1.075 / 5, abs=1e-6)
    assert in_batch_contrastive_loss(e, labels, normal_label=None).item() == pytest.approx(1.48 / 6, abs=1e-6)
    assert ContrastiveLoss()(e, labels).item() == pytest.approx(1.075 / 5, abs=1e-6)


@pytest.mark.parametrize("normal_label", [0, None])
def test_in_batch_contrastive_equals_explicit_pairs(normal_label: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.randn(9, 6, generator=g) * 0.4
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 0, 3, 2])
    pairs = [
        (i, j)
        for i, j in itertools.combinations(range(len(labels)), 2)
        if normal_label is None or normal_label in (labels[i].item(), labels[j].item())
    ]
    first, second = e[[i for i, _ in pairs]], e[[j for _, j in pairs]]
    dissimilar = torch.tensor([labels[i] != labels[j] for i, j in pairs])
    expected = contrastive_loss((first - second).norm(dim=1), dissimilar, margin=1.5)
    got = in_batch_contrastive_loss(e, labels, margin=1.5, normal_label=normal_label)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_in_batch_contrastive_without_usable_pairs_is_zero_with_grad() -> None:
    e = points(0.0, 0.1, 0.2)
    loss = in_batch_contrastive_loss(e, torch.tensor([1, 2, 2]))  # defects only
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(e.grad, torch.zeros_like(e))


def test_in_batch_losses_check_shapes() -> None:
    with pytest.raises(ValueError, match="labels"):
        in_batch_contrastive_loss(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="mining"):
        labels = torch.zeros(3, dtype=torch.long)
        in_batch_triplet_loss(torch.zeros(3, 2), labels, mining="semi")  # type: ignore[arg-type]


# --- triplet --------------------------------------------------------------------------------------------------


def test_batch_hard_picks_the_farthest_positive_and_nearest_negative() -> None:
    # goods at 0.0, 0.1, 0.5; defect A at 0.7, defect B at 2.0; m = 0.5
    # anchor 0.0: farthest good 0.5 (d 0.5), nearest defect 0.7 (d 0.7) → 0.5-0.7+0.5 = 0.3
    # anchor 0.1: farthest good 0.5 (d 0.4), nearest defect 0.7 (d 0.6) → 0.4-0.6+0.5 = 0.3
    # anchor 0.5: farthest good 0.0 (d 0.5), nearest defect 0.7 (d 0.2) → 0.5-0.2+0.5 = 0.8
    # mean = 1.4 / 3; defects are never anchors (normal_label=0)
    e = points(0.0, 0.1, 0.5, 0.7, 2.0)
    labels = torch.tensor([0, 0, 0, 1, 2])
    loss = in_batch_triplet_loss(e, labels, margin=0.5, mining="hard")
    assert loss.item() == pytest.approx(1.4 / 3, abs=1e-6)
    loss.backward()
    # the far defect at 2.0 is never the nearest negative, so it receives no gradient; the near one does
    assert torch.equal(e.grad[4], torch.zeros(2))
    assert e.grad[3, 0] < 0  # a descent step moves it away from the goods (towards +x)
    assert TripletLoss(margin=0.5)(e, labels).item() == pytest.approx(1.4 / 3, abs=1e-6)


def _brute_force_triplets(labels: torch.Tensor, normal_label: int | None) -> list[tuple[int, int, int]]:
    n = len(labels)
    out = []
    for a, p, q in itertools.product(range(n), repeat=3):
        la, lp, lq = labels[a].item(), labels[p].item(), labels[q].item()
        if normal_label is not None:
            ok = a != p and la == normal_label and lp == normal_label and lq != normal_label
        else:
            ok = a != p and la == lp and lq != la
        if ok:
            out.append((a, p, q))
    return out


@pytest.mark.parametrize("normal_label", [0, None])
def test_batch_all_is_the_mean_over_active_triplets(normal_label: int | None) -> None:
    g = torch.Generator().manual_seed(3)
    e = torch.randn(8, 4, generator=g) * 0.3
    labels = torch.tensor([0, 0, 1, 0, 2, 1, 0, 2])
    triplets = _brute_force_triplets(labels, normal_label)
    idx = torch.tensor(triplets)
    per_triplet = torch.relu(
        (e[idx[:, 0]] - e[idx[:, 1]]).norm(dim=1) - (e[idx[:, 0]] - e[idx[:, 2]]).norm(dim=1) + 0.5
    )
    expected = per_triplet[per_triplet > 0].mean()
    got = in_batch_triplet_loss(e, labels, margin=0.5, mining="all", normal_label=normal_label)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normal_label", [0, None])
def test_batch_hard_matches_brute_force(normal_label: int | None) -> None:
    g = torch.Generator().manual_seed(4)
    e = torch.randn(8, 4, generator=g) * 0.3
    labels = torch.tensor([0, 0, 1, 0, 2, 1, 0, 2])
    d = torch.cdist(e, e)
    per_anchor: dict[int, list[tuple[int, int]]] = {}
    for a, p, q in _brute_force_triplets(labels, normal_label):
        per_anchor.setdefault(a, []).append((p, q))
    losses = []
    for a, pq in per_anchor.items():
        hardest_p = max(d[a, p] for p, _ in pq)
        hardest_n = min(d[a, q] for _, q in pq)
        losses.append(max(hardest_p - hardest_n + 0.5, 0.0))
    expected = sum(losses) / len(losses)
    got = in_batch_triplet_loss(e, labels, margin=0.5, mining="hard", normal_label=normal_label)
    assert got.item() == pytest.approx(float(expected), abs=1e-5)


def test_triplet_without_valid_triplets_is_zero_with_grad() -> None:
    e = points(0.0, 0.1, 0.2)
    for mining in ("hard", "all"):
        loss = in_batch_triplet_loss(e, torch.tensor([0, 0, 0]), mining=mining)  # no negatives
        assert loss.item() == 0.0
        loss.backward()
    # all triplets already satisfied → "all" has no active triplet
    e2 = points(0.0, 0.1, 5.0)
    assert in_batch_triplet_loss(e2, torch.tensor([0, 0, 1]), mining="all").item() == 0.0


# --- patch triplet --------------------------------------------------------------------------------------------


def patch_points(*images: list[float]) -> torch.Tensor:
    """Per image a list of 1-D patch positions → (N, P, 2) patch embeddings on the x axis."""
    return torch.tensor([[[x, 0.0] for x in image] for image in images], requires_grad=True)


def test_patch_triplet_hand_computed_and_ignored_patches_play_no_part() -> None:
    # image 0: good, source 0      patches 0.0, 1.0 and 4.0 (ignored)
    # image 1: good, source 1      patches 0.2, 1.5 and 0.9 (ignored)
    # image 2: synthetic defect made from source 0: 0.1 normal, 0.6 defect, 0.05 (ignored); m = 0.5
    # anchor 0.0 (s0): counterpart in part 1 is 0.2 (d 0.2), nearest defect 0.6 (d 0.6) → 0.2-0.6+0.5 = 0.1
    # anchor 1.0 (s0): counterpart 1.5 (d 0.5), defect d 0.4                             → 0.6
    # anchor 0.2 (s1): counterpart in part 0 is 0.0 (d 0.2), defect d 0.4                → 0.3
    # anchor 1.5 (s1): counterpart 1.0 (d 0.5), defect d 0.9                             → 0.1
    # anchor 0.1 (s0, the synthetic image's normal patch): counterpart 0.2 (d 0.1), defect d 0.5 → 0.1
    # mean = 1.2 / 5; an ignored patch used as anchor, positive or negative would change every figure it touches
    e = patch_points([0.0, 1.0, 4.0], [0.2, 1.5, 0.9], [0.1, 0.6, 0.05])
    labels = torch.tensor([[0, 0, -1], [0, 0, -1], [0, 1, -1]])
    loss = patch_triplet_loss(e, labels, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), margin=0.5)
    assert loss.item() == pytest.approx(0.24, abs=1e-6)
    loss.backward()
    assert torch.equal(e.grad[:, 2], torch.zeros(3, 2))  # the ignored patches get no gradient
    assert e.grad[2, 1, 0] < 0  # a descent step moves the defect patch away from the goods (towards +x)


def test_patch_triplet_positive_is_the_counterpart_in_the_worst_matching_good_part() -> None:
    # three good parts and a real defect photo (source -1) with a mask; m = 1
    # anchor 0.0 (s0):  part 1 → 0.3 (not 2.0: the counterpart is the nearest patch), part 2 → 0.1; hardest 0.3;
    #                   nearest defect 0.8                                                       → 0.3-0.8+1 = 0.5
    # anchor 0.3 (s1):  part 0 → 0.3, part 2 → 0.2; hardest 0.3; defect 0.5                       → 0.8
    # anchor 2.0 (s1):  part 0 → 2.0, part 2 → 1.9; hardest 2.0; defect 1.2                       → 1.8
    # anchor 0.1 (s2):  part 0 → 0.1, part 1 → 0.2; hardest 0.2; defect 0.7                       → 0.5
    # anchor -3.0 (s2): part 0 → 3.0, part 1 → 3.3; hardest 3.3; defect 3.8                       → 0.5
    # mean = 4.1 / 5 (the nearest patch over all parts as positive would give 0.7, the farthest 1.42)
    e = patch_points([0.0, 0.0], [0.3, 2.0], [0.1, -3.0], [0.8, 5.0])
    labels = torch.tensor([[0, -1], [0, 0], [0, 0], [1, -1]])
    loss = patch_triplet_loss(e, labels, torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, -1]), margin=1.0)
    assert loss.item() == pytest.approx(0.82, abs=1e-6)


def test_patch_triplet_takes_the_worst_patch_of_a_defect_photo_without_mask() -> None:
    # goods 0.0, 1.0 (s0) and 0.1, 1.1 (s1); an unmasked defect photo with patches 0.5 and 2.0: its worst patch is
    # 2.0 (1.1 → 0.9 from the nearest good, against 0.4 for 0.5), the one negative; m = 1
    # anchors 0.0 → relu(0.1-2.0+1) = 0, 1.0 → 0.1-1.0+1 = 0.1, 0.1 → 0, 1.1 → 0.1-0.9+1 = 0.2; mean 0.3 / 4
    e = patch_points([0.0, 1.0], [0.1, 1.1], [0.5, 2.0])
    labels = torch.tensor([[0, 0], [0, 0], [-1, -1]])
    loss = patch_triplet_loss(e, labels, torch.tensor([0, 0, 1]), torch.tensor([0, 1, -1]), margin=1.0)
    assert loss.item() == pytest.approx(0.075, abs=1e-6)
    loss.backward()
    assert torch.equal(e.grad[2, 0], torch.zeros(2)) and e.grad[2, 1, 0] < 0


def _patch_triplet_brute_force(
    patches: torch.Tensor, labels: torch.Tensor, image_labels: torch.Tensor, sources: torch.Tensor, margin: float
) -> float:
    """The documented rule, one anchor at a time in plain Python."""
    n, p, _ = patches.shape
    cells = [(i, j) for i in range(n) for j in range(p)]

    def d(a: tuple[int, int], b: tuple[int, int]) -> float:
        return float((patches[a] - patches[b]).norm())

    positives = [c for c in cells if labels[c] == 0 and image_labels[c[0]] == 0]
    negatives = [c for c in cells if labels[c] == 1]
    for i in range(n):
        if image_labels[i] > 0 and bool((labels[i] < 0).all()):
            negatives.append(max(((i, j) for j in range(p)), key=lambda c: min(d(c, q) for q in positives)))
    losses = []
    for a in (c for c in cells if labels[c] == 0):
        counterpart: dict[int, float] = {}
        for q in positives:
            part = int(sources[q[0]])
            if part != int(sources[a[0]]):
                counterpart[part] = min(counterpart.get(part, math.inf), d(a, q))
        if counterpart and negatives:
            losses.append(max(max(counterpart.values()) - min(d(a, q) for q in negatives) + margin, 0.0))
    return sum(losses) / len(losses)


def test_patch_triplet_matches_brute_force_on_random_patches() -> None:
    g = torch.Generator().manual_seed(7)
    e = torch.nn.functional.normalize(torch.randn(7, 6, 4, generator=g), dim=2)
    image_labels = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    sources = torch.tensor([0, 1, 2, 0, 1, -1, 0])  # image 6: a second view of part 0
    labels = torch.randint(-1, 1, (7, 6), generator=g)  # goods: normal or ignored
    labels[3:5] = torch.randint(-1, 2, (2, 6), generator=g)
    labels[3:5, 0] = 1  # every defect image marks at least one defect patch ...
    labels[5] = -1  # ... but image 5, a defect photo without a mask
    expected = _patch_triplet_brute_force(e, labels, image_labels, sources, margin=0.7)
    got = patch_triplet_loss(e, labels, image_labels, sources, margin=0.7)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_patch_triplet_without_a_triplet_is_zero_with_grad() -> None:
    e = patch_points([0.0, 1.0], [0.1, 0.6])
    no_defect = patch_triplet_loss(e, torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 0]), torch.tensor([0, 1]))
    one_part = patch_triplet_loss(e, torch.tensor([[0, 0], [0, 1]]), torch.tensor([0, 1]), torch.tensor([0, 0]))
    for loss in (no_defect, one_part):
        assert loss.item() == 0.0
        loss.backward()
    assert torch.equal(e.grad, torch.zeros_like(e))


def test_patch_triplet_gradients_reach_the_embedding_map() -> None:
    """On a real batch shape (masks → patch labels → loss) the gradient reaches every part that takes part."""
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(4, 8, 4, 4, generator=g, requires_grad=True)
    masks = torch.zeros(4, 16, 16)
    masks[1, 0:4, 0:4] = 1.0  # image 1: a synthetic defect made from image 0, top-left cell
    labels = patch_labels_from_masks(masks, (4, 4))
    patches = torch.nn.functional.normalize(maps, dim=1).flatten(2).transpose(1, 2)
    loss = patch_triplet_loss(patches, labels.flatten(1), torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 2]))
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(maps.grad).all()
    assert bool((maps.grad[1, :, 0, 0] != 0).any())  # the defect patch is pushed
    assert torch.equal(maps.grad[1, :, 1, 1], torch.zeros(8))  # the ignored ring around it is not


def test_the_training_loop_trains_the_patch_model_with_the_triplet_loss(tmp_path: Path) -> None:
    from PIL import Image

    from inspector.preprocess import PreprocessConfig, Preprocessor
    from models.siamese import EmbedderConfig, build_embedder
    from models.training import TrainConfig, train
    from models.training_data import PatchPairDataset

    rng = np.random.default_rng(0)
    good = []
    for i in range(4):
        good.append(tmp_path / f"good{i}.png")
        Image.fromarray(rng.integers(60, 200, (32, 32, 3), dtype=np.uint8)).save(good[-1])
    dataset = PatchPairDataset(good, [], Preprocessor(PreprocessConfig(height=32, width=32)), seed=0)
    torch.manual_seed(0)
    model = build_embedder(EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=8))
    before = [t.detach().clone() for t in model.head.parameters()]
    cfg = TrainConfig(epochs=2, batch_size=4, loss="triplet", progress=False)
    history = train(model, dataset, cfg)
    assert history.loss == "patch_triplet" and len(history.epochs) == 2
    assert all(math.isfinite(r.train_loss) and r.train_loss > 0 for r in history.epochs)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.head.parameters()))  # weight and bias trained
    default = TrainConfig(epochs=0, progress=False)
    assert train(model, dataset, default).loss == "patch_contrastive"
    with pytest.raises(ValueError, match="batch-hard only"):
        train(model, dataset, TrainConfig(epochs=1, loss="triplet", mining="all", progress=False))


# --- learning -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [ContrastiveLoss(margin=1.0), TripletLoss(margin=0.5, mining="hard"), TripletLoss(margin=0.5, mining="all")],
    ids=["contrastive", "triplet-hard", "triplet-all"],
)
def test_loss_decreases_on_a_toy_problem(loss_fn: torch.nn.Module) -> None:
    # goods and defects drawn from overlapping clusters; a linear embedder must learn to separate them
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g) + 1.0])
    labels = torch.cat([torch.zeros(16, dtype=torch.long), torch.randint(1, 4, (16,), generator=g)])
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        loss = loss_fn(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
