"""Cross-fitted calibration: each good scored against a bank built without its capture group's fold."""

from __future__ import annotations

import numpy as np
import pytest

from inspector.engine import Embedded
from inspector.scorer import Scorer
from inspector.scoring import ScoringConfig
from pipelines.data.split import grouped_folds
from pipelines.golden import fold_count, golden_bank, out_of_fold, reference_bank
from pipelines.recipe import tiny_recipe


def _goods(groups: int = 6, per_group: int = 4, patches: int = 9, dim: int = 5) -> tuple[Embedded, list[str]]:
    """Patch embeddings where the photos of one group are near-copies of each other (one physical part)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(groups, patches, dim)) * 3.0
    emb = np.concatenate([c + 0.01 * rng.normal(size=(per_group, patches, dim)) for c in centres]).astype(np.float32)
    ids = [f"part{g}" for g in range(groups) for _ in range(per_group)]
    return Embedded(emb, None, None, [None] * len(ids)), ids


def test_folds_keep_groups_whole_and_balanced() -> None:
    _, groups = _goods(groups=7, per_group=3)
    fold = grouped_folds(groups, ["good"] * len(groups), 3, seed=1)
    for g in set(groups):
        assert len({int(f) for f, h in zip(fold, groups) if h == g}) == 1
    assert sorted(np.bincount(fold).tolist()) == [6, 6, 9]
    assert fold_count(groups, 5) == 5 and fold_count(groups, 9) == 7  # no more folds than groups
    assert fold_count(["one"] * 4, 5) == 0 and fold_count(groups, 0) == 0
    with pytest.raises(ValueError, match="only 2"):
        grouped_folds(["a", "b", "b"], ["good"] * 3, 3, seed=0)


def test_out_of_fold_scores_each_good_as_a_new_part() -> None:
    goods, groups = _goods()
    recipe, scoring = tiny_recipe(), ScoringConfig(offset=0.0)
    oof = out_of_fold(goods, groups, 3, recipe, scoring)
    in_bank = Scorer.of(reference_bank(goods.embeddings, recipe), scoring).patch_terms(goods.embeddings)
    # against the bank of all goods a photo finds its own group's near-copies; out of fold it cannot
    assert in_bank.worst.max() < 0.2 < oof.terms.worst.min()
    # each fold's scores are what a scorer on the other folds' bank gives
    for f in range(3):
        inside = oof.fold == f
        alone = Scorer.of(reference_bank(goods.embeddings[~inside], recipe), scoring)
        assert np.allclose(alone.patch_terms(goods.embeddings[inside]).worst, oof.terms.worst[inside], atol=1e-5)
    assert oof.part is None and np.allclose(oof.raw(0.0).patch, oof.terms.worst)
    with pytest.raises(ValueError, match="group ids"):
        out_of_fold(goods, groups[:-1], 3, recipe, scoring)


def test_a_fold_is_scored_against_the_shipped_bank_less_its_own_rows() -> None:
    goods, groups = _goods()
    recipe, scoring = tiny_recipe(max_bank_patches=60), ScoringConfig(offset=0.0)  # a coreset of 60 of 216 patches
    bank, sources = golden_bank(goods.embeddings, recipe)
    assert bank.shape == (60, 5) and np.array_equal(bank, reference_bank(goods.embeddings, recipe))
    # each row's source is the good whose patch it is
    flat = goods.embeddings.reshape(len(groups), -1, 5)
    assert all(any(np.array_equal(row, p) for p in flat[i]) for row, i in zip(bank, sources))
    oof = out_of_fold(goods, groups, 3, recipe, scoring, bank=(bank, sources))
    for f in range(3):
        inside = oof.fold == f
        kept = bank[~inside[sources]]
        alone = Scorer.of(kept, scoring).patch_terms(goods.embeddings[inside])
        assert np.allclose(alone.worst, oof.terms.worst[inside], atol=1e-5)
