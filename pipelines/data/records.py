"""What one image of a dataset is before it is opened, and the capture group it was photographed in.

A capture group (a physical part photographed several times, a session, a date folder) is what the split keeps
on one side: photos of one part are not independent evidence, so a test that shares groups with training lies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The label of an image whose mask decides it (KolektorSDD keeps an all-black mask beside every good part):
#: :func:`pipelines.data.manifest.build_manifest` reads the mask and makes it good (marks nothing) or defective.
LABEL_BY_MASK = -1


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: where it is, whether it is good, its defect type and its origin folder split."""

    path: Path
    label: int  # 0 good, 1 defective, LABEL_BY_MASK: defective if its mask marks any pixel (read at ingest)
    defect_type: str  # "good" for good images
    source_split: str  # "train" / "test" in the MVTec layout, "" for plain folders
    mask: Path | None = None  # ground-truth defect mask, when the dataset has one

    @property
    def is_good(self) -> bool:
        return self.label == 0


GroupKey = Callable[[Path], str]
#: Each image's capture group: a function of its path, or a mapping from path to group.
GroupOf = Callable[[Path], str] | Mapping[Path, str]


def group_of_path(group_of: GroupOf | None, path: Path) -> str:
    """The capture group ``group_of`` gives ``path``; ``""`` (no group) without one or for a path it does not know."""
    if group_of is None:
        return ""
    if isinstance(group_of, Mapping):
        return str(group_of.get(path, ""))
    return str(group_of(path))


def group_by_regex(pattern: str) -> GroupKey:
    """Group by the first capture group of ``pattern`` in the file name (e.g. a session or part id prefix)."""
    rx = re.compile(pattern)

    def key(path: Path) -> str:
        m = rx.search(path.name)
        return m.group(1) if m and m.groups() else path.name

    return key


def group_by_number_gaps(paths: Iterable[Path], pattern: str, gap: int) -> dict[Path, str]:
    """Group images whose sorted numeric ids (first capture group of ``pattern``) lie within ``gap`` of each other.

    For capture sequences where one physical part is photographed several times in consecutive frames.
    """
    rx = re.compile(pattern)
    numbered: list[tuple[int, Path]] = []
    groups: dict[Path, str] = {}
    for p in paths:
        m = rx.search(p.name)
        if m:
            numbered.append((int(m.group(1)), p))
        else:
            groups[p] = p.name
    numbered.sort()
    current, prev = None, None
    for n, p in numbered:
        if prev is None or n - prev > gap:
            current = f"g{n}"
        groups[p] = str(current)
        prev = n
    return groups


def capture_groups(
    records: Sequence[ImageRecord], pattern: str | None = None, gap: int = 0, *, by_folder: bool = False
) -> dict[Path, str] | None:
    """Each image's capture group, or None to split image by image: frame numbers within ``gap`` of each other
    (:func:`group_by_number_gaps`), the image's folder (``by_folder``: goods kept by date, shift or camera), or
    both (frames within a folder). A defect photo's folder named after its defect type is its type, not a capture
    group (a whole type on one side of the split would leave it untested or untrained): those are not grouped by
    folder, their own sub-folders (``bad/scratch/2026-11-30/``) are."""
    if not pattern and not by_folder:
        return None
    paths = [r.path for r in records]
    numbered = group_by_number_gaps(paths, pattern, gap) if pattern else {}
    base = Path(os.path.commonpath([str(p.parent) for p in paths])) if by_folder and paths else None

    def folder(record: ImageRecord) -> str:
        """Relative to the dataset, so the split survives moving the dataset elsewhere."""
        if base is None or (not record.is_good and record.path.parent.name == record.defect_type):
            return ""
        return record.path.parent.relative_to(base).as_posix()

    # "" (a type folder, no frame number): the image is its own group, split by its content like ungrouped images
    return {r.path: "/".join(part for part in (folder(r), numbered.get(r.path, "")) if part) for r in records}
