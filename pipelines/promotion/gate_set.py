"""The gate set: frozen gate images (a manifest) that every challenger and champion is scored on.

Frozen by content: the same images give the same hash, the first gate pins it on the registered model, and a gate
whose images changed since is refused (``changed_gate_images``), so "at least as good" always compares like with
like.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.manifest import Manifest, ingest, read_manifest, write_manifest


@dataclass
class GateSet:
    """The frozen gate images (a manifest) and its identity."""

    manifest: Manifest
    path: Path

    @property
    def hash(self) -> str:
        return self.manifest.dataset_hash


def gate_set_from_folder(folder: Path, out: Path) -> GateSet:
    """Freeze a folder as a gate manifest: MVTec layout (its ``test`` images), ``good/`` + ``<defect>/`` folders, or
    any other layout ``pipelines train --data`` reads (VisA, images labelled by their masks)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: gate data folder not found")
    if (folder / "test").is_dir() or (folder / "train").is_dir():
        manifest = ingest(root=folder)
        test_only = [e for e in manifest.entries if e.source_split == "test"]
        if test_only:
            manifest = Manifest(
                test_only, manifest.rejected, manifest.duplicates, manifest.warnings, source=manifest.source
            )
    elif (folder / "good").is_dir():
        manifest = _good_and_defect_folders(folder)
    else:
        try:
            manifest = ingest(root=folder)  # VisA, or images labelled by their masks
        except FileNotFoundError:
            raise ValueError(
                f"{folder}: expected an MVTec layout (test/good, test/<defect>), good/ and <defect>/ folders, "
                "VisA's Data/Images/Normal|Anomaly, or images with masks beside them"
            ) from None
    if not manifest.entries:
        raise ValueError(f"{folder}: no readable images for the gate set")
    return GateSet(manifest, write_manifest(manifest, out))


def _good_and_defect_folders(folder: Path) -> Manifest:
    """``folder/good`` and every other sub-folder as a defect type (``scan_folders`` wants one defective root)."""
    from pipelines.data.layouts import scan_dataset
    from pipelines.data.manifest import build_manifest

    records = scan_dataset(good=folder / "good")
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "good"):
        for r in scan_dataset(good=sub):
            records.append(type(r)(r.path, 1, sub.name, r.source_split, r.mask))
    return build_manifest(records, source={"layout": "gate-folders", "root": str(folder)})


def load_gate_set(path: Path) -> GateSet:
    """Read a gate manifest (its own hash is checked against its entries by ``read_manifest``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gate manifest not found")
    try:
        manifest = read_manifest(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid gate manifest ({exc})") from None
    if not manifest.entries:
        raise ValueError(f"{path}: the gate manifest has no images")
    if not any(e.is_good for e in manifest.entries) or all(e.is_good for e in manifest.entries):
        raise ValueError(f"{path}: a gate set needs good and defective images (AUROC and both rates are measured)")
    return GateSet(manifest, path)


def changed_gate_images(gate: GateSet) -> list[str]:
    """Gate images whose bytes no longer match the manifest (or that are gone): the set is not frozen any more."""
    changed = []
    for entry in gate.manifest.entries:
        try:
            digest = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
        except OSError:
            changed.append(f"{entry.path} (missing)")
            continue
        if digest != entry.sha256:
            changed.append(f"{entry.path} (sha256 changed)")
    return changed
