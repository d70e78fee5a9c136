"""The recipe: every setting of one training run, with defaults that work on parts never seen before.

What is trained (preprocessing, embedder, training, scoring, split and calibration settings) as one typed object
that the CLI, the flows, the benchmarks and MLflow share; and the two settings read off the data (input size from
the goods' aspect, camera bit depth)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from inspector.preprocess import PreprocessConfig, auto_input_size
from inspector.scoring import ScoringConfig
from models.backbones import (
    PATCH_READING,
    has_pretrained_weights,
    input_multiple,
    pretrained_preprocessing,
    required_input_multiple,
)
from models.siamese import EmbedderConfig
from models.training import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """Every setting of one training run, with defaults that work on parts never seen before."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(offset=0.5))
    # patch mode: the scoring offset moves to one of these only when held-out parts show it separates better with
    # ``offset_confidence`` (see choose_offset); () keeps ``scoring.offset``
    offset_candidates: tuple[float, ...] = (0.0, 0.5, 1.0)
    offset_confidence: float = 0.95
    use_real_defects: bool = True
    defect_fraction: float = 0.5
    synthetic_fraction: float | None = None
    epoch_size: int = 384
    augment_strength: float = 1.0
    calibration_fraction: float = 0.2
    good_test_fraction: float = 0.2  # goods kept for test where the data has no test goods of its own (plain folders)
    good_test_split: Literal["hash", "latest"] = "hash"  # "latest": those test goods are the last capture groups
    defect_train_fraction: float = 0.5
    defect_val_fraction: float = 0.15
    target_false_reject_rate: float = 0.01
    calibration_rule: Literal["auto", "good_quantile", "target_frr", "best_f1"] = "auto"
    # what the target promises (inspector.calibration): "expected" — a new good is flagged at most at the target on
    # average; "bound" — the 95 % upper bound is within it; "point" — at most target · n calibration goods flagged
    threshold_promise: Literal["point", "expected", "bound"] = "expected"
    # >= 2: every good outside the test split is scored against a bank built without its capture-group fold, the
    # threshold rests on all of them and the shipped bank holds them all (pipelines.golden); 0: the held-out slice
    calibration_folds: int = 5
    # the line model (pipelines.line_model): "auto" ships a static INT8 copy, bundled on its own scores, where its
    # drift from FP32 on the test parts is within both tolerances below, else FP32; "fp32" / "int8" force one
    line_precision: Literal["auto", "fp32", "int8"] = "auto"
    int8_max_auroc_loss: float = 0.005  # image AUROC INT8 may lose against FP32
    int8_max_flip_rate: float = 0.02  # share of test parts whose verdict INT8 may change
    max_validation_references: int = 64
    max_validation_queries: int = 160
    max_bank_patches: int = 16384
    bank_selection: Literal["random", "coreset"] = "coreset"  # how max_bank_patches are picked from the goods' patches
    train_without_defect_photos: bool = False  # no real defect photos: keep the pretrained patch features
    # input HxW follow the training goods' median aspect at about this many pixels (320x256 for 5:4 portrait parts);
    # None keeps ``preprocess.height``/``width`` as given
    input_pixels: int | None = 81920
    seed: int = 0

    def __post_init__(self) -> None:
        if self.line_precision not in ("auto", "fp32", "int8"):
            raise ValueError(f"line_precision must be 'auto', 'fp32' or 'int8', got {self.line_precision!r}")
        multiple = size_multiple(self.embedder, required=True)
        height, width = self.preprocess.height, self.preprocess.width
        if height % multiple or width % multiple:
            raise ValueError(
                f"input {height}x{width} does not fit {self.embedder.backbone}: its sides must be multiples of "
                f"{multiple} (its patch size, times each density_downscales factor); e.g. "
                f"{round(height / multiple) * multiple or multiple}x{round(width / multiple) * multiple or multiple}"
            )

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


def size_multiple(embedder: EmbedderConfig, *, required: bool = False) -> int:
    """What the input's sides are multiples of for this embedder: its trunk's (:func:`models.backbones.input_multiple`;
    ``required``: only what it cannot run without, a vision transformer's patch), times each ``density_downscales``
    factor where the trunk needs whole patches (the downscaled pass sees the input shrunk k times)."""
    patch = required_input_multiple(embedder.backbone)
    base = patch if required else input_multiple(embedder.backbone)
    return base * math.lcm(*embedder.density_downscales) if patch > 1 and embedder.density_downscales else base


def trunk_overrides(backbone: str, mode: str = "patch") -> dict[str, Any]:
    """The recipe values that go with a trunk, as dotted overrides: the normalisation and resize its pretrained
    weights expect and, for a patch embedder on a trunk that has one, its patch reading (feature stages, a head as
    wide as them: ``models.backbones.PATCH_READING``). Why: picking a trunk must not leave the last trunk's mean or
    stages behind; any of these set beside the trunk wins (``pipelines.settings.apply_overrides``)."""
    out: dict[str, Any] = {}
    if has_pretrained_weights(backbone):
        out.update({f"preprocess.{k}": v for k, v in pretrained_preprocessing(backbone).items()})
    if mode == "patch":
        out.update({f"embedder.{k}": v for k, v in PATCH_READING.get(backbone, {}).items()})
    return out


def resolve_input_size(recipe: Recipe, sizes: Sequence[tuple[int, int]]) -> Recipe:
    """The recipe with its input size chosen from the training goods' sizes when ``input_pixels`` asks for it, in
    multiples of what the trunk needs (14 for a DINOv2 patch grid)."""
    if recipe.input_pixels is None:
        return recipe
    height, width = auto_input_size(sizes, recipe.input_pixels, multiple=size_multiple(recipe.embedder))
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
