"""The bundle: everything the line needs to score parts, with nothing implicit, verified before use.

```
bundle/
  model.onnx        embedder: input NCHW float32, dynamic batch, output NxD (L2-normalised)
  references.npy    golden reference embeddings, float32 (R x D)
  descriptors.npy   optional: golden parts' whole-part descriptors, float32 (G x K), for the density score
  inspector.json    schema version, preprocessing, scoring, threshold + rule, provenance, sha256 of every file,
                    and the sha256 of its own content (``manifest_sha256``), so the threshold is verified too
```
A bundle is written to a temporary sibling directory and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inspector.density import DensitySpec
from inspector.durable import replace_durably
from inspector.errors import BundleError
from inspector.preprocess import PreprocessConfig
from inspector.scoring import ScoringConfig

#: 3: ``inspector.json`` carries the digest of its own content (``manifest_sha256``), so the threshold, preprocessing
#: and scoring settings are verified like the files; 2: the whole-part view (``density``, ``descriptors.npy``), the
#: on-part patch rule (``scoring.content_only``) and the camera bit depth (``preprocessing.bit_depth``) written
#: explicitly; 1: bundles written before them
SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)
#: the first schema whose manifest must carry a digest of its own content
DIGESTED_SCHEMA = 3
MANIFEST = "inspector.json"
#: the manifest key holding the sha256 of the manifest's canonical content (every other key)
MANIFEST_DIGEST = "manifest_sha256"
MODEL_FILE = "model.onnx"
REFERENCES_FILE = "references.npy"
DESCRIPTORS_FILE = "descriptors.npy"


@dataclass(frozen=True)
class Threshold:
    """The decision threshold and how it was chosen (rule name and its inputs), so it can be audited."""

    value: float
    rule: str = "manual"
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"value": float(self.value), "rule": self.rule, "details": self.details}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Threshold:
        return cls(
            value=float(data["value"]), rule=str(data.get("rule", "manual")), details=dict(data.get("details", {}))
        )


@dataclass(frozen=True)
class BundleSpec:
    """What goes into ``inspector.json`` besides the file hashes."""

    preprocessing: PreprocessConfig
    scoring: ScoringConfig
    threshold: Threshold
    model: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    reference_ids: list[str] = field(default_factory=list)
    density: DensitySpec | None = None  # the whole-part score (inspector.density); None: the patch score alone

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema_version": SCHEMA_VERSION,
            "model": {"input_name": "images", "output_name": "embeddings", "mode": "image", **self.model},
            "preprocessing": self.preprocessing.to_dict(),
            "scoring": self.scoring.to_dict(),
            "threshold": self.threshold.to_dict(),
            "provenance": self.provenance,
            "references": {"count": len(self.reference_ids), "ids": list(self.reference_ids)},
        }
        if self.density is not None:
            out["density"] = self.density.to_dict()
        return out


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    spec: BundleSpec
    references: np.ndarray
    manifest: dict[str, Any]
    descriptors: np.ndarray | None = None  # (G, K) golden parts' whole-part descriptors when ``spec.density`` is set

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def model_version(self) -> str:
        model = self.manifest.get("model", {})
        return f"{model.get('name', 'model')}:{model.get('version', 'unversioned')}"

    @property
    def mode(self) -> str:
        """``"image"`` (one embedding per image) or ``"patch"`` (P patch embeddings per image: heatmaps)."""
        mode = str(self.manifest.get("model", {}).get("mode", self.spec.model.get("mode", "image")))
        if mode not in ("image", "patch"):
            raise BundleError(f"{self.path / MANIFEST}: unknown model mode {mode!r} (expected 'image' or 'patch')")
        return mode


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The sha256 of a manifest's content in canonical JSON (sorted keys, no whitespace), its own digest left out.

    Why the content and not the file's bytes: the digest must survive a re-indent or a copy through a store that
    rewrites JSON, and must change when any value (the threshold first) changes."""
    content = json.loads(json.dumps({k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}))  # as read back
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _check_manifest_digest(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest edited after it was written (schema 3 on): the threshold raised tenfold, say."""
    if manifest.get("schema_version", 0) < DIGESTED_SCHEMA:
        return
    recorded = manifest.get(MANIFEST_DIGEST)
    if not isinstance(recorded, str):
        raise BundleError(f"{manifest_path}: no {MANIFEST_DIGEST} recorded (schema {manifest['schema_version']})")
    actual = manifest_digest(manifest)
    if actual != recorded:
        raise BundleError(
            f"{manifest_path}: content sha256 {actual[:12]}… does not match its recorded {MANIFEST_DIGEST} "
            f"({recorded[:12]}…): threshold or settings edited, or the file is corrupt"
        )


def _check_descriptors(where: Path, descriptors: np.ndarray | None, density: DensitySpec | None) -> None:
    if (descriptors is None) != (density is None):
        raise BundleError(
            f"{where}: descriptors and the density spec come together "
            f"(got {'descriptors' if density is None else 'a density spec'} alone)"
        )
    if descriptors is None or density is None:
        return
    if descriptors.ndim != 2 or len(descriptors) < 2 or descriptors.shape[1] != sum(density.blocks):
        raise BundleError(
            f"{where}: descriptors must be (G >= 2, {sum(density.blocks)}), got shape {descriptors.shape}"
        )
    if density.ids and len(density.ids) != len(descriptors):
        raise BundleError(f"{where}: {len(density.ids)} descriptor ids for {len(descriptors)} descriptors")


def write_bundle(
    out: str | Path,
    model: str | Path | bytes,
    references: np.ndarray,
    spec: BundleSpec,
    *,
    overwrite: bool = False,
    descriptors: np.ndarray | None = None,
) -> Path:
    """Write a bundle atomically: everything goes to a temp dir beside ``out``, which is then renamed into place."""
    out = Path(out)
    refs = np.ascontiguousarray(np.asarray(references, dtype=np.float32))
    if refs.ndim != 2 or len(refs) == 0:
        raise BundleError(f"{out}: references must be a non-empty 2-D array, got shape {refs.shape}")
    descs = None if descriptors is None else np.ascontiguousarray(np.asarray(descriptors, dtype=np.float32))
    _check_descriptors(out, descs, spec.density)
    if spec.reference_ids and len(spec.reference_ids) != len(refs):
        raise BundleError(f"{out}: {len(spec.reference_ids)} reference ids for {len(refs)} references")
    if out.exists() and not overwrite:
        raise BundleError(f"{out}: already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if isinstance(model, bytes):
            (tmp / MODEL_FILE).write_bytes(model)
        else:
            shutil.copyfile(model, tmp / MODEL_FILE)
        np.save(tmp / REFERENCES_FILE, refs, allow_pickle=False)
        names = [MODEL_FILE, REFERENCES_FILE]
        if descs is not None:
            np.save(tmp / DESCRIPTORS_FILE, descs, allow_pickle=False)
            names.append(DESCRIPTORS_FILE)
        manifest = spec.to_dict()
        manifest["model"].setdefault("embedding_dim", int(refs.shape[1]))
        manifest["provenance"] = {
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest["provenance"],
        }
        manifest["files"] = {name: sha256_file(tmp / name) for name in names}
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
            out.rename(old)
            replace_durably(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            replace_durably(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse ``inspector.json`` and check the schema version, naming the file on any problem."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing (not a bundle?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: not a bundle manifest (a JSON object)")
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMAS:
        readable = ", ".join(map(str, READABLE_SCHEMAS))
        raise BundleError(f"{manifest_path}: unknown schema_version {version!r} (this inspector reads {readable})")
    _check_manifest_digest(manifest_path, manifest)
    return upgraded_manifest(manifest)


def upgraded_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest read as version 2: what version 1 left implicit is made explicit as it behaved (its
    patches were scored with the letterbox padding, ``content_only`` false), so an old bundle scores as it did."""
    if manifest.get("schema_version") != 1:
        return manifest
    out = dict(manifest)
    out["scoring"] = {"content_only": False, **manifest.get("scoring", {})}
    return out


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle: schema known, ``inspector.json`` matching its own digest (schema 3 on), every file
    present and matching its sha256."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest.get("files") or {}
    for name in (MODEL_FILE, REFERENCES_FILE, *([DESCRIPTORS_FILE] if "density" in manifest else [])):
        if name not in files:
            raise BundleError(f"{path / MANIFEST}: no sha256 recorded for {name}")
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"{file_path}: missing from the bundle")
        actual = sha256_file(file_path)
        if actual != files[name]:
            raise BundleError(
                f"{file_path}: sha256 {actual[:12]}… does not match the manifest ({files[name][:12]}…): "
                "file changed or corrupt"
            )
    try:
        references = np.load(path / REFERENCES_FILE, allow_pickle=False)
    except ValueError as exc:
        raise BundleError(f"{path / REFERENCES_FILE}: unreadable ({exc})") from None
    if references.ndim != 2:
        raise BundleError(f"{path / REFERENCES_FILE}: expected a 2-D array, got shape {references.shape}")
    try:
        spec = BundleSpec(
            preprocessing=PreprocessConfig.from_dict(manifest["preprocessing"]),
            scoring=ScoringConfig.from_dict(manifest["scoring"]),
            threshold=Threshold.from_dict(manifest["threshold"]),
            model={k: v for k, v in manifest.get("model", {}).items()},
            provenance=dict(manifest.get("provenance", {})),
            reference_ids=list(manifest.get("references", {}).get("ids", [])),
            density=DensitySpec.from_dict(manifest["density"]) if "density" in manifest else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path / MANIFEST}: invalid field ({exc})") from None
    descriptors = None
    if spec.density is not None:
        try:
            descriptors = np.load(path / DESCRIPTORS_FILE, allow_pickle=False).astype(np.float32, copy=False)
        except ValueError as exc:
            raise BundleError(f"{path / DESCRIPTORS_FILE}: unreadable ({exc})") from None
        _check_descriptors(path / DESCRIPTORS_FILE, descriptors, spec.density)
    return Bundle(
        path=path,
        spec=spec,
        references=references.astype(np.float32, copy=False),
        manifest=manifest,
        descriptors=descriptors,
    )


def derived_provenance(parent: Bundle, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Provenance for a bundle derived from ``parent`` (new references, quantised model…): the parent's own
    provenance (run id, dataset hash…) minus ``drop`` and ``created_at``, plus where it came from and a revision."""
    prov = {k: v for k, v in parent.spec.provenance.items() if k not in ("created_at", *drop)}
    prov["parent_bundle"] = {
        "path": str(parent.path.resolve()),
        "manifest_sha256": sha256_file(parent.path / MANIFEST),
        "model_sha256": parent.manifest.get("files", {}).get(MODEL_FILE),
        "model": parent.model_version,
        "created_at": parent.spec.provenance.get("created_at"),
        "references": int(parent.references.shape[0]),
        "threshold": parent.spec.threshold.value,
    }
    prov["revision"] = int(parent.spec.provenance.get("revision", 0)) + 1
    return prov
