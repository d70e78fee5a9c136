"""Which image plays which role in a training run, decided by content hash or capture group, never by file order.

Each image's role depends only on its key (its capture group, else its sha256) and the seed, so adding images
never moves old ones, and all images of one group with the same label land on the same side: photos of one part
are not independent evidence. The roles: train and calibration goods, train and validation defects, and test
(goods and defects the model never trained on). :func:`assign_splits` turns them into the :class:`DataSplit` the
training steps take.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.manifest import Manifest, ManifestEntry
from pipelines.data.records import GroupOf, ImageRecord, group_of_path


def hash_fraction(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) for a key: the basis of every split here."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(key: str, fractions: Sequence[tuple[str, float]], salt: str = "") -> str:
    """Deterministic split of one group key given ``[(name, fraction), …]`` summing to 1."""
    total = sum(f for _, f in fractions)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions sum to {total}, not 1")
    u = hash_fraction(key, salt)
    acc = 0.0
    for name, frac in fractions:
        acc += frac
        if u < acc:
            return name
    return fractions[-1][0]


@dataclass(frozen=True)
class SplitFractions:
    """How images are shared between roles; the same meaning as the fields of ``pipelines.recipe.Recipe``."""

    calibration_fraction: float = 0.2
    defect_train_fraction: float = 0.5
    defect_val_fraction: float = 0.15
    use_real_defects: bool = True
    seed: int = 0
    good_test_fraction: float = 0.2
    good_test_split: str = "hash"  # "latest": the test goods are the last capture groups (or files) in name order

    @classmethod
    def from_recipe(cls, recipe: Any) -> SplitFractions:
        return cls(**{k: getattr(recipe, k) for k in cls.__dataclass_fields__})


def _entry_group(entry: ManifestEntry, group_of: GroupOf | None) -> str:
    """The entry's capture group: from ``group_of`` when given at split time, else the one recorded at ingest."""
    return group_of_path(group_of, Path(entry.path)) if group_of is not None else entry.group


def split_key(entry: ManifestEntry, group_of: GroupOf | None = None) -> str:
    """What an image is split by: its capture group when it has one, else its content hash (never its name)."""
    group = _entry_group(entry, group_of)
    return f"group:{group}" if group else f"sha256:{entry.sha256}"


def _capture_order(entry: ManifestEntry, group_of: GroupOf | None) -> str:
    """What orders captures in time for ``good_test_split="latest"``: the capture group, else the file's path."""
    return _entry_group(entry, group_of) or entry.path


def natural_order(text: str) -> list[Any]:
    """Sort key in which ``g200`` comes before ``g1000`` and ``2026-11-02`` after ``2026-11-01``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def split_roles(
    manifest: Manifest, fractions: SplitFractions = SplitFractions(), group_of: GroupOf | None = None
) -> list[str]:
    """The role of each entry, in order: ``train`` / ``calibration`` (goods), ``train_defective`` / ``validation``
    (defects), or ``test``.

    Goods from an MVTec ``test`` folder are test. Other goods go to calibration with ``calibration_fraction``;
    defects to train / validation / test with the defect fractions (train and validation are empty without
    ``use_real_defects``). A dataset with no test goods of its own (plain folders, VisA without its split file) keeps
    ``good_test_fraction`` of its goods for test: without them the test AUROC and the false-reject rate on later
    goods cannot be measured. Each role depends only on the key and the seed, so adding images never moves old
    ones, and all images of one group with the same label share a role. ``good_test_split="latest"`` makes those
    test goods the last capture groups (or files) in natural name order — date folders, frame numbers — so the test
    asks whether a threshold set on earlier captures holds on later ones; new later captures then move the window.
    """
    cal = fractions.calibration_fraction
    good_test = (
        0.0 if any(e.is_good and e.source_split == "test" for e in manifest.entries) else fractions.good_test_fraction
    )
    if not 0.0 < cal + good_test < 1.0:
        raise ValueError(
            f"calibration_fraction {cal} and good_test_fraction {good_test} leave no good parts to train on"
        )
    good_roles = (
        [("calibration", cal), ("train", 1.0 - cal)]
        if not good_test
        else [("calibration", cal), ("test", good_test), ("train", 1.0 - cal - good_test)]
    )
    latest: set[str] = set()
    if good_test and fractions.good_test_split == "latest":
        order = sorted({_capture_order(e, group_of) for e in manifest.entries if e.is_good}, key=natural_order)
        latest = set(order[len(order) - math.ceil(good_test * len(order)) :])
        good_roles = [("calibration", cal / (1.0 - good_test)), ("train", 1.0 - cal / (1.0 - good_test))]
    elif fractions.good_test_split not in ("hash", "latest"):
        raise ValueError(f"good_test_split {fractions.good_test_split!r} is not 'hash' or 'latest'")
    d_train = fractions.defect_train_fraction if fractions.use_real_defects else 0.0
    d_val = fractions.defect_val_fraction if fractions.use_real_defects else 0.0
    salt = f"seed{fractions.seed}"
    roles: list[str] = []
    for e in manifest.entries:
        key = split_key(e, group_of)
        if e.is_good:
            if e.source_split == "test" or _capture_order(e, group_of) in latest:
                roles.append("test")
            else:
                roles.append(assign_split(key, good_roles, salt + ":good"))
        else:
            roles.append(
                assign_split(
                    key,
                    [("train_defective", d_train), ("validation", d_val), ("test", 1.0 - d_train - d_val)],
                    salt + ":defect",
                )
            )
    return roles


def with_splits(
    manifest: Manifest, fractions: SplitFractions = SplitFractions(), group_of: GroupOf | None = None
) -> Manifest:
    """A copy of the manifest with each entry's ``split`` filled in (what gets written as the run's artifact)."""
    roles = split_roles(manifest, fractions, group_of)
    return replace(manifest, entries=[replace(e, split=r) for e, r in zip(manifest.entries, roles)])


@dataclass
class DataSplit:
    """Which image plays which role. Test defects are never used in training or validation."""

    train_good: list[Path]
    train_defective: list[ImageRecord]
    calibration_good: list[Path]
    validation_defective: list[Path]
    test: list[ImageRecord]
    # str(path) -> what it was split by (capture group or content): photos of one physical part are not independent
    # evidence, so choices made on held-out parts resample whole groups
    groups: dict[str, str] = field(default_factory=dict)

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


def assign_splits(
    manifest: Manifest, fractions: SplitFractions = SplitFractions(), group_of: GroupOf | None = None
) -> DataSplit:
    """The content-keyed split as the :class:`DataSplit` the training steps take.

    Keyed by sha256 or capture group, never by file name or order.
    """
    train_good: list[Path] = []
    cal_good: list[Path] = []
    val_def: list[Path] = []
    train_def: list[ImageRecord] = []
    test: list[ImageRecord] = []
    groups: dict[str, str] = {}
    for e, role in zip(manifest.entries, split_roles(manifest, fractions, group_of)):
        groups[str(Path(e.path))] = split_key(e, group_of)
        if role == "train":
            train_good.append(Path(e.path))
        elif role == "calibration":
            cal_good.append(Path(e.path))
        elif role == "train_defective":
            train_def.append(e.record())
        elif role == "validation":
            val_def.append(Path(e.path))
        else:
            test.append(e.record())
    if len(train_good) < 2:
        raise ValueError(f"only {len(train_good)} good training images after the split: need at least 2")
    good_groups = len({groups[str(Path(e.path))] for e in manifest.entries if e.is_good})
    asked = (
        ("calibration", cal_good, fractions.calibration_fraction),
        ("test", [r for r in test if r.is_good], fractions.good_test_fraction),
    )
    missing = [role for role, got, fraction in asked if fraction > 0 and not got]
    if missing:  # few capture groups (say three date folders) can leave a role without a single group
        raise ValueError(
            f"the {sum(e.is_good for e in manifest.entries)} good images form {good_groups} capture group(s), and "
            f"none fell to {' or '.join(missing)}: calibration and test need goods the model never trained on "
            "(an empty calibration set would leave the line without a threshold). Give more good images, "
            "from more capture groups (folders, sessions) when they are grouped, or split without grouping them"
        )
    return DataSplit(train_good, train_def, cal_good, val_def, test, groups)


def grouped_folds(groups: Sequence[str], types: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Each item's fold: whole groups to one fold, each type's groups dealt largest first to the fold with the
    fewest items of that type (then the fewest items), so every type spreads evenly; ties broken by the seed.
    Photos of one physical part never sit on both sides of a fold (cross-validation and cross-fitted calibration)."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    if len(members) < k:
        raise ValueError(f"{k} folds need {k} capture groups; these images form only {len(members)}")
    kind = {g: Counter(types[i] for i in rows).most_common(1)[0][0] for g, rows in members.items()}
    order = sorted(members)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda g: (kind[g], -len(members[g])))  # stable: the shuffle orders equal groups
    per_type: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(k))
    total = np.zeros(k)
    fold = np.empty(len(groups), dtype=np.int64)
    for g in order:
        f = min(range(k), key=lambda j: (per_type[kind[g]][j], total[j], j))
        fold[members[g]] = f
        per_type[kind[g]][f] += len(members[g])
        total[f] += len(members[g])
    return fold
