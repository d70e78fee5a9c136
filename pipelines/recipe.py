"""The main job as plain functions: train → export → golden references → threshold → evaluate.

Each step is a small function with explicit inputs and outputs so Prefect tasks can wrap them one to one, and
so the demo, the benchmarks and the tests run exactly the same code. Evaluation scores through ``inspector``
(the ONNX model in the bundle), so the reported numbers are the numbers the line will produce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from inspector.bundle import BundleSpec, Threshold, load_bundle, write_bundle
from inspector.calibration import calibrate
from inspector.density import DensitySpec, GaussianDensity, ScoreScale, fused_scores
from inspector.engine import Inspector, OnnxEmbedder
from inspector.metrics import average_precision, rates_at_threshold, roc_auc
from inspector.preprocess import PreprocessConfig, Preprocessor
from inspector.scoring import GoldenBank, ScoringConfig, anomaly_scores, offset_scores, patch_mask
from models.coreset import greedy_coreset
from models.export import check_parity, export_onnx
from models.pairs import LabelledImageDataset, PatchPairDataset, default_augmentation
from models.siamese import Embedder, EmbedderConfig, PatchEmbedder, build_embedder
from models.synthetic import SyntheticDefects
from models.training import TrainConfig, TrainHistory, ValidationData, train
from pipelines.datasets import ImageRecord


@dataclass(frozen=True)
class Recipe:
    """Every setting of one training run, with defaults that work on parts never seen before."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(offset=0.5))
    offset_candidates: tuple[float, ...] = (
        0.0,
        0.5,
        1.0,
    )  # patch mode: the scoring offset moves to one of these only when
    # held-out parts show it separates better with ``offset_confidence`` (see choose_offset); () keeps ``scoring.offset``
    offset_confidence: float = 0.95
    use_real_defects: bool = True
    defect_fraction: float = 0.5
    synthetic_fraction: float | None = None
    epoch_size: int = 384
    augment_strength: float = 1.0
    calibration_fraction: float = 0.2
    good_test_fraction: float = 0.2  # goods kept for test where the data has no test goods of its own (plain folders)
    good_test_split: Literal["hash", "latest"] = (
        "hash"  # "latest": those test goods are the last capture groups by name
    )
    defect_train_fraction: float = 0.5
    defect_val_fraction: float = 0.15
    target_false_reject_rate: float = 0.01
    calibration_rule: Literal["auto", "good_quantile", "target_frr", "best_f1"] = "auto"
    max_validation_references: int = 64
    max_validation_queries: int = 160
    max_bank_patches: int = 16384
    bank_selection: Literal["random", "coreset"] = "coreset"  # how max_bank_patches are picked from the goods' patches
    train_without_defect_photos: bool = (
        False  # no real defect photos: keep the pretrained patch features (see fit_embedder)
    )
    input_pixels: int | None = (
        81920  # input HxW follow the training goods' median aspect at about this many pixels (320x256 for
    )
    # 5:4 portrait parts); None keeps ``preprocess.height``/``width`` as given
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "preprocess": self.preprocess.to_dict(),
            "embedder": self.embedder.to_dict(),
            "train": self.train.to_dict(),
            "scoring": self.scoring.to_dict(),
            **{
                k: getattr(self, k)
                for k in self.__dataclass_fields__
                if k not in ("preprocess", "embedder", "train", "scoring")
            },
        }


def auto_input_size(
    sizes: Sequence[tuple[int, int]], pixels: int, *, multiple: int = 32, max_aspect: float = 2.0
) -> tuple[int, int]:
    """Input (height, width) with about ``pixels`` pixels and the median aspect of the images' (width, height).

    Parts photographed portrait stay portrait: letterboxing a 200x512 part into a square wastes most of the input
    on padding and shrinks its defects. Sides are multiples of ``multiple`` (the embedder's coarsest stride), and
    the aspect is capped at ``max_aspect`` so one odd dataset cannot ask for a sliver.
    """
    if not sizes:
        raise ValueError("no image sizes to choose an input size from")
    if pixels < multiple * multiple:
        raise ValueError(f"input_pixels {pixels} is below one {multiple}x{multiple} cell")
    aspect = float(np.median([h / w for w, h in sizes]))
    aspect = min(max(aspect, 1.0 / max_aspect), max_aspect)
    height = max(multiple, round(math.sqrt(pixels * aspect) / multiple) * multiple)
    width = max(multiple, round(math.sqrt(pixels / aspect) / multiple) * multiple)
    return height, width


def resolve_input_size(recipe: Recipe, sizes: Sequence[tuple[int, int]]) -> Recipe:
    """The recipe with its input size chosen from the training goods' sizes when ``input_pixels`` asks for it."""
    if recipe.input_pixels is None:
        return recipe
    height, width = auto_input_size(sizes, recipe.input_pixels)
    return replace(recipe, preprocess=replace(recipe.preprocess, height=height, width=width))


def resolve_bit_depth(recipe: Recipe, bits: Sequence[int]) -> Recipe:
    """The recipe with ``preprocess.bit_depth`` set to the images' camera depth when any is stored with more than 8
    bits (``bits``: each manifest entry's :func:`inspector.preprocess.significant_bits`) and the recipe leaves it
    open. Why from all the images, not each one: the line must scale every part by the same full range, so a
    brightness defect stays a brightness change."""
    deepest = max(bits, default=8)
    if recipe.preprocess.bit_depth is not None or deepest <= 8:
        return recipe
    return replace(recipe, preprocess=replace(recipe.preprocess, bit_depth=deepest))


def tiny_recipe(**overrides: Any) -> Recipe:
    """A small, fast recipe for tests and quick demos on CPU: the first stages of pretrained Lite0 at 128 px."""
    base = Recipe(
        preprocess=PreprocessConfig(height=128, width=128),
        embedder=EmbedderConfig(),
        train=TrainConfig(epochs=6, batch_size=16, lr=1e-3, progress=False),
        epoch_size=128,
        input_pixels=None,
    )
    return replace(base, **overrides)


@dataclass
class DataSplit:
    """Which image plays which role. Test defects are never used in training or validation."""

    train_good: list[Path]
    train_defective: list[ImageRecord]
    calibration_good: list[Path]
    validation_defective: list[Path]
    test: list[ImageRecord]
    groups: dict[str, str] = field(
        default_factory=dict
    )  # str(path) -> what it was split by (capture group or content):
    # photos of one physical part are not independent evidence, so choices made on held-out parts resample whole groups

    def group_ids(self, paths: Sequence[Path]) -> list[str]:
        """Each image's capture group; an image the split has no group for stands alone."""
        return [self.groups.get(str(p), f"image:{p}") for p in paths]

    def summary(self) -> dict[str, int]:
        return {
            "train_good": len(self.train_good),
            "train_defective": len(self.train_defective),
            "calibration_good": len(self.calibration_good),
            "validation_defective": len(self.validation_defective),
            "test_good": sum(r.is_good for r in self.test),
            "test_defective": sum(not r.is_good for r in self.test),
        }


def load_preprocessed(paths: Sequence[Path], preprocessor: Preprocessor) -> np.ndarray:
    """Eval-preprocess images (the line's own preprocessing) into one NCHW float32 array."""
    return preprocessor.normalize(load_resized(paths, preprocessor)[0])


def load_resized(paths: Sequence[Path], preprocessor: Preprocessor) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Each image decoded once as the line decodes it: the resized NxHxWx3 uint8 stack and each image's upright
    (width, height) (for the patch content mask and the part's placement)."""
    cfg = preprocessor.config
    images = [preprocessor.load(p) for p in paths]
    resized = (
        np.stack([preprocessor.resize(img) for img in images])
        if images
        else np.zeros((0, cfg.height, cfg.width, 3), np.uint8)
    )
    return resized, [img.size for img in images]


def validation_data(split: DataSplit, recipe: Recipe) -> ValidationData | None:
    """Validation for early stopping: calibration goods vs held-out defects (or synthetic ones made from goods)."""
    if not split.calibration_good:
        return None
    pre = Preprocessor(recipe.preprocess)
    rng = np.random.default_rng(recipe.seed)
    refs = list(split.train_good)
    if len(refs) > recipe.max_validation_references:
        refs = [refs[i] for i in sorted(rng.choice(len(refs), recipe.max_validation_references, replace=False))]
    half = recipe.max_validation_queries // 2
    good_resized, good_sizes = load_resized(split.calibration_good[:half], pre)
    if split.validation_defective:
        bad_resized, bad_sizes = load_resized(split.validation_defective[:half], pre)
    else:
        synth = SyntheticDefects()
        bad_resized = np.stack(
            [synth(img, np.random.default_rng([recipe.seed, 7, i]))[0] for i, img in enumerate(good_resized)]
        )
        bad_sizes = good_sizes
    labels = np.r_[np.zeros(len(good_resized)), np.ones(len(bad_resized))]
    ref_resized, ref_sizes = load_resized(refs, pre)
    return ValidationData(
        references=torch.from_numpy(pre.normalize(ref_resized)),
        queries=torch.from_numpy(np.concatenate([pre.normalize(good_resized), pre.normalize(bad_resized)])),
        labels=labels,
        scoring=recipe.scoring,
        query_sizes=good_sizes + bad_sizes,
        preprocess=recipe.preprocess,
        reference_sizes=ref_sizes,
    )


def fit_embedder(
    split: DataSplit, recipe: Recipe, checkpoint_dir: Path | None = None, *, resume: bool = False
) -> tuple[Embedder | PatchEmbedder, TrainHistory]:
    """Train the Siamese embedder on the split's training images (real defects + synthetic ones).

    Without any real defect photo (none to train on, none to validate with) the pretrained patch embedder is returned
    untrained unless ``train_without_defect_photos``: on real parts, training against synthetic defects alone *lowered*
    detection of real ones (magnetic tiles 0.852 → 0.768 image AUROC, benchmarks/README.md), and synthetic validation
    cannot tell. With defect photos, ``TrainConfig.keep_initial`` keeps the starting weights unless training beats them
    on the held-out real defects.
    """
    torch.manual_seed(recipe.seed)
    embedder = build_embedder(recipe.embedder)
    if (
        not split.train_defective
        and not split.validation_defective
        and not recipe.train_without_defect_photos
        and recipe.embedder.mode == "patch"
    ):
        reason = "no defect photos: pretrained patch features kept (set train_without_defect_photos to train on synthetic defects)"
        return embedder.cpu().eval(), TrainHistory(skipped=reason)
    common = dict(
        synthetic_fraction=recipe.synthetic_fraction,
        epoch_size=recipe.epoch_size,
        augment=default_augmentation(recipe.augment_strength) if recipe.augment_strength > 0 else None,
        synthetic=SyntheticDefects(),
        seed=recipe.seed,
    )
    defective = [r.path for r in split.train_defective]
    pre = Preprocessor(recipe.preprocess)
    if recipe.embedder.mode == "patch":
        dataset: Dataset = PatchPairDataset(
            split.train_good, defective, pre, defective_masks=[r.mask for r in split.train_defective], **common
        )
    else:
        dataset = LabelledImageDataset(
            split.train_good, defective, pre, defect_fraction=recipe.defect_fraction, **common
        )
    history = train(
        embedder,
        dataset,
        replace(recipe.train, seed=recipe.seed),
        validation=validation_data(split, recipe),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        extra_state={"embedder_config": recipe.embedder.to_dict(), "preprocess": recipe.preprocess.to_dict()},
    )
    return embedder.cpu().eval(), history


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
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    mask = patch_mask(embeddings, recipe.scoring, valid)
    if mask is not None:  # letterbox padding is never scored, so it takes no room in the bank
        flat = flat[mask.ravel()]
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
    return pick_offset(
        bank.worst_and_typical(good, scoring, good_valid),
        bank.worst_and_typical(defective, scoring, defective_valid),
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
    good: tuple[np.ndarray, np.ndarray],
    defective: tuple[np.ndarray, np.ndarray],
    scoring: ScoringConfig,
    candidates: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 400,
    seed: int = 0,
    good_groups: Sequence[str] | None = None,
    defective_groups: Sequence[str] | None = None,
) -> tuple[ScoringConfig, dict[str, Any]]:
    """:func:`choose_offset` on (worst, typical) patch distances already searched, so calibration can reuse them."""
    offsets = sorted({*(float(c) for c in candidates), scoring.offset})
    aurocs, wins = bootstrap_wins(
        {c: (offset_scores(*good, c), offset_scores(*defective, c)) for c in offsets},
        scoring.offset,
        resamples=resamples,
        seed=seed,
        good_groups=good_groups,
        defective_groups=defective_groups,
    )
    n_good, n_bad = len(good[0]), len(defective[0])
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
    embedder: Embedder | PatchEmbedder,
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
        refs = onnx.embed_all(split.train_good)
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
            cal, val = onnx.embed_all(split.calibration_good), onnx.embed_all(split.validation_defective)
            cal_emb, cal_valid, val_emb, val_valid = cal.embeddings, cal.valid, val.embeddings, val.valid
            bank = GoldenBank(references, chunk_size=scoring.chunk_size)
            choice: dict[str, Any] = {}
            if (
                len(val_emb) and patch_mode and recipe.offset_candidates
            ):  # one search of each set serves choice and calibration
                searched = (
                    bank.worst_and_typical(cal_emb, scoring, cal_valid),
                    bank.worst_and_typical(val_emb, scoring, val_valid),
                )
                scoring, choice = pick_offset(
                    *searched,
                    scoring,
                    recipe.offset_candidates,
                    confidence=recipe.offset_confidence,
                    seed=recipe.seed,
                    good_groups=split.group_ids(split.calibration_good),
                    defective_groups=split.group_ids(split.validation_defective),
                )
                cal_scores, val_scores = (offset_scores(*s, scoring.offset) for s in searched)
            else:
                cal_scores = anomaly_scores(cal_emb, bank, scoring, cal_valid)
                val_scores = anomaly_scores(val_emb, bank, scoring, val_valid) if len(val_emb) else None
            if descriptors is not None and cal.descriptors is not None and len(descriptors) >= 2 and len(cal_scores):
                density, fused_cal, fused_val = whole_part_scores(
                    descriptors,
                    tuple(embedder.descriptor_blocks),
                    ["initial"] * len(descriptors),  # type: ignore[union-attr]
                    cal.descriptors,
                    cal_scores,
                    val.descriptors,
                    val_scores,
                )
                keep, choice["whole_part_score"] = keep_whole_part(
                    (cal_scores, val_scores),
                    (fused_cal, fused_val),
                    confidence=recipe.offset_confidence,
                    seed=recipe.seed,
                    good_groups=split.group_ids(split.calibration_good),
                    defective_groups=split.group_ids(split.validation_defective),
                )
                choice["whole_part_score"]["references"] = len(descriptors)
                if keep:
                    cal_scores, val_scores = fused_cal, fused_val
                else:
                    density = None
            threshold = calibrate(
                cal_scores,
                val_scores,
                rule=recipe.calibration_rule,
                target_frr=recipe.target_false_reject_rate,
            )
            threshold.details.update(choice)
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


def whole_part_scores(
    descriptors: np.ndarray,
    blocks: tuple[int, ...],
    ids: Sequence[str],
    cal_descriptors: np.ndarray,
    cal_patch: np.ndarray,
    val_descriptors: np.ndarray | None,
    val_patch: np.ndarray | None,
) -> tuple[DensitySpec, np.ndarray, np.ndarray | None]:
    """The whole-part Gaussian of the golden parts (inspector.density), the scale of each score on the calibration
    goods, and the calibration and validation scores fused as the line will fuse them (for the threshold)."""
    gauss = GaussianDensity(descriptors, blocks)
    cal_density = gauss.distances(cal_descriptors)
    spec = DensitySpec(blocks, ScoreScale.of(cal_patch), ScoreScale.of(cal_density), tuple(ids))
    cal = fused_scores(cal_patch, cal_density, spec.patch_scale, spec.density_scale)
    val = None
    if val_patch is not None and val_descriptors is not None and len(val_patch):
        val = fused_scores(val_patch, gauss.distances(val_descriptors), spec.patch_scale, spec.density_scale)
    return spec, cal, val


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


@dataclass
class Evaluation:
    """Scores of the test images through the bundle and the metrics computed from them."""

    paths: list[str]
    defect_types: list[str]
    labels: np.ndarray
    scores: np.ndarray
    threshold: float
    errors: list[str] = field(default_factory=list)
    views: dict[str, np.ndarray] = field(default_factory=dict)  # with a whole-part score: each view's scores alone

    def metrics(self) -> dict[str, float]:
        m = {
            "image_auroc": roc_auc(self.labels, self.scores),
            "average_precision": average_precision(self.labels, self.scores),
        }
        m.update(rates_at_threshold(self.labels, self.scores, self.threshold))
        m.update(
            {f"image_auroc_{name}": roc_auc(self.labels, v) for name, v in self.views.items()}
        )  # what each view adds
        return m

    def per_type_auroc(self) -> dict[str, float]:
        """AUROC of each defect type against all good test images."""
        types = np.asarray(self.defect_types)
        good = self.labels == 0
        return {
            t: roc_auc(self.labels[good | (types == t)], self.scores[good | (types == t)])
            for t in sorted(set(types[~good]))
        }


def threshold_metrics(bundle: Path) -> dict[str, float]:
    """The threshold and what calibration expects of it, as run metrics: the false-reject rate realised on the
    calibration goods and its one-sided 95 % upper bound (the rate the line should expect, with its uncertainty)."""
    spec = load_bundle(bundle).spec
    threshold, details = spec.threshold, spec.threshold.details
    out = {"threshold": threshold.value, "scoring_offset": spec.scoring.offset}
    for key, name in (
        ("false_reject_rate", "calibration_false_reject_rate"),
        ("frr_upper_95", "calibration_frr_upper_95"),
        ("target_false_reject_rate", "calibration_target_false_reject_rate"),
        ("n_good", "calibration_n_good"),
    ):
        if isinstance(details.get(key), (int, float)):
            out[name] = float(details[key])
    return out


def pixel_level_auroc(bundle: Path, records: Sequence[ImageRecord], limit: int = 400) -> float | None:
    """Pixel AUROC of the bundle's heatmaps against the masks of ``records`` (goods count as all-normal), or None
    when no defective record has a mask or the bundle draws no maps: *where* on the part, not only whether. At
    most ``limit`` images (a second pass over them, with maps)."""
    from inspector.heatmap import score_with_maps
    from inspector.metrics import pixel_auroc
    from inspector.preprocess import open_mask

    chosen = [r for r in records if r.is_good or r.mask is not None][:limit]
    if all(r.is_good for r in chosen):
        return None
    inspector = Inspector.from_bundle(bundle)
    maps: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    for start in range(0, len(chosen), 32):
        batch = chosen[start : start + 32]
        for record, (_, amap, _) in zip(batch, score_with_maps(inspector, [r.path for r in batch])):
            if amap is not None:
                maps.append(amap)
                masks.append(None if record.is_good else np.asarray(open_mask(record.mask)) > 0)  # type: ignore[arg-type]
    value = pixel_auroc(maps, masks) if maps else float("nan")
    return value if math.isfinite(value) else None


def evaluate_bundle(bundle: Path, test: Sequence[ImageRecord]) -> Evaluation:
    """Score the test images through the line's code path (``Inspector``) and keep per-image results."""
    inspector = Inspector.from_bundle(bundle)
    results = inspector.score([r.path for r in test])
    kept = [(r, res) for r, res in zip(test, results) if res.error is None]
    return Evaluation(
        paths=[str(r.path) for r, _ in kept],
        defect_types=[r.defect_type for r, _ in kept],
        labels=np.array([r.label for r, _ in kept]),
        scores=np.array([res.score for _, res in kept], dtype=np.float64),
        threshold=inspector.threshold,
        errors=[res.error for res in results if res.error],  # type: ignore[misc]
        views={k: np.array([res.views[k] for _, res in kept]) for k in (kept[0][1].views or {})} if kept else {},  # type: ignore[index]
    )
