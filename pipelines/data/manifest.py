"""From found image files to a validated, de-duplicated manifest: what a training run was given, and its version.

Every image is read and decoded once here, with the line's own :func:`inspector.preprocess.load_image`, so a bad
file (unreadable, empty, truncated, not an image, absurdly large) is reported by path and left out instead of
crashing training hours later. Exact duplicates (same sha256) are kept once; the same content under conflicting
labels (good and defective, or two defect types) is rejected altogether, since no one knows which label is right.

The manifest's ``dataset_hash`` is a sha256 over the sorted ``(sha256, label, defect_type)`` of the kept images:
renaming or reordering files does not change it, changing one pixel does. A cached manifest is keyed by the files'
identity and by :func:`reading_code`, so a release that reads datasets differently never reuses an old one.

Pure functions, no Prefect or MLflow: flows wrap them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inspector.durable import replace_durably
from inspector.errors import ImageError
from inspector.preprocess import DEFAULT_MAX_PIXELS, load_image, open_mask, significant_bits
from pipelines.data.layouts import detect_layout, scan_dataset, scan_layout
from pipelines.data.records import LABEL_BY_MASK, GroupOf, ImageRecord, group_of_path

MANIFEST_SCHEMA = 1
DEFAULT_MAX_BYTES = 512 * 1024**2  # no single inspection photo is half a gigabyte


@dataclass(frozen=True)
class ManifestEntry:
    """One kept image: where it is, its content hash, its label and what we learned opening it."""

    path: str
    sha256: str
    label: int  # 0 good, 1 defective
    defect_type: str
    source_split: str  # "train" / "test" in the MVTec layout, "" for plain folders
    mask: str | None
    group: str  # capture group (session, part id) or "" when none is known
    width: int
    height: int
    split: str = ""  # role assigned by :func:`pipelines.data.split.with_splits` ("" before splitting)
    bits: int = 8  # camera bit depth of a high-bit single-channel image (inspector.preprocess.significant_bits)

    @property
    def is_good(self) -> bool:
        return self.label == 0

    def record(self) -> ImageRecord:
        return ImageRecord(
            Path(self.path), self.label, self.defect_type, self.source_split, Path(self.mask) if self.mask else None
        )


@dataclass(frozen=True)
class RejectedFile:
    """A file left out, and why. ``kind``: ``invalid`` (cannot be used as an image) or ``conflict`` (labels)."""

    path: str
    reason: str
    kind: str = "invalid"
    label: int | None = None
    defect_type: str = ""


@dataclass(frozen=True)
class DuplicateFile:
    """A file left out because its bytes equal a kept file's (the first by path order)."""

    path: str
    sha256: str
    duplicate_of: str


@dataclass
class Manifest:
    """What a training run was given: kept images, what was left out and why, and the dataset version hash."""

    entries: list[ManifestEntry]
    rejected: list[RejectedFile] = field(default_factory=list)
    duplicates: list[DuplicateFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dataset_hash: str = ""
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.dataset_hash:
            self.dataset_hash = dataset_hash(self.entries)

    def records(self) -> list[ImageRecord]:
        """The kept images as :class:`ImageRecord`."""
        return [e.record() for e in self.entries]

    def summary(self) -> dict[str, Any]:
        return {
            "images": len(self.entries),
            "good": sum(e.is_good for e in self.entries),
            "defective": sum(not e.is_good for e in self.entries),
            "rejected": len(self.rejected),
            "duplicates": len(self.duplicates),
            "dataset_hash": self.dataset_hash,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": MANIFEST_SCHEMA,
            "dataset_hash": self.dataset_hash,
            "summary": self.summary(),
            "source": self.source,
            "entries": [asdict(e) for e in self.entries],
            "rejected": [asdict(r) for r in self.rejected],
            "duplicates": [asdict(d) for d in self.duplicates],
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("schema_version") != MANIFEST_SCHEMA:
            raise ValueError(f"manifest schema {data.get('schema_version')!r} is not {MANIFEST_SCHEMA}")
        manifest = cls(
            entries=[ManifestEntry(**e) for e in data["entries"]],
            rejected=[RejectedFile(**r) for r in data.get("rejected", [])],
            duplicates=[DuplicateFile(**d) for d in data.get("duplicates", [])],
            warnings=list(data.get("warnings", [])),
            source=dict(data.get("source", {})),
        )
        if data.get("dataset_hash") and data["dataset_hash"] != manifest.dataset_hash:
            raise ValueError(
                f"manifest dataset_hash {data['dataset_hash']} does not match its entries ({manifest.dataset_hash})"
            )
        return manifest

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))


def dataset_hash(entries: Sequence[ManifestEntry]) -> str:
    """sha256 over the sorted ``(sha256, label, defect_type)`` of the entries: independent of paths and order."""
    rows = sorted((e.sha256, int(e.label), e.defect_type) for e in entries)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write the manifest as JSON atomically and durably (temp file in the same folder, fsync, rename, fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_manifest(path: str | Path) -> Manifest:
    return Manifest.from_json(Path(path).read_text(encoding="utf-8"))


def reading_code() -> bytes:
    """The source of every module of :mod:`pipelines.data`, in name order: what a manifest cache key must cover,
    since a release that reads layouts, masks, groups or splits differently must not be handed a manifest the old
    code built."""
    package = Path(__file__).parent
    return b"".join(path.read_bytes() for path in sorted(package.glob("*.py")))


def _read_one(path: Path, max_pixels: int, max_bytes: int) -> tuple[str, int, int, int]:
    """sha256, width, height and bit depth of one image file; raises :class:`ImageError` naming the file."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(str(path), f"cannot read file ({exc.strerror or exc})") from None
    if size > max_bytes:
        raise ImageError(str(path), f"file is {size} bytes, over the limit of {max_bytes} bytes")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(str(path), f"cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(str(path), "empty file (0 bytes)")
    image = load_image(data, max_pixels=max_pixels, name=str(path), bit_depth="keep")
    try:
        bits = significant_bits(image)
    except ValueError as exc:
        raise ImageError(str(path), str(exc)) from None
    return hashlib.sha256(data).hexdigest(), image.width, image.height, bits


def build_manifest(
    records: Sequence[ImageRecord],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    group_of: GroupOf | None = None,
    source: dict[str, Any] | None = None,
) -> Manifest:
    """Open and validate every image once, hash it, drop duplicates and label conflicts; never raises on a bad file.

    Records are taken in path order. A file that cannot be used goes to ``rejected`` with the reason. Files with
    equal bytes and equal (label, defect type) keep the first by path; the rest go to ``duplicates``. Equal bytes
    under different labels or defect types are all rejected as ``conflict``. ``group_of`` (a function of the path,
    or a mapping) gives each image its capture group, which the split (:mod:`pipelines.data.split`) keeps together.
    """
    ordered = sorted(records, key=lambda r: (str(r.path), r.label, r.defect_type))
    rejected: list[RejectedFile] = []
    warnings: list[str] = []
    valid: list[ManifestEntry] = []
    for r in ordered:
        try:
            sha, width, height, bits = _read_one(Path(r.path), max_pixels, max_bytes)
        except ImageError as exc:
            known = r.label != LABEL_BY_MASK
            rejected.append(
                RejectedFile(
                    str(r.path), exc.reason, "invalid", r.label if known else None, r.defect_type if known else ""
                )
            )
            continue
        mask = str(r.mask) if r.mask else None
        label, defect_type = int(r.label), r.defect_type
        if mask:
            try:
                mask_image = open_mask(mask, max_pixels=max_pixels)
            except ImageError as exc:
                if label == LABEL_BY_MASK:  # the mask is the only label this image has
                    rejected.append(
                        RejectedFile(
                            str(r.path),
                            f"its mask {mask} cannot be read ({exc.reason}): good or defective is unknown",
                            "invalid",
                            None,
                            "",
                        )
                    )
                    continue
                warnings.append(f"{r.path}: mask {mask} left out ({exc.reason})")
                mask = None
            else:
                if label == LABEL_BY_MASK:
                    label, defect_type = (0, "good") if mask_image.getbbox() is None else (1, defect_type)
                if label == 0:  # a good part's mask marks nothing: there is no defect to locate
                    mask = None
                elif mask_image.getbbox() is None:  # open_mask's image is the marked pixels: none marked
                    warnings.append(
                        f"{r.path}: mask {mask} left out (it marks no pixel: where the defect is stays unknown)"
                    )
                    mask = None
                elif abs(math.log((mask_image.width / mask_image.height) / (width / height))) > 0.02:
                    warnings.append(
                        f"{r.path}: mask {mask} left out (it is {mask_image.width}x{mask_image.height}, the image "
                        f"{width}x{height}: a different shape cannot be laid on it)"
                    )
                    mask = None
        valid.append(
            ManifestEntry(
                str(r.path),
                sha,
                label,
                defect_type,
                r.source_split,
                mask,
                group_of_path(group_of, Path(r.path)),
                width,
                height,
                bits=bits,
            )
        )

    by_sha: dict[str, list[ManifestEntry]] = {}
    for e in valid:
        by_sha.setdefault(e.sha256, []).append(e)
    entries: list[ManifestEntry] = []
    duplicates: list[DuplicateFile] = []
    for e in valid:
        same = by_sha[e.sha256]
        labels = sorted({(x.label, x.defect_type) for x in same})
        if len(labels) > 1:
            others = ", ".join(
                f"{x.path} ({'good' if x.is_good else 'defective: ' + x.defect_type})" for x in same if x is not e
            )
            rejected.append(
                RejectedFile(
                    e.path,
                    f"same content as {others}: conflicting labels, all copies left out",
                    "conflict",
                    e.label,
                    e.defect_type,
                )
            )
        elif same[0] is e:
            entries.append(e)
        else:
            duplicates.append(DuplicateFile(e.path, e.sha256, same[0].path))
    rejected.sort(key=lambda x: x.path)
    return Manifest(
        entries, rejected, duplicates, warnings, source=dict(source or {}, max_pixels=max_pixels, max_bytes=max_bytes)
    )


def ingest(
    root: str | Path | None = None,
    good: str | Path | None = None,
    defective: str | Path | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    group_of: GroupOf | None = None,
) -> Manifest:
    """Find the images (MVTec layout under ``root``, or ``good``/``defective`` folders) and build their manifest."""
    if root is None or good is not None or defective is not None:  # plain folders (scan_dataset refuses a mix)
        layout, records = "folders", scan_dataset(root=root, good=good, defective=defective)
    else:  # the layout found once, not again for the manifest's source
        layout = detect_layout(root)
        records = scan_layout(root, layout)
    source = {
        "layout": layout,
        "root": str(root) if root is not None else None,
        "good": str(good) if good is not None else None,
        "defective": str(defective) if defective is not None else None,
    }
    return build_manifest(records, max_pixels=max_pixels, max_bytes=max_bytes, group_of=group_of, source=source)
