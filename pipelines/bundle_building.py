"""Building the line's bundle from a trained embedder: ONNX export with a parity check, the golden bank, the
choices made on held-out parts (offset, whole-part view) and the calibrated threshold.

Everything is scored by the ONNX model through ``inspector.scorer``, so the threshold is set on the scores the
line will produce."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from inspector.bundle import BundleSpec, Threshold, write_bundle
from inspector.calibration import calibrate
from inspector.density import COMBINE, DensitySpec
from inspector.engine import Embedded, OnnxEmbedder
from inspector.metrics import roc_auc
from inspector.preprocess import Preprocessor
from inspector.scorer import PART_VIEW, PATCH_VIEW, PatchTerms, RawScores, Scorer
from inspector.scoring import GoldenBank, ScoringConfig
from models.export import check_parity, export_onnx
from models.siamese import Embedder, FrozenGlobalEmbedder, PatchEmbedder
from pipelines.data.split import DataSplit
from pipelines.embedder_training import load_preprocessed
from pipelines.golden import fold_count, golden_bank, out_of_fold
from pipelines.recipe import Recipe


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
    of one tile are one piece of evidence, not six, and fewer than :data:`MIN_EVIDENCE_UNITS` groups a side keep
    the configured offset. Returns the scoring to use and what was measured (recorded in the threshold's details).
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


#: the fewest independent pieces of evidence on each side, goods and defects (capture groups, or photos where each
#: is its own), that may move a default: a bootstrap over fewer cannot know its own spread (three tiles resampled
#: give ten distinct draws, so one tile's quirk wins "in 95 % of resamples"; on the tiles, choices made on the two or
#: three tiles of 50 goods lost up to 0.08 AUROC on later goods)
MIN_EVIDENCE_UNITS = 10


def evidence_units(
    good_groups: Sequence[str] | None, n_good: int, defective_groups: Sequence[str] | None, n_bad: int
) -> dict[str, int]:
    """How many independent pieces of evidence each side holds: its capture groups, or its images."""
    return {
        "good": len(set(good_groups)) if good_groups is not None else n_good,
        "defective": len(set(defective_groups)) if defective_groups is not None else n_bad,
    }


def too_little_evidence(units: dict[str, int]) -> str | None:
    """Why ``units`` (:func:`evidence_units`) cannot move a default, or None when they can."""
    short = [f"{n} {side}" for side, n in units.items() if n < MIN_EVIDENCE_UNITS]
    if not short:
        return None
    return f"evidence from {' and '.join(short)} capture groups: {MIN_EVIDENCE_UNITS} a side move a default"


def chosen_on_evidence(
    aurocs: dict[Any, float], wins: dict[Any, float], baseline: Any, confidence: float, units: dict[str, int]
) -> tuple[Any, str | None]:
    """The default ``baseline`` unless other candidates beat it in at least ``confidence`` of the resamples
    (:func:`bootstrap_wins`) on enough evidence (:func:`too_little_evidence`); of several, the one of highest AUROC.
    Also why the default stayed for want of evidence (None when the evidence sufficed)."""
    short = too_little_evidence(units)
    better = [] if short else [c for c in wins if c != baseline and wins[c] >= confidence]
    return (max(better, key=lambda c: aurocs[c]) if better else baseline), short


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
    units = evidence_units(good_groups, len(good.worst), defective_groups, len(defective.worst))
    best, short = chosen_on_evidence(aurocs, wins, scoring.offset, confidence, units)
    return replace(scoring, offset=best), {
        "offset_auroc": {str(c): aurocs[c] for c in offsets},
        "offset_wins": {str(c): wins[c] for c in offsets},
        "offset": best,
        "offset_resampled": "groups" if defective_groups is not None else "images",
        "offset_resample_units": units,
        **({"offset_kept_because": short} if short else {}),
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


def golden_goods(split: DataSplit, recipe: Recipe) -> list[Path]:
    """The goods a bundle's golden bank is built from: every good outside the test split when calibration can be
    cross-fitted (``calibration_folds`` ≥ 2 and two capture groups or more), else the training goods (the
    calibration slice stays out of the bank it is scored against)."""
    every = [*split.train_good, *split.calibration_good]
    if split.calibration_good and fold_count(split.group_ids(every), recipe.calibration_folds):
        return every
    return list(split.train_good)


#: where a bundle's model record keeps the whole-part descriptor's blocks (the view may be calibrated off)
DESCRIPTOR_BLOCKS = "descriptor_blocks"


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
        patch_mode = getattr(embedder, "mode", "global") == "patch"
        model: dict[str, Any] = {
            "name": model_name,
            "version": model_version,
            "backbone": recipe.embedder.backbone,
            "mode": "patch" if patch_mode else "image",
            "parity_max_abs_diff": parity,
        }
        if isinstance(embedder, PatchEmbedder) and embedder.density_stages:
            model[DESCRIPTOR_BLOCKS] = list(embedder.descriptor_blocks)
        return bundle_from_onnx(onnx_path, split, recipe, out, model, provenance or {}, overwrite=overwrite)
    finally:
        onnx_path.unlink(missing_ok=True)


def bundle_from_onnx(
    onnx_path: Path,
    split: DataSplit,
    recipe: Recipe,
    out: Path,
    model: dict[str, Any],
    provenance: dict[str, Any],
    *,
    overwrite: bool = True,
) -> Path:
    """The bundle of an ONNX model (``model``: its record, as :func:`build_bundle` writes it): the golden bank
    embedded by that model, the offset, views and threshold chosen on its own scores."""
    onnx = OnnxEmbedder(onnx_path, recipe.preprocess)
    golden = golden_goods(split, recipe)
    refs = onnx.embed(golden)
    bad_refs = [e for e in refs.errors if e]
    if bad_refs:
        raise ValueError(f"{len(bad_refs)} golden reference images could not be read: {bad_refs[:3]}")
    references, sources = golden_bank(refs.embeddings, recipe, refs.valid)
    patch_mode = model["mode"] == "patch"
    scoring = recipe.scoring if patch_mode else replace(recipe.scoring, offset=0.0)  # the offset is a patch-mode rule
    density: DensitySpec | None = None
    descriptors = refs.descriptors
    if split.calibration_good:
        part_blocks = tuple(model[DESCRIPTOR_BLOCKS]) if DESCRIPTOR_BLOCKS in model else None
        data = calibration_set(onnx, refs, split, recipe, sources)
        scorer, threshold = calibrated_scorer(data, references, scoring, recipe, part_blocks)
        density = scorer.density_spec(["initial"] * len(descriptors)) if descriptors is not None else None
        scoring = scorer.scoring
    else:
        threshold = Threshold(float("inf"), rule="uncalibrated", details={"reason": "no calibration images"})
    spec = BundleSpec(
        preprocessing=recipe.preprocess,
        scoring=scoring,
        threshold=threshold,
        model=model,
        provenance=provenance,
        reference_ids=[p.name for p in golden] if references.shape[0] == len(golden) else [],
        density=density,
    )
    return write_bundle(
        out, onnx_path, references, spec, overwrite=overwrite, descriptors=descriptors if density else None
    )


@dataclass(frozen=True)
class CalibrationSet:
    """What a bundle's threshold and choices are made on, as the ONNX model embedded it: the golden goods the bank
    is built from, the held-out calibration goods (none when they are cross-fitted), the validation defects, each
    with its capture groups, and which golden goods the embedder trained on."""

    golden: Embedded
    golden_groups: list[str]
    defects: Embedded
    defect_groups: list[str]
    held_out: Embedded | None = None
    held_out_groups: list[str] = field(default_factory=list)
    trained: np.ndarray | None = None
    bank_sources: np.ndarray | None = None  # the golden good each row of the shipped bank came from


def calibration_set(
    onnx: OnnxEmbedder, golden: Embedded, split: DataSplit, recipe: Recipe, bank_sources: np.ndarray
) -> CalibrationSet:
    """Embed what calibration needs beside the golden goods (already embedded for the bank)."""
    paths = golden_goods(split, recipe)
    val = onnx.embed(split.validation_defective)
    val_paths = [p for p, e in zip(split.validation_defective, val.errors) if e is None]
    if len(paths) > len(split.train_good):  # cross-fitted: the calibration goods are golden too
        groups = split.group_ids(paths)
        trained = np.arange(len(paths)) < len(split.train_good)
        return CalibrationSet(
            golden, groups, val, split.group_ids(val_paths), trained=trained, bank_sources=bank_sources
        )
    cal = onnx.embed(split.calibration_good)
    cal_paths = [p for p, e in zip(split.calibration_good, cal.errors) if e is None]
    return CalibrationSet(
        golden, split.group_ids(paths), val, split.group_ids(val_paths), cal, split.group_ids(cal_paths)
    )


@dataclass(frozen=True)
class GoodEvidence:
    """The goods' scores the threshold, the offset and the view choice are made on, and their capture groups."""

    terms: PatchTerms
    part: np.ndarray | None
    groups: list[str]
    how: dict[str, Any]
    trained: np.ndarray | None = None  # cross-fitted: which goods the embedder trained on


def good_evidence(
    data: CalibrationSet,
    scorer: Scorer,
    references: np.ndarray,
    recipe: Recipe,
    part_blocks: tuple[int, ...] | None,
) -> GoodEvidence:
    """The held-out calibration goods scored against the shipped bank, or, without them, every golden good scored
    out of fold: what the line's goods will score, either way."""
    if data.held_out is not None:
        cal = data.held_out
        part = scorer.part_distances(cal.descriptors) if part_blocks is not None else None
        groups = data.held_out_groups
        how = {"calibration": "held_out_slice", "goods": len(groups), "groups": len(set(groups))}
        return GoodEvidence(scorer.patch_terms(cal.embeddings, cal.valid), part, groups, how)
    groups = data.golden_groups
    folds = fold_count(groups, recipe.calibration_folds)
    bank = None if data.bank_sources is None else (references, data.bank_sources)
    oof = out_of_fold(data.golden, groups, folds, recipe, scorer.scoring, part_blocks, bank)
    how = {"calibration": "cross_fitted", "folds": folds, "goods": len(groups), "groups": len(set(groups))}
    return GoodEvidence(oof.terms, oof.part, groups, how, data.trained)


@dataclass(frozen=True)
class Evidence:
    """The bundle's scorer before its threshold, the scores the threshold is set on, and the choices made."""

    scorer: Scorer
    good: np.ndarray  # the goods' line scores (held out, or out of fold)
    defects: np.ndarray | None  # the validation defects' line scores
    choice: dict[str, Any]
    trained: np.ndarray | None = None
    both_views: Scorer | None = None  # both views fused by default, before the choice (what each view alone scores)


def scored_evidence(
    data: CalibrationSet,
    references: np.ndarray,
    scoring: ScoringConfig,
    recipe: Recipe,
    part_blocks: tuple[int, ...] | None,
) -> Evidence:
    """The goods' evidence (:func:`good_evidence`) and the validation defects scored as the line scores them, with
    the offset chosen on them and the whole-part view's scales fitted on the goods, kept only where it does not
    lose to the patch view alone. Pure numpy: the benchmarks call it on embeddings they sub-sample."""
    descriptors = data.golden.descriptors
    part_view = part_blocks is not None and descriptors is not None and len(descriptors) >= 2
    scorer = Scorer.of(
        references,
        scoring,
        part_references=descriptors if part_view else None,
        part_blocks=part_blocks if part_view else None,
    )
    goods = good_evidence(data, scorer, references, recipe, part_blocks if part_view else None)
    val = data.defects
    val_terms = scorer.patch_terms(val.embeddings, val.valid) if len(val.embeddings) else None
    choice: dict[str, Any] = {"evidence": goods.how}
    if val_terms is not None and np.ndim(val.embeddings) == 3 and recipe.offset_candidates:
        chosen, offset_choice = pick_offset(
            goods.terms,
            val_terms,
            scoring,
            recipe.offset_candidates,
            confidence=recipe.offset_confidence,
            seed=recipe.seed,
            good_groups=goods.groups,
            defective_groups=data.defect_groups,
        )
        choice.update(offset_choice)
        scorer = scorer.with_offset(chosen.offset)
    offset = scorer.scoring.offset
    good_raw = RawScores(goods.terms.view(offset), goods.part)
    val_raw = None if val_terms is None else RawScores(val_terms.view(offset), scorer.part_distances(val.descriptors))
    both_views = None
    if part_view:
        scorer = both_views = scorer.fitted_on(good_raw)
        chosen_views, choice["whole_part_score"] = choose_views(
            view_scores(scorer, good_raw),
            None if val_raw is None else view_scores(scorer, val_raw),
            confidence=recipe.offset_confidence,
            seed=recipe.seed,
            good_groups=goods.groups,
            defective_groups=data.defect_groups,
        )
        choice["whole_part_score"]["references"] = len(descriptors)  # type: ignore[arg-type]
        scorer = scorer.patch_only() if chosen_views == PATCH_VIEW else scorer.with_combine(VIEW_COMBINES[chosen_views])
    defects = None if val_raw is None else scorer.fuse(val_raw)
    return Evidence(scorer, scorer.fuse(good_raw), defects, choice, goods.trained, both_views)


def calibrated_scorer(
    data: CalibrationSet,
    references: np.ndarray,
    scoring: ScoringConfig,
    recipe: Recipe,
    part_blocks: tuple[int, ...] | None,
) -> tuple[Scorer, Threshold]:
    """The bundle's scorer and threshold: :func:`scored_evidence`, then the threshold set on the fused scores with
    the recipe's rule, target and promise, with the evidence and choices recorded in its details."""
    ev = scored_evidence(data, references, scoring, recipe, part_blocks)
    threshold = calibrate(
        ev.good,
        ev.defects,
        rule=recipe.calibration_rule,
        target_frr=recipe.target_false_reject_rate,
        promise=recipe.threshold_promise,
    )
    if ev.trained is not None:  # did training pull the goods it saw below the held-out ones? the rejects say
        flagged = ev.good > threshold.value
        ev.choice["evidence"]["rejects_trained_on"] = [int(flagged[ev.trained].sum()), int(ev.trained.sum())]
        ev.choice["evidence"]["rejects_held_out"] = [int(flagged[~ev.trained].sum()), int((~ev.trained).sum())]
    threshold.details.update(ev.choice)
    return ev.scorer.with_threshold(threshold.value), threshold


FUSED = "fused"
#: the views fused by the larger, the alternative to the default fusion (:data:`inspector.density.COMBINE`)
LARGER = "max"
#: each choice of views, as the scorer combines them
VIEW_COMBINES = {FUSED: COMBINE, LARGER: "max", PART_VIEW: "part"}
#: the choices that replace the default fusion only on clear evidence
ALTERNATIVES = (PATCH_VIEW, PART_VIEW, LARGER)


def view_scores(scorer: Scorer, raw: RawScores) -> dict[str, np.ndarray]:
    """Each view standardised, the default fusion and the larger of the two, as :func:`choose_views` weighs them
    (a scorer with both views)."""
    views = scorer.standardised(raw)
    if views is None:
        raise ValueError("choosing views needs a scorer with both views and their scales")
    return {**views, **{v: scorer.with_combine(VIEW_COMBINES[v]).fuse(raw) for v in (FUSED, LARGER)}}


def choose_views(
    good: dict[str, np.ndarray],
    defective: dict[str, np.ndarray] | None,
    *,
    confidence: float = 0.95,
    resamples: int = 400,
    seed: int = 0,
    good_groups: Sequence[str] | None = None,
    defective_groups: Sequence[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Which views the bundle scores with: both fused by their mean (``fused``), unless the held-out defects show
    another choice (one view alone, ``patch`` or ``part``, or the larger of the two, ``max``) separating them better
    in at least ``confidence`` of bootstrap resamples of whole capture groups, with at least
    :data:`MIN_EVIDENCE_UNITS` groups a side; of several such, the one of higher AUROC. ``good``/``defective``:
    :func:`view_scores` (the goods' out of fold when calibration is cross-fitted, so every good is evidence).

    Why fused by default, with a tested override: on defect types no model has seen, the fused score is far better
    (magnetic tiles, leave-one-type-out mean 0.78 → 0.87), and held-out defects of the *seen* types cannot speak for
    those; but where one view is only noise (small local defects on small photos: the generated flanges at 128 px,
    patch 0.936, fused 0.916; textures whose every patch has a golden twin), the validation defects show it and the
    other view decides alone. Why the mean and not the larger: on later goods it was never further below the better
    view alone and better on the tiles (docs/decisions.md)."""
    if defective is None or not len(defective[FUSED]):
        reason = "no validation defects to test it on"
        return FUSED, {"kept": True, "views": FUSED, "combine": COMBINE, "reason": reason}
    aurocs, wins = bootstrap_wins(
        {view: (good[view], defective[view]) for view in (FUSED, *ALTERNATIVES)},
        FUSED,
        resamples=resamples,
        seed=seed,
        good_groups=good_groups,
        defective_groups=defective_groups,
    )
    units = evidence_units(good_groups, len(good[FUSED]), defective_groups, len(defective[FUSED]))
    chosen, short = chosen_on_evidence(aurocs, wins, FUSED, confidence, units)
    return chosen, {
        "kept": chosen != PATCH_VIEW,
        "views": chosen,
        "combine": VIEW_COMBINES.get(chosen),
        "validation_auroc": aurocs,
        "wins_over_fused": {v: wins[v] for v in ALTERNATIVES},
        "resample_units": units,
        **({"reason": short} if short else {}),
    }
