"""Golden banks from good parts: the bank a bundle ships, and the banks that leave one fold of goods out, so that
every good can be scored the way the line will score a part made next week (cross-fitted calibration).

Why cross-fit: a threshold set on a held-out slice of the goods (a fifth of them) rests on a few dozen scores, too
few to resolve a 1 % false-reject rate, and the realised rate on later goods came out at about twice the target.
Scoring each capture group against the bank without the rows that came from that group's fold gives every good an
honest score (its own photos are not in the bank it is compared with), so the threshold rests on all of them; the
bank that ships holds every row and is larger than each fold's, so the line's goods score a little lower than the
out-of-fold scores the threshold was set on: the error is on the side of fewer false rejects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inspector.engine import Embedded
from inspector.errors import InspectorError
from inspector.scorer import PatchTerms, RawScores, golden_rows, out_of_fold_views
from inspector.scoring import ScoringConfig, patch_mask
from models.coreset import greedy_coreset
from pipelines.data.split import grouped_folds
from pipelines.recipe import Recipe


def golden_bank(
    embeddings: np.ndarray, recipe: Recipe, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The golden bank from the goods' embeddings and, for each of its rows, the index of the good it came from:
    image embeddings as they are; patch embeddings flattened and cut to ``max_bank_patches``.

    ``coreset`` (default): PatchCore's greedy k-center choice keeps rare-but-normal patches, so the worst good parts
    score low and the threshold at a 1 % false-reject rate stays low. ``random``: a seeded uniform subset keeps the
    goods' patch density, which the scoring offset compares against; on the magnetic tiles it ranked unseen defect
    types better (leave-one-type-out mean 0.816 -> 0.871 frozen, but measured while the letterbox padding was
    scored, which inflated the offset's effect) and raised the threshold's tail (escape at 1 % FRR 0.85 -> 0.99 on
    the product split), so it is not the default (benchmarks/README.md). Patches off the part (``valid``, letterbox
    padding) are never scored, so they take no room in the bank.
    """
    if recipe.bank_selection not in ("random", "coreset"):
        raise ValueError(f"unknown bank_selection {recipe.bank_selection!r}: use 'random' or 'coreset'")
    if embeddings.ndim == 2:
        return embeddings, np.arange(len(embeddings))
    flat = golden_rows(embeddings, recipe.scoring, valid)
    mask = patch_mask(embeddings, recipe.scoring, valid)
    sources = np.repeat(np.arange(len(embeddings)), embeddings.shape[1])
    sources = sources if mask is None else sources[mask.ravel()]
    keep = selected_rows(flat, recipe)
    return flat[keep], sources[keep]


def reference_bank(embeddings: np.ndarray, recipe: Recipe, valid: np.ndarray | None = None) -> np.ndarray:
    """The golden bank alone (:func:`golden_bank`)."""
    return golden_bank(embeddings, recipe, valid)[0]


def selected_rows(flat: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The rows of the goods' patches the bank keeps (all of them within ``max_bank_patches``)."""
    size = recipe.max_bank_patches
    if len(flat) <= size:
        return np.arange(len(flat))
    if size <= 0:
        return np.arange(0)
    rng = np.random.default_rng(recipe.seed)
    if recipe.bank_selection == "random":
        return np.sort(rng.choice(len(flat), size, replace=False))
    pool = 8 * size
    candidates = np.arange(len(flat))
    if len(flat) > pool:  # greedy selection costs O(len × size): pick from an even random pool
        candidates = np.sort(rng.choice(len(flat), pool, replace=False))
    return candidates[greedy_coreset(flat[candidates], size, seed=recipe.seed)]


@dataclass(frozen=True)
class OutOfFold:
    """Each good's patch terms and whole-part distance from a bank (and Gaussian) built without its fold."""

    terms: PatchTerms
    part: np.ndarray | None
    fold: np.ndarray

    def raw(self, offset: float) -> RawScores:
        """The goods' raw views at a scoring offset."""
        return RawScores(self.terms.view(offset), self.part)


def fold_count(groups: Sequence[str], folds: int) -> int:
    """How many folds the goods can be cross-fitted in: ``folds``, fewer where the goods form fewer capture groups;
    0 where they form fewer than two (nothing to leave out)."""
    n_groups = len(set(groups))
    return min(folds, n_groups) if folds >= 2 and n_groups >= 2 else 0


def out_of_fold(
    goods: Embedded,
    groups: Sequence[str],
    folds: int,
    recipe: Recipe,
    scoring: ScoringConfig,
    part_blocks: Sequence[int] | None = None,
    bank: tuple[np.ndarray, np.ndarray] | None = None,
) -> OutOfFold:
    """Score each fold of ``goods`` (whole capture groups, :func:`grouped_folds`) against the golden bank less the
    rows that came from that fold's goods, and against the other folds' whole-part Gaussian when ``part_blocks`` is
    given. ``bank``: the shipped bank and its rows' sources (:func:`golden_bank`), chosen from all the goods when
    not given.

    Why the shipped bank less a fold, not a bank chosen again from the other folds: choosing a coreset costs a few
    minutes on a real product, five of them would double the flow, and a bank whose selection also covered the
    fold's patches covers that fold's neighbourhood no better than a fresh one: its scores err high, the safe side.
    """
    emb, valid, desc = goods.embeddings, goods.valid, goods.descriptors
    if len(groups) != len(emb):
        raise ValueError(f"{len(groups)} group ids for {len(emb)} good embeddings")
    rows, sources = bank if bank is not None else golden_bank(emb, recipe, valid)
    fold = grouped_folds(groups, ["good"] * len(groups), folds, recipe.seed)
    try:
        terms, part = out_of_fold_views(emb, valid, desc, rows, sources, fold, scoring, part_blocks)
    except InspectorError as exc:
        raise ValueError(f"{exc}; use fewer folds") from None
    return OutOfFold(terms, part, fold)
