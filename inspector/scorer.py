"""The line's score, composed in one place: embeddings → the two views → their scales → the fused score → verdict.

Every path that turns embeddings into a score calls this module: the line (``Inspector``), training-time
validation, bundle building and calibration, recalibration after adding references, heatmaps and INT8 drift. None
of them re-writes a step, so a change to scoring is a change to this file and shows up everywhere at once.

The stages, each a named method of :class:`Scorer`:

1. **patch view** (:meth:`Scorer.raw`): each part's worst patch distance to the golden bank, less ``offset`` times
   its typical patch distance (:mod:`inspector.scoring` does the exact pruned search), over the patches on the part.
2. **whole-part view**: the Mahalanobis distance of the part's descriptor to the golden parts' Gaussian
   (:mod:`inspector.density`), when the bundle has one.
3. **scales** (:meth:`Scorer.standardised`): each view in units of the calibration goods' spread above their median,
   so the two are comparable (:class:`ViewScales`, fitted by :meth:`ViewScales.of_goods`).
4. **fusion** (:meth:`Scorer.fuse`): the mean of the two standardised views (``combine="mean"``), the larger
   (``"max"``), the whole-part view alone (``"part"``), or the patch view alone without a whole-part view.
5. **verdict** (:meth:`Scorer.verdicts`): score strictly above the threshold.

Heatmap values (:meth:`Scorer.patch_maps`) are the patch view per patch, in the patch view's raw units, with the
threshold in the same units (:meth:`Scorer.patch_threshold`). Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from inspector.density import COMBINE, COMBINES, DensitySpec, GaussianDensity, ScoreScale
from inspector.errors import InspectorError
from inspector.preprocess import patch_grid
from inspector.scoring import GoldenBank, ScoringConfig, offset_scores, patch_mask

if TYPE_CHECKING:
    from inspector.bundle import Bundle

#: the view names, as results, MLflow metrics and the bundle call them
PATCH_VIEW = "patch"
PART_VIEW = "part"


@dataclass(frozen=True)
class RawScores:
    """Each view's scores in its own units, one per part: ``patch`` always, ``part`` with a whole-part view."""

    patch: np.ndarray
    part: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.patch)

    def subset(self, index: np.ndarray | Sequence[int] | slice) -> RawScores:
        """The same views for a subset of the parts (e.g. the goods among calibration images)."""
        return RawScores(self.patch[index], None if self.part is None else self.part[index])


@dataclass(frozen=True)
class ViewScales:
    """Where the goods sit on each view (median and spread), which puts the two views in one unit."""

    patch: ScoreScale
    part: ScoreScale

    @classmethod
    def of_goods(cls, good: RawScores) -> ViewScales:
        """The scales fitted on good parts' raw scores (the calibration goods at bundle building)."""
        if good.part is None:
            raise InspectorError("view scales need whole-part scores of the goods")
        return cls(ScoreScale.of(good.patch), ScoreScale.of(good.part))


@dataclass(frozen=True)
class PatchTerms:
    """Each part's worst and typical patch distance: the patch view for any offset (``offset_scores``)."""

    worst: np.ndarray
    typical: np.ndarray

    def view(self, offset: float) -> np.ndarray:
        return np.asarray(offset_scores(self.worst, self.typical, offset), dtype=np.float64)


def golden_rows(embeddings: np.ndarray, scoring: ScoringConfig, valid: np.ndarray | None = None) -> np.ndarray:
    """Golden-bank rows from reference embeddings: image embeddings (N, D) as they are, patch embeddings (N, P, D)
    flattened to the patches on each part (``valid``): padding is never scored, so it is never a golden patch."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim == 2:
        return emb
    mask = patch_mask(emb, scoring, valid)
    flat = emb.reshape(-1, emb.shape[-1])
    return flat if mask is None else flat[mask.ravel()]


class Scorer:
    """The composition from embeddings to a verdict for one golden bank (and whole-part Gaussian)."""

    def __init__(
        self,
        bank: GoldenBank,
        scoring: ScoringConfig,
        *,
        part_model: GaussianDensity | None = None,
        scales: ViewScales | None = None,
        threshold: float = math.inf,
        combine: str = COMBINE,
    ) -> None:
        if combine not in COMBINES:
            raise InspectorError(f"unknown combine rule {combine!r}: expected one of {', '.join(COMBINES)}")
        self.bank = bank
        self.scoring = scoring
        self.part_model = part_model
        self.scales = scales
        self.threshold = float(threshold)
        self.combine = combine

    @classmethod
    def of(
        cls,
        references: np.ndarray | GoldenBank,
        scoring: ScoringConfig,
        *,
        part_references: np.ndarray | None = None,
        part_blocks: Sequence[int] | None = None,
        scales: ViewScales | None = None,
        threshold: float = math.inf,
    ) -> Scorer:
        """A scorer from golden embeddings (and, for a whole-part view, the golden parts' descriptors and blocks)."""
        bank = (
            references if isinstance(references, GoldenBank) else GoldenBank(references, chunk_size=scoring.chunk_size)
        )
        part = None
        if part_references is not None:
            if part_blocks is None:
                raise InspectorError("a whole-part view needs the descriptor blocks of its references")
            part = GaussianDensity(part_references, part_blocks)
        return cls(bank, scoring, part_model=part, scales=scales, threshold=threshold)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Scorer:
        """The scorer a verified bundle defines: its bank, scoring, whole-part view and scales, and threshold."""
        spec = bundle.spec
        part = scales = None
        combine = COMBINE
        if spec.density is not None and bundle.descriptors is not None:
            part = GaussianDensity(bundle.descriptors, spec.density.blocks)
            scales = ViewScales(spec.density.patch_scale, spec.density.density_scale)
            combine = spec.density.combine
        bank = GoldenBank(bundle.references, chunk_size=spec.scoring.chunk_size)
        return cls(bank, spec.scoring, part_model=part, scales=scales, threshold=spec.threshold.value, combine=combine)

    # ----------------------------------------------------------------------------------------------- settings

    @property
    def fuses(self) -> bool:
        """Whether the score fuses the whole-part view (a Gaussian and the scales that put it in patch units)."""
        return self.part_model is not None and self.scales is not None

    def _with(self, **changes: object) -> Scorer:
        """A copy with some of its settings changed."""
        settings: dict[str, object] = {
            "part_model": self.part_model,
            "scales": self.scales,
            "threshold": self.threshold,
            "combine": self.combine,
            **changes,
        }
        scoring = settings.pop("scoring", self.scoring)
        return Scorer(self.bank, scoring, **settings)  # type: ignore[arg-type]

    def with_scales(self, scales: ViewScales | None) -> Scorer:
        return self._with(scales=scales)

    def fitted_on(self, good: RawScores) -> Scorer:
        """This scorer with its view scales fitted on good parts' raw scores (no-op without a whole-part view)."""
        return self.with_scales(ViewScales.of_goods(good)) if self.part_model is not None else self

    def patch_only(self) -> Scorer:
        """The same bank and scoring without the whole-part view (the bundle that does not fuse it)."""
        return self._with(part_model=None, scales=None, combine=COMBINE)

    def with_combine(self, combine: str) -> Scorer:
        """The same views combined by another rule (``COMBINES``)."""
        return self._with(combine=combine)

    def with_threshold(self, threshold: float) -> Scorer:
        return self._with(threshold=threshold)

    def with_offset(self, offset: float) -> Scorer:
        return self._with(scoring=replace(self.scoring, offset=float(offset)))

    def density_spec(self, ids: Sequence[str]) -> DensitySpec | None:
        """What the bundle stores of the whole-part view (blocks, scales, one id per golden descriptor)."""
        if self.part_model is None or self.scales is None:
            return None
        return DensitySpec(self.part_model.blocks, self.scales.patch, self.scales.part, tuple(ids), self.combine)

    # ----------------------------------------------------------------------------------------------- stages

    def patch_terms(self, embeddings: np.ndarray, valid: np.ndarray | None = None) -> PatchTerms:
        """Each part's exact worst and typical patch distance (one search serves every offset candidate); an
        image-level model's distance, with no typical term (the offset is a patch rule)."""
        if np.ndim(embeddings) == 2:
            distance = np.asarray(self.bank.anomaly_scores(embeddings, self.scoring), dtype=np.float64)
            return PatchTerms(distance, np.zeros_like(distance))
        worst, typical = self.bank.worst_and_typical(embeddings, self.scoring, valid)
        return PatchTerms(worst, typical)

    def part_distances(self, descriptors: np.ndarray | None) -> np.ndarray | None:
        """The whole-part view's raw score of each part (None for a scorer without one)."""
        if self.part_model is None:
            return None
        if descriptors is None:
            raise InspectorError("this scorer scores whole parts too: pass the model's descriptors")
        return self.part_model.distances(descriptors)

    def raw(
        self, embeddings: np.ndarray, valid: np.ndarray | None = None, descriptors: np.ndarray | None = None
    ) -> RawScores:
        """Both views' raw scores: ``valid`` marks the patches on each part, ``descriptors`` the whole-part input."""
        patch = np.asarray(self.bank.anomaly_scores(embeddings, self.scoring, valid), dtype=np.float64)
        return RawScores(patch, self.part_distances(descriptors))

    def standardised(self, raw: RawScores) -> dict[str, np.ndarray] | None:
        """Each view in the threshold's units (``patch``, ``part``), or None for a scorer that does not fuse."""
        if not self.fuses or raw.part is None:
            return None
        assert self.scales is not None
        return {PATCH_VIEW: self.scales.patch.standardise(raw.patch), PART_VIEW: self.scales.part.standardise(raw.part)}

    def fuse(self, raw: RawScores) -> np.ndarray:
        """The line's score of each part: the standardised views' mean or the larger of them, the whole-part view
        alone, or the patch view alone (as the bundle's ``combine`` and views say)."""
        views = self.standardised(raw)
        if views is None:
            return np.asarray(raw.patch, dtype=np.float64)
        if self.combine == "part":
            return views[PART_VIEW]
        if self.combine == "mean":
            return 0.5 * (views[PATCH_VIEW] + views[PART_VIEW])
        return np.maximum(views[PATCH_VIEW], views[PART_VIEW])

    def score(
        self, embeddings: np.ndarray, valid: np.ndarray | None = None, descriptors: np.ndarray | None = None
    ) -> np.ndarray:
        """Embeddings to the line's scores (:meth:`raw`, then :meth:`fuse`)."""
        return self.fuse(self.raw(embeddings, valid, descriptors))

    def verdicts(self, scores: np.ndarray) -> np.ndarray:
        """True where a part is flagged: its score strictly above the threshold."""
        return np.asarray(scores) > self.threshold

    # ----------------------------------------------------------------------------------------------- heatmaps

    @property
    def patch_threshold(self) -> float:
        """The threshold in the patch view's raw units: the patch distance at which a part whose whole-part view
        sits at the goods' median is flagged (heatmaps are drawn against it; under ``mean`` the patch view carries
        half the score, so it is twice the threshold above that median)."""
        if not self.fuses:
            return self.threshold
        assert self.scales is not None
        share = 2.0 if self.combine == "mean" else 1.0
        return self.scales.patch.median + share * self.threshold * self.scales.patch.spread

    def patch_maps(
        self, embeddings: np.ndarray, height: int, width: int, valid: np.ndarray | None = None
    ) -> np.ndarray:
        """(N, P, D) patch embeddings → (N, rows, cols): each patch's term of the patch view, in its raw units.

        Each patch's exact distance to the bank, less the part's ``offset`` × typical distance; patches off the part
        read 0, so each map's maximum is the part's patch view (:meth:`raw`)."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 3:
            raise InspectorError(
                f"heatmaps need patch embeddings (N, P, D); this model gives shape {emb.shape} (an image-level model)"
            )
        rows, cols = patch_grid(emb.shape[1], height, width)
        maps = self.bank.patch_distances(emb, self.scoring)
        if self.scoring.offset > 0:
            typical = self.bank.typical_distances(emb, self.scoring, valid)
            maps = maps - np.float32(self.scoring.offset) * typical[:, None]
        mask = patch_mask(emb, self.scoring, valid)
        if mask is not None:
            maps = np.where(mask, maps, np.float32(0.0))
        return maps.reshape(len(emb), rows, cols)

    def raw_of_maps(self, maps: np.ndarray, descriptors: np.ndarray | None = None) -> RawScores:
        """The raw views from :meth:`patch_maps` (each map's maximum is the part's patch view) and the descriptors:
        the heatmap and the verdict come from one patch search."""
        return RawScores(np.asarray(maps, dtype=np.float64).max(axis=(1, 2)), self.part_distances(descriptors))


def out_of_fold_views(
    embeddings: np.ndarray,
    valid: np.ndarray | None,
    descriptors: np.ndarray | None,
    rows: np.ndarray,
    sources: np.ndarray,
    fold: np.ndarray,
    scoring: ScoringConfig,
    part_blocks: Sequence[int] | None = None,
) -> tuple[PatchTerms, np.ndarray | None]:
    """Each good part scored against the golden bank less the rows that came from its fold's parts (``sources``:
    the part each bank row came from; ``fold``: each part's fold), and against the other folds' whole-part Gaussian
    when ``part_blocks`` and ``descriptors`` are given: what the line's goods will score, for parts that are in the
    bank. Cross-fitted calibration (folds of capture groups) and a few-shot part (each golden left out) both call it.
    """
    n = len(embeddings)
    worst, typical = np.zeros(n), np.zeros(n)
    part = np.zeros(n) if part_blocks is not None and descriptors is not None else None
    folds = np.unique(fold)
    for f in folds:
        inside = fold == f
        kept = rows[~inside[sources]]
        if not len(kept):
            raise InspectorError(f"fold {int(f) + 1} of {len(folds)}: every golden-bank row came from its parts")
        scorer = Scorer.of(
            kept,
            scoring,
            part_references=None if part is None or descriptors is None else descriptors[~inside],
            part_blocks=part_blocks,
        )
        terms = scorer.patch_terms(embeddings[inside], None if valid is None else valid[inside])
        worst[inside], typical[inside] = terms.worst, terms.typical
        if part is not None and descriptors is not None:
            part[inside] = scorer.part_distances(descriptors[inside])
    return PatchTerms(worst, typical), part
