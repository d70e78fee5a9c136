"""Metric-learning losses for the Siamese embedder: contrastive and triplet, on patches or on whole images.

The patch losses (the default patch model) work on the distance the line scores with, a patch's distance to its
nearest good patch: :func:`patch_contrastive_loss` and :func:`patch_triplet_loss`. The image losses serve an image
embedder. Labels are integers; ``0`` means a good part by convention and any other value is a defect (types may
differ). Both kinds mine their pairs or triplets inside the batch, from ONE distance matrix, so a batch of N labelled
images gives N·(N-1)/2 pairs for the cost of N forward passes. In the image losses, with ``normal_label`` set (the
default) only constraints that involve a good part are used: goods are pulled together and pushed away from
defects, while two defects carry no constraint between them — two different defects need not look alike, and forcing
them together would teach the model that "defective" is one appearance, which is exactly what fails on a never-seen
defect type.

Distances are Euclidean and computed in float32 with autocast off (half-precision Gram matrices lose the small
distances between near-identical goods), with gradients that stay finite when two embeddings coincide.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Mining = Literal["hard", "all"]

#: Squared distances are clamped to at least this before the square root: d(sqrt x)/dx is unbounded at 0.
_EPS = 1e-12


def _full_precision(t: Tensor) -> AbstractContextManager[None]:
    """Autocast switched off for ``t``'s device when it is on; distances are computed in float32."""
    device_type = t.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know (e.g. meta)
        enabled = False
    return torch.autocast(device_type=device_type, enabled=False) if enabled else nullcontext()


def _zero_with_grad(t: Tensor) -> Tensor:
    """A 0 loss still connected to the graph, so ``loss.backward()`` works on a batch with nothing to learn."""
    return t.sum() * 0.0


def _check_batch(embeddings: Tensor, labels: Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be (N,) with N={embeddings.shape[0]}, got shape {tuple(labels.shape)}")


def pairwise_distances(embeddings: Tensor) -> Tensor:
    """N×N Euclidean distances (float32, same device), diagonal exactly 0, gradient finite everywhere.

    Uses the Gram-matrix form ``|a|² + |b|² - 2a·b`` (O(N·D) memory, not O(N²·D)) on batch-centred embeddings:
    distances do not change under translation, and centring shrinks the terms that cancel, which keeps small
    distances accurate (L2-normalised embeddings all have norm 1 and would otherwise cancel badly).
    Squared distances are clamped to ``1e-12`` before the square root, so coinciding embeddings get a zero (not
    NaN) gradient; off the diagonal they read ``1e-6`` instead of 0.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
    with _full_precision(embeddings):
        x = embeddings.float()
        x = x - x.mean(dim=0, keepdim=True).detach()
        sq = (x * x).sum(dim=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
        d = d2.clamp_min(_EPS).sqrt()
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        return d.masked_fill(eye, 0.0)


def contrastive_loss(distance: Tensor, dissimilar: Tensor, margin: float = 1.0) -> Tensor:
    """``mean((1-Y)·½·D² + Y·½·max(0, m-D)²)`` with Y=1 for a dissimilar pair (Hadsell, Chopra & LeCun 2006).

    Similar pairs are pulled to distance 0; dissimilar pairs are pushed out only until they are ``margin`` apart,
    so the model spends no capacity on defects that are already obviously far.
    """
    if distance.shape != dissimilar.shape:
        raise ValueError(
            f"distance {tuple(distance.shape)} and dissimilar {tuple(dissimilar.shape)} must have the same shape"
        )
    if distance.numel() == 0:
        return _zero_with_grad(distance)
    d = distance.float()
    y = dissimilar.to(device=d.device, dtype=d.dtype)
    similar_term = (1.0 - y) * 0.5 * d.pow(2)
    dissimilar_term = y * 0.5 * torch.relu(margin - d).pow(2)
    return (similar_term + dissimilar_term).mean()


def _upper_pairs(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Indices (i, j) of all pairs i<j, in row-major order."""
    idx = torch.triu_indices(n, n, offset=1, device=device)
    return idx[0], idx[1]


def in_batch_contrastive_loss(
    embeddings: Tensor, labels: Tensor, margin: float = 1.0, normal_label: int | None = 0
) -> Tensor:
    """Contrastive loss over all pairs i<j of a labelled batch, from one N×N distance matrix.

    Y = (labels_i != labels_j). With ``normal_label`` set, only pairs holding at least one normal sample are used
    (good-good pulled together, good-defect pushed apart, defect-defect ignored); with ``None`` every pair is used
    (generic metric learning: same label = similar). Mean over the pairs used; 0 (with grad) if there are none.
    """
    _check_batch(embeddings, labels)
    labels = labels.to(embeddings.device)
    i, j = _upper_pairs(embeddings.shape[0], embeddings.device)
    if normal_label is not None:
        keep = (labels[i] == normal_label) | (labels[j] == normal_label)
        i, j = i[keep], j[keep]
    if i.numel() == 0:
        return _zero_with_grad(embeddings)
    distance = pairwise_distances(embeddings)[i, j]
    return contrastive_loss(distance, labels[i] != labels[j], margin=margin)


def _triplet_masks(labels: Tensor, normal_label: int | None) -> tuple[Tensor, Tensor]:
    """(valid anchor-positive, valid anchor-negative) N×N masks; the anchor is the row.

    With ``normal_label``: anchors and positives are normal, negatives are anything else. Without: classic
    metric learning, positive = same label (not itself), negative = different label.
    """
    n = labels.shape[0]
    not_self = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    if normal_label is not None:
        normal = labels == normal_label
        positive = normal[:, None] & normal[None, :] & not_self
        negative = normal[:, None] & ~normal[None, :]
    else:
        same = labels[:, None] == labels[None, :]
        positive = same & not_self
        negative = ~same
    return positive, negative


def in_batch_triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 0.5,
    mining: Mining = "hard",
    normal_label: int | None = 0,
) -> Tensor:
    """Triplet loss mined from one N×N distance matrix (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss").

    ``"hard"`` (batch-hard): per anchor with at least one positive and one negative, its farthest positive and
    nearest negative; mean over those anchors. ``"all"`` (batch-all): every valid triplet, averaged over the
    triplets with a positive loss only — averaging over all of them would let the many already-satisfied triplets
    dilute the gradient towards 0 as training progresses. 0 (with grad) when the batch holds no valid triplet.
    See :func:`_triplet_masks` for what ``normal_label`` does.
    """
    _check_batch(embeddings, labels)
    if mining not in ("hard", "all"):
        raise ValueError(f"unknown mining {mining!r}: use 'hard' or 'all'")
    labels = labels.to(embeddings.device)
    positive, negative = _triplet_masks(labels, normal_label)
    d = pairwise_distances(embeddings)
    if mining == "hard":
        anchors = positive.any(dim=1) & negative.any(dim=1)
        if not bool(anchors.any()):
            return _zero_with_grad(embeddings)
        hardest_positive = d.masked_fill(~positive, float("-inf")).amax(dim=1)
        hardest_negative = d.masked_fill(~negative, float("inf")).amin(dim=1)
        return torch.relu(hardest_positive[anchors] - hardest_negative[anchors] + margin).mean()
    valid = positive[:, :, None] & negative[:, None, :]  # [anchor, positive, negative]
    losses = torch.relu(d[:, :, None] - d[:, None, :] + margin)[valid]
    active = losses[losses > 0]
    if active.numel() == 0:
        return _zero_with_grad(embeddings)
    return active.mean()


class ContrastiveLoss(nn.Module):
    """In-batch contrastive loss as a module: stores the margin and what counts as normal."""

    def __init__(self, margin: float = 1.0, normal_label: int | None = 0) -> None:
        super().__init__()
        self.margin = margin
        self.normal_label = normal_label

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return in_batch_contrastive_loss(embeddings, labels, margin=self.margin, normal_label=self.normal_label)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normal_label={self.normal_label}"


class TripletLoss(nn.Module):
    """In-batch triplet loss as a module: stores the margin, the mining strategy and what counts as normal."""

    def __init__(self, margin: float = 0.5, mining: Mining = "hard", normal_label: int | None = 0) -> None:
        super().__init__()
        if mining not in ("hard", "all"):
            raise ValueError(f"unknown mining {mining!r}: use 'hard' or 'all'")
        self.margin = margin
        self.mining: Mining = mining
        self.normal_label = normal_label

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return in_batch_triplet_loss(
            embeddings, labels, margin=self.margin, mining=self.mining, normal_label=self.normal_label
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, normal_label={self.normal_label}"


def patch_labels_from_masks(masks: Tensor, grid: tuple[int, int], ignore_border: bool = True) -> Tensor:
    """Pixel masks (N, H, W) → patch labels (N, h, w): 1 defect, 0 normal, -1 ignore.

    A patch is defective when any pixel of its cell is. With ``ignore_border`` the ring of patches around a defect
    is ignored: their receptive fields and context see the defect, so calling them normal would fight the defect
    term. An image whose mask is all -1 (a real defect photo without a mask) gets -1 everywhere.
    """
    unknown = (masks < 0).flatten(1).all(dim=1)
    defect = F.adaptive_max_pool2d((masks > 0).float()[:, None], grid)[:, 0] > 0
    labels = defect.long()
    if ignore_border:
        ring = F.max_pool2d(defect.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
        labels = labels.masked_fill(ring & ~defect, -1)
    return labels.masked_fill(unknown[:, None, None], -1)


def patch_contrastive_loss(
    patches: Tensor,
    patch_labels: Tensor,
    image_labels: Tensor,
    sources: Tensor,
    margin: float = 1.0,
    max_bank: int = 4096,
) -> Tensor:
    """The contrastive loss on the distance the line scores with: each patch's distance D to the nearest normal patch.

    ``patches`` (N, P, D); ``patch_labels`` (N, P) with 1 defect, 0 normal, -1 ignore; ``image_labels`` (N,) with
    1 for a defective image; ``sources`` (N,) ids of the good image each one was made from (augmented copies and
    synthetic defects of one good image share it). The bank is the batch's normal patches (at most ``max_bank``,
    evenly strided). Normal patches (Y=0) are pulled to the nearest normal patch *of another source* (so parts
    generalise, not just augmentations); defect patches (Y=1) are pushed until at least ``margin`` from every
    normal patch, their own clean source included; a defective image without a mask pushes its worst patch.
    ``L = (1-Y)·½·D² + Y·½·max(0, m-D)²``, each group averaged on its own so neither swamps the other.
    """
    n, p, _ = patches.shape
    flat = patches.reshape(n * p, -1).float()
    labels = patch_labels.reshape(-1)
    owner = torch.arange(n, device=patches.device).repeat_interleave(p)
    bank_idx = _strided(torch.nonzero(labels == 0).squeeze(1), max_bank)
    if bank_idx.numel() == 0:
        return _zero_with_grad(patches)
    with _full_precision(patches):
        d2 = _squared_distances(flat, flat[bank_idx])
        same_source = sources[owner][:, None] == sources[owner[bank_idx]][None, :]
        big = torch.finfo(d2.dtype).max
        d_other = d2.masked_fill(same_source, big).min(dim=1).values.sqrt()
        d_any = d2.min(dim=1).values.sqrt()
        terms: list[Tensor] = []
        normal = (labels == 0) & (~same_source).any(dim=1)
        if normal.any():
            terms.append(0.5 * d_other[normal].pow(2).mean())
        defect = labels == 1
        if defect.any():
            terms.append(0.5 * torch.relu(margin - d_any[defect]).pow(2).mean())
        unmasked = (image_labels > 0) & (patch_labels < 0).all(dim=1)
        if unmasked.any():
            worst = d_any.reshape(n, p).max(dim=1).values[unmasked]
            terms.append(0.5 * torch.relu(margin - worst).pow(2).mean())
    return torch.stack(terms).sum() if terms else _zero_with_grad(patches)


def _strided(idx: Tensor, most: int) -> Tensor:
    """At most ``most`` of ``idx``, evenly strided (a fixed subset, so the loss of a batch is deterministic)."""
    if idx.numel() <= most:
        return idx
    return idx[torch.linspace(0, idx.numel() - 1, most, device=idx.device).long()]


def _squared_distances(x: Tensor, bank: Tensor) -> Tensor:
    """(M, K) squared Euclidean distances, clamped to ``1e-12`` so their square roots have finite gradients."""
    return (x.pow(2).sum(1)[:, None] + bank.pow(2).sum(1)[None, :] - 2.0 * x @ bank.T).clamp_min(_EPS)


def patch_triplet_loss(
    patches: Tensor,
    patch_labels: Tensor,
    image_labels: Tensor,
    sources: Tensor,
    margin: float = 1.0,
    max_bank: int = 4096,
) -> Tensor:
    """Batch-hard triplet loss on the distance the line scores with: a patch's distance to its nearest normal patch.

    Inputs as :func:`patch_contrastive_loss`. Anchor: every normal patch. Positive: its counterpart in another good
    part of the batch, i.e. its nearest normal patch in a good image of another source (not any patch of that part:
    pulling an edge patch onto a centre patch would fold the map); the hardest positive is the counterpart in the
    good part that matches the anchor worst. Negative: a defect patch (masked real defects, synthetic defects, and
    the worst patch of a defect photo without a mask, the one farthest from every good patch); the hardest negative
    is the nearest one. ``mean(relu(d(a, p*) - d(a, n*) + margin))`` over the anchors that have both; 0 (with grad)
    when none has. Good patches are capped at ``max_bank`` positives and defect patches at ``max_bank`` negatives.
    """
    n, p, _ = patches.shape
    flat = patches.reshape(n * p, -1).float()
    labels = patch_labels.reshape(-1)
    owner = torch.arange(n, device=patches.device).repeat_interleave(p)
    normal = labels == 0
    anchor_idx = torch.nonzero(normal).squeeze(1)
    positive_idx = _strided(torch.nonzero(normal & (image_labels[owner] == 0)).squeeze(1), max_bank)
    if anchor_idx.numel() == 0 or positive_idx.numel() == 0:
        return _zero_with_grad(patches)
    with _full_precision(patches):
        negative_idx = _strided(
            torch.cat(
                [torch.nonzero(labels == 1).squeeze(1), _worst_unmasked(flat, positive_idx, patch_labels, image_labels)]
            ),
            max_bank,
        )
        if negative_idx.numel() == 0:
            return _zero_with_grad(patches)
        anchors = flat[anchor_idx]
        part_of_positive = sources[owner[positive_idx]]
        parts = torch.unique(part_of_positive)
        d2_positive = _squared_distances(anchors, flat[positive_idx])
        counterpart = torch.stack([d2_positive[:, part_of_positive == s].min(dim=1).values for s in parts], dim=1)
        own_part = sources[owner[anchor_idx]][:, None] == parts[None, :]
        hardest_positive = counterpart.masked_fill(own_part, -1.0).amax(dim=1)
        hardest_negative = _squared_distances(anchors, flat[negative_idx]).min(dim=1).values
        usable = ~own_part.all(dim=1)
        if not bool(usable.any()):
            return _zero_with_grad(patches)
        return torch.relu(hardest_positive[usable].sqrt() - hardest_negative[usable].sqrt() + margin).mean()


def _worst_unmasked(flat: Tensor, bank_idx: Tensor, patch_labels: Tensor, image_labels: Tensor) -> Tensor:
    """Flat index of the worst patch (farthest from its nearest good patch) of each defect photo without a mask."""
    p = patch_labels.shape[1]
    unmasked = torch.nonzero((image_labels > 0) & (patch_labels < 0).all(dim=1)).squeeze(1)
    if unmasked.numel() == 0:
        return unmasked
    with torch.no_grad():
        rows = (unmasked[:, None] * p + torch.arange(p, device=flat.device)[None, :]).reshape(-1)
        nearest = _squared_distances(flat[rows], flat[bank_idx]).min(dim=1).values.reshape(-1, p)
        return unmasked * p + nearest.argmax(dim=1)
