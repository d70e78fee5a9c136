"""Losses against hand-computed examples, against each other (in-batch = explicit pairs), and on a toy problem."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from models.losses import (
    ContrastiveLoss,
    TripletLoss,
    contrastive_loss,
    in_batch_contrastive_loss,
    in_batch_triplet_loss,
    paired_distances,
    pairwise_distances,
    triplet_loss,
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
        lambda e: triplet_loss(e[:1], e[1:2], e[2:3]),
        lambda e: contrastive_loss(paired_distances(e[:2], e[1:3]), torch.tensor([0.0, 1.0])),
    ):
        e = base.clone()
        e[1] = e[0]  # rows 0 and 1 coincide (and row 0 paired with row 1 in the paired/triplet cases)
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
    expected = contrastive_loss(paired_distances(first, second), dissimilar, margin=1.5)
    got = in_batch_contrastive_loss(e, labels, margin=1.5, normal_label=normal_label)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ContrastiveLoss(margin=1.5).forward_pairs(first, second, dissimilar), expected)


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


def test_triplet_loss_hand_computed() -> None:
    # triplet 1: d(a,p)=0.3, d(a,n)=0.4, m=0.5 → 0.3-0.4+0.5 = 0.4
    # triplet 2: d(a,p)=1.0, d(a,n)=3.0        → relu(1-3+0.5) = 0
    # mean = 0.2
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[0.3, 0.0], [1.0, 0.0]])
    n = torch.tensor([[0.0, 0.4], [0.0, 3.0]])
    assert triplet_loss(a, p, n).item() == pytest.approx(0.2)
    assert TripletLoss().forward_triplets(a, p, n).item() == pytest.approx(0.2)
    # margin 2: (0.3-0.4+2) = 1.9, (1-3+2) = 0 → 0.95
    assert triplet_loss(a, p, n, margin=2.0).item() == pytest.approx(0.95)


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
        paired_distances(e[idx[:, 0]], e[idx[:, 1]]) - paired_distances(e[idx[:, 0]], e[idx[:, 2]]) + 0.5
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
