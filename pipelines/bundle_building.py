"""Building the line's bundle from a trained embedder: ONNX export with a parity check, the golden bank, the
choices made on held-out parts (offset, whole-part view) and the calibrated threshold.

Everything is scored by the ONNX model through ``inspector.scorer``, so the threshold is set on the scores the
line will produce."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from inspector.bundle import BundleSpec, Threshold, write_bundle
from inspector.calibration import calibrate
from inspector.density import DensitySpec
from inspector.engine import OnnxEmbedder
from inspector.metrics import roc_auc
from inspector.preprocess import Preprocessor
from inspector.scorer import PatchTerms, RawScores, Scorer, golden_rows
from inspector.scoring import GoldenBank, ScoringConfig
from models.coreset import greedy_coreset
from models.export import check_parity, export_onnx
from models.siamese import Embedder, FrozenGlobalEmbedder, PatchEmbedder
from pipelines.data.split import DataSplit
from pipelines.embedder_training import load_preprocessed
from pipelines.recipe import Recipe


def reference_bank(embeddings: np.ndarray, recipe: Recipe, valid: np.ndarray | None = None) -> np.ndarray:
    """Image embeddings as they are; patch embeddings flattened and cut to ``max_bank_patches``.

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
        return embeddings
    flat = golden_rows(embeddings, recipe.scoring, valid)
    size = recipe.max_bank_patches
    if len(flat) <= size:
        return flat
    if size <= 0:
        return flat[:0]
    rng = np.random.default_rng(recipe.seed)
    if recipe.bank_selection == "random":
        return flat[np.sort(rng.choice(len(flat), size, replace=False))]
    pool = 8 * size
    if len(flat) > pool:  # greedy selection costs O(len × size): pick from an even random pool
        flat = flat[np.sort(rng.choice(len(flat), pool, replace=False))]
    return flat[greedy_coreset(flat, size, seed=recipe.seed)]


def choose_offset(
    bank: GoldenBank,
    good: np.ndarray,
    defective: np.ndarray,
    scoring: ScoringConfig,
    candidates: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 400,
    seed: int = 0,
    good_groups: Sequence[str] | None = None,
    defective_groups: Sequence[str] | None = None,
    good_valid: np.ndarray | None = None,
    defective_valid: np.ndarray | None = None,
) -> tuple[ScoringConfig, dict[str, Any]]:
    """The scoring offset (``ScoringConfig.offset``) for this product: the configured one unless the held-out parts
    show another candidate separating goods from defects better, in at least ``confidence`` of bootstrap resamples.

    Why a default with a tested override, not the argmax: discounting the part's typical patch distance lets small
    defects stand out on parts that vary as a whole (magnetic tiles, product split, trained model: 0.865 at 0,
    0.874 at 0.5, scored on the part only; the larger gains measured earlier came from scoring the letterbox
    padding; benchmarks/README.md), yet a few dozen validation defects
    from two or three physical parts rank the candidates within about ±0.015 of each other, which is noise. A
    product whose defects cover the whole part, where the offset hides them, shows up as a consistent loss and
    moves it to 0. Goods and defects are resampled separately (paired across candidates), seeded, so the choice is
    reproducible; with ``*_groups`` (one capture-group id per image) whole groups are resampled, because six photos
    of one tile are one piece of evidence, not six. Returns the scoring to use and what was measured (recorded in
    the threshold's details).
    """
    scorer = Scorer(bank, scoring)
    return pick_offset(
        scorer.patch_terms(good, good_valid),
        scorer.patch_terms(defective, defective_valid),
        scoring,
        candidates,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        good_groups=good_groups,
        defective_groups=defective_groups,
    )


def _cluster_draws(groups: Sequence[str] | None, n: int, resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Bootstrap index draws over ``n`` items: whole groups with replacement (as many as there are), else items."""
    if groups is None:
        return [rng.integers(0, n, n) for _ in range(resamples)]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} images")
    _, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)] if n else []
    return [
        np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if members
        else np.zeros(0, int)
        for _ in range(resamples)
    ]


def pick_offset(
    good: PatchTerms,
    defective: PatchTerms,
    scoring: ScoringConfig,
    candidates: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 400,
    seed: int = 0,
    good_groups: Sequence[str] | None = None,
    defective_groups: Sequence[str] | None = None,
) -> tuple[ScoringConfig, dict[str, Any]]:
    """:func:`choose_offset` on the scorer's patch terms already searched, so calibration can reuse them."""
    offsets = sorted({*(float(c) for c in candidates), scoring.offset})
    aurocs, wins = bootstrap_wins(
        {c: (good.view(c), defective.view(c)) for c in offsets},
        scoring.offset,
        resamples=resamples,
        seed=seed,
        good_groups=good_groups,
        defective_groups=defective_groups,
    )
    n_good, n_bad = len(good.worst), len(defective.worst)
    better = [c for c in offsets if c != scoring.offset and wins[c] >= confidence]
    best = max(better, key=lambda c: aurocs[c]) if better else scoring.offset
    units = {
        "good": len(set(good_groups)) if good_groups is not None else n_good,
        "defective": len(set(defective_groups)) if defective_groups is not None else n_bad,
    }
    return replace(scoring, offset=best), {
        "offset_auroc": {str(c): aurocs[c] for c in offsets},
        "offset_wins": {str(c): wins[c] for c in offsets},
        "offset": best,
        "offset_resampled": "groups" if defective_groups is not None else "images",
        "offset_resample_units": units,
    }


def bootstrap_wins(
    candidates: dict[Any, tuple[np.ndarray, np.ndarray]],
    baseline: Any,
    *,
    resamples: int = 400,
    seed: int = 0,
    good_groups: Sequence[str] | None = None,
    defective_groups: Sequence[str] | None = None,
) -> tuple[dict[Any, float], dict[Any, float]]:
    """Each candidate scoring's AUROC on held-out (good, defective) scores, and the share of bootstrap resamples in
    which it beats ``baseline``'s; goods and defects resampled separately, paired across candidates, seeded, and by
    whole capture groups when ``*_groups`` are given."""
    first = next(iter(candidates.values()))
    n_good, n_bad = len(first[0]), len(first[1])
    labels = np.r_[np.zeros(n_good), np.ones(n_bad)]
    scores = {c: np.r_[g, d] for c, (g, d) in candidates.items()}
    aurocs = {c: roc_auc(labels, v) for c, v in scores.items()}
    rng = np.random.default_rng([seed, 17])
    good_draws = _cluster_draws(good_groups, n_good, resamples, rng)
    bad_draws = _cluster_draws(defective_groups, n_bad, resamples, rng)
    picks = [np.r_[g, n_good + b] for g, b in zip(good_draws, bad_draws)]
    boot = {c: np.array([roc_auc(labels[i], v[i]) for i in picks]) for c, v in scores.items()}
    return aurocs, {c: float(np.mean(boot[c] > boot[baseline])) for c in scores}


def build_bundle(
    embedder: Embedder | PatchEmbedder | FrozenGlobalEmbedder,
    split: DataSplit,
    recipe: Recipe,
    out: Path,
    *,
    provenance: dict[str, Any] | None = None,
    model_name: str = "siamese-inspector",
    model_version: str = "dev",
    overwrite: bool = True,
) -> Path:
    """Export to ONNX (with a parity check on real images), embed golden references and calibrate the threshold."""
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_path = out.parent / f".{out.name}.model.onnx"
    pre = Preprocessor(recipe.preprocess)
    export_onnx(embedder, onnx_path, height=recipe.preprocess.height, width=recipe.preprocess.width)
    try:
        parity_paths = (split.calibration_good or split.train_good)[:8]
        parity = check_parity(embedder, onnx_path, load_preprocessed(parity_paths, pre))
        onnx = OnnxEmbedder(onnx_path, recipe.preprocess)
        refs = onnx.embed(split.train_good)
        bad_refs = [e for e in refs.errors if e]
        if bad_refs:
            raise ValueError(f"{len(bad_refs)} golden reference images could not be read: {bad_refs[:3]}")
        references = reference_bank(refs.embeddings, recipe, refs.valid)
        patch_mode = getattr(embedder, "mode", "global") == "patch"
        scoring = (
            recipe.scoring if patch_mode else replace(recipe.scoring, offset=0.0)
        )  # the offset is a patch-mode rule
        density: DensitySpec | None = None
        descriptors = refs.descriptors
        if split.calibration_good:
            scorer, threshold = calibrated_scorer(embedder, onnx, references, scoring, split, recipe, descriptors)
            density = scorer.density_spec(["initial"] * len(descriptors)) if descriptors is not None else None
            scoring = scorer.scoring
        else:
            threshold = Threshold(float("inf"), rule="uncalibrated", details={"reason": "no calibration images"})
        spec = BundleSpec(
            preprocessing=recipe.preprocess,
            scoring=scoring,
            threshold=threshold,
            model={
                "name": model_name,
                "version": model_version,
                "backbone": recipe.embedder.backbone,
                "mode": "patch" if patch_mode else "image",
                "parity_max_abs_diff": parity,
            },
            provenance=provenance or {},
            reference_ids=[p.name for p in split.train_good] if references.shape[0] == len(split.train_good) else [],
            density=density,
        )
        return write_bundle(
            out, onnx_path, references, spec, overwrite=overwrite, descriptors=descriptors if density else None
        )
    finally:
        onnx_path.unlink(missing_ok=True)


def calibrated_scorer(
    embedder: Embedder | PatchEmbedder | FrozenGlobalEmbedder,
    onnx: OnnxEmbedder,
    references: np.ndarray,
    scoring: ScoringConfig,
    split: DataSplit,
    recipe: Recipe,
    descriptors: np.ndarray | None,
) -> tuple[Scorer, Threshold]:
    """The bundle's scorer and threshold from the calibration goods and validation defects, scored by the ONNX model
    as the line scores them: the offset chosen on held-out parts, the whole-part view's scales fitted on the goods
    and kept only where it does not lose to the patch view alone, and the threshold set on the fused score."""
    cal, val = onnx.embed(split.calibration_good), onnx.embed(split.validation_defective)
    part_view = (
        descriptors is not None and cal.descriptors is not None and len(descriptors) >= 2 and len(cal.embeddings)
    )
    part_blocks: tuple[int, ...] | None = None
    if part_view:
        assert isinstance(embedder, PatchEmbedder), "only a patch embedder describes whole parts"
        part_blocks = tuple(embedder.descriptor_blocks)
    scorer = Scorer.of(
        references,
        scoring,
        part_references=descriptors if part_view else None,
        part_blocks=part_blocks,
    )
    good_groups = split.group_ids(split.calibration_good)
    defective_groups = split.group_ids(split.validation_defective)
    has_val = len(val.embeddings) > 0
    choice: dict[str, Any] = {}
    if has_val and np.ndim(cal.embeddings) == 3 and recipe.offset_candidates:  # one search serves choice and threshold
        cal_terms = scorer.patch_terms(cal.embeddings, cal.valid)
        val_terms = scorer.patch_terms(val.embeddings, val.valid)
        chosen, choice = pick_offset(
            cal_terms,
            val_terms,
            scoring,
            recipe.offset_candidates,
            confidence=recipe.offset_confidence,
            seed=recipe.seed,
            good_groups=good_groups,
            defective_groups=defective_groups,
        )
        scorer = scorer.with_offset(chosen.offset)
        cal_patch, val_patch = cal_terms.view(chosen.offset), val_terms.view(chosen.offset)
        cal_raw = RawScores(cal_patch, scorer.part_distances(cal.descriptors) if part_view else None)
        val_raw: RawScores | None = RawScores(val_patch, scorer.part_distances(val.descriptors) if part_view else None)
    else:
        cal_raw = scorer.raw(cal.embeddings, cal.valid, cal.descriptors if part_view else None)
        val_raw = scorer.raw(val.embeddings, val.valid, val.descriptors if part_view else None) if has_val else None
    if part_view:
        scorer = scorer.fitted_on(cal_raw)
        keep, choice["whole_part_score"] = keep_whole_part(
            (cal_raw.patch, None if val_raw is None else val_raw.patch),
            (scorer.fuse(cal_raw), None if val_raw is None else scorer.fuse(val_raw)),
            confidence=recipe.offset_confidence,
            seed=recipe.seed,
            good_groups=good_groups,
            defective_groups=defective_groups,
        )
        choice["whole_part_score"]["references"] = len(descriptors)  # type: ignore[arg-type]
        if not keep:
            scorer = scorer.patch_only()
    threshold = calibrate(
        scorer.fuse(cal_raw),
        None if val_raw is None else scorer.fuse(val_raw),
        rule=recipe.calibration_rule,
        target_frr=recipe.target_false_reject_rate,
    )
    threshold.details.update(choice)
    return scorer.with_threshold(threshold.value), threshold


def keep_whole_part(
    patch: tuple[np.ndarray, np.ndarray | None],
    fused: tuple[np.ndarray, np.ndarray | None],
    *,
    confidence: float = 0.95,
    resamples: int = 400,
    seed: int = 0,
    good_groups: Sequence[str] | None = None,
    defective_groups: Sequence[str] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Whether the bundle fuses the whole-part score: yes, unless the held-out defects show the patch score alone
    separating them better in at least ``confidence`` of bootstrap resamples (by capture group when known).

    Why a default with a tested override: on defect types no model has seen, the fused score is far better (magnetic
    tiles, leave-one-type-out mean 0.78 → 0.87), and held-out defects of the *seen* types cannot speak for those;
    but where the part view is only noise (small local defects on small photos: the generated flanges at 128 px,
    patch 0.936, fused 0.916), the validation defects show it and the patch score is kept alone.
    (``patch`` and ``fused``: calibration-good and validation-defect scores of each.)"""
    if patch[1] is None or fused[1] is None or not len(patch[1]):
        return True, {"kept": True, "reason": "no validation defects to test it on"}
    aurocs, wins = bootstrap_wins(
        {"fused": (fused[0], fused[1]), "patch": (patch[0], patch[1])},
        "fused",
        resamples=resamples,
        seed=seed,
        good_groups=good_groups,
        defective_groups=defective_groups,
    )
    keep = wins["patch"] < confidence
    return keep, {"kept": keep, "validation_auroc": aurocs, "patch_wins": wins["patch"]}
