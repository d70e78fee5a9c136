"""Golden references without retraining: add new good parts to a bundle's bank, remove some, re-calibrate.

Every operation reads a verified bundle and writes a NEW bundle with :func:`inspector.bundle.write_bundle`
(atomic: temp dir, then rename); the input bundle is never touched. New references are embedded with the
bundle's own model through :class:`inspector.engine.OnnxEmbedder`, i.e. the line's one preprocessing.

Which rows of ``references.npy`` came from which image is kept in the manifest, under
``provenance.reference_sources``: a list of ``{"id", "rows": [start, stop], "sha256"}`` entries covering the bank
in order (``sha256`` of the image file, when known). In *image* mode each source is one row and
``references.ids`` keeps one id per row as before; in *patch* mode a source is the P patch rows of one image (or
the whole bank the bundle was trained with, id ``"initial"``, which a coreset may have reduced).

Bad input never ships a half-updated bank: an unreadable image, an id or content already in the bank, an unknown
id to remove, or re-calibration images that are themselves in the bank each stop the operation with an error that
names them, and nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from inspector.bundle import MANIFEST, Bundle, Threshold, load_bundle, sha256_file, write_bundle
from inspector.bundle import derived_provenance as bundle_lineage
from inspector.calibration import CalibrationError, calibrate
from inspector.density import DensitySpec
from inspector.engine import Embedded, OnnxEmbedder
from inspector.errors import BundleError, InspectorError
from inspector.scorer import Scorer
from inspector.scoring import patch_mask

INITIAL_SOURCE = "initial"
SOURCES_KEY = "reference_sources"


class ReferencesError(InspectorError):
    """Adding or removing references (or re-calibrating) was refused; nothing was written."""


# --------------------------------------------------------------------------------------------------- pure parts


def sources_from_ids(ids: Sequence[str]) -> list[dict[str, Any]]:
    """Run-length encode per-row ids into sources (consecutive equal ids are one source)."""
    sources: list[dict[str, Any]] = []
    for row, ref_id in enumerate(ids):
        if sources and sources[-1]["id"] == ref_id and sources[-1]["rows"][1] == row:
            sources[-1]["rows"][1] = row + 1
        else:
            sources.append({"id": str(ref_id), "rows": [row, row + 1]})
    return sources


def check_sources(
    sources: Sequence[dict[str, Any]], n_rows: int, where: str = "reference_sources"
) -> list[dict[str, Any]]:
    """Validate that sources tile rows ``[0, n_rows)`` in order; return a clean copy."""
    clean: list[dict[str, Any]] = []
    expected = 0
    for i, src in enumerate(sources):
        try:
            start, stop = (int(v) for v in src["rows"])
            entry = {"id": str(src["id"]), "rows": [start, stop]}
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: entry {i} is malformed ({exc!r})") from None
        if start != expected or stop <= start:
            raise BundleError(
                f"{where}: entry {i} ({entry['id']!r}) covers rows {start}:{stop}, expected to start at {expected}"
            )
        if src.get("sha256"):
            entry["sha256"] = str(src["sha256"])
        clean.append(entry)
        expected = stop
    if expected != n_rows:
        raise BundleError(f"{where}: sources cover {expected} rows but the bank has {n_rows}")
    return clean


def reference_sources(bundle: Bundle) -> list[dict[str, Any]]:
    """Where each row of the bank came from: the recorded sources, else per-row ids, else one ``initial`` source."""
    n = int(bundle.references.shape[0])
    recorded = bundle.spec.provenance.get(SOURCES_KEY)
    if recorded:
        return check_sources(recorded, n, f"{bundle.path / MANIFEST}: provenance.{SOURCES_KEY}")
    if bundle.spec.reference_ids and len(bundle.spec.reference_ids) == n:
        return sources_from_ids(bundle.spec.reference_ids)
    return [{"id": INITIAL_SOURCE, "rows": [0, n]}]


def row_ids(sources: Sequence[dict[str, Any]]) -> list[str]:
    """One id per bank row (the inverse of :func:`sources_from_ids`)."""
    out: list[str] = []
    for src in sources:
        start, stop = src["rows"]
        out += [src["id"]] * (stop - start)
    return out


def flatten_embeddings(
    embeddings: np.ndarray, mode: str, dim: int, on_part: np.ndarray | None = None
) -> tuple[np.ndarray, list[int]]:
    """Model output → bank rows: (N, D) stays, (N, P, D) becomes its patches, only those on the part where
    ``on_part`` (N, P) is given (letterbox padding is never scored, so it is not stored). Returns the rows and
    each image's row count."""
    emb = np.asarray(embeddings, dtype=np.float32)
    want = 2 if mode == "image" else 3
    if emb.ndim != want:
        raise BundleError(f"the bundle is in {mode} mode but its model outputs embeddings of shape {emb.shape}")
    if emb.shape[-1] != dim:
        raise BundleError(f"the model outputs {emb.shape[-1]}-d embeddings but the bank is {dim}-d")
    if mode == "image":
        return emb, [1] * len(emb)
    if on_part is None:
        return emb.reshape(-1, emb.shape[-1]), [int(emb.shape[1])] * len(emb)
    return emb[on_part], [int(n) for n in on_part.sum(axis=1)]


def default_ids(paths: Sequence[Path], shas: Sequence[str]) -> list[str]:
    """The file name, or ``name@sha8`` where two new images share a name."""
    names = [p.name for p in paths]
    return [n if names.count(n) == 1 else f"{n}@{s[:8]}" for n, s in zip(names, shas)]


def append_references(
    bank: np.ndarray,
    sources: Sequence[dict[str, Any]],
    new_rows: np.ndarray,
    counts: Sequence[int],
    ids: Sequence[str],
    shas: Sequence[str | None],
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Append ``len(ids)`` images' rows (``counts[i]`` rows for image i, in order) to the bank and the source list."""
    if len(counts) != len(ids) or len(new_rows) != sum(counts):
        raise ValueError(f"{len(new_rows)} rows for {len(ids)} images of {list(counts)} rows")
    out_sources = [dict(s, rows=list(s["rows"])) for s in sources]
    start = int(bank.shape[0])
    for ref_id, sha, n in zip(ids, shas, counts):
        entry: dict[str, Any] = {"id": ref_id, "rows": [start, start + n]}
        if sha:
            entry["sha256"] = sha
        out_sources.append(entry)
        start += n
    return np.concatenate([np.asarray(bank, dtype=np.float32), np.asarray(new_rows, dtype=np.float32)]), out_sources


def drop_references(
    bank: np.ndarray, sources: Sequence[dict[str, Any]], ids: Iterable[str]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Remove every source with one of ``ids``; rows are re-indexed. Unknown ids or removing everything is an error."""
    ids = list(dict.fromkeys(ids))
    known = {s["id"] for s in sources}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ReferencesError(
            f"unknown reference id(s): {', '.join(map(repr, unknown))} (the bank has {len(known)} ids)"
        )
    drop = set(ids)
    kept = [s for s in sources if s["id"] not in drop]
    if not kept:
        raise ReferencesError("refusing to remove every reference: the bank would be empty")
    keep_rows = np.concatenate([np.arange(*s["rows"]) for s in kept])
    out_sources: list[dict[str, Any]] = []
    start = 0
    for s in kept:
        n = s["rows"][1] - s["rows"][0]
        out_sources.append(dict(s, rows=[start, start + n]))
        start += n
    return np.asarray(bank, dtype=np.float32)[keep_rows], out_sources


def recalibrated_threshold(
    good_scores: np.ndarray,
    defective_scores: np.ndarray | None,
    target_frr: float,
    inputs: dict[str, Any],
    promise: str = "expected",
) -> Threshold:
    """The calibration front end (:func:`inspector.calibration.calibrate`, rule ``auto``, the target's ``promise``)
    on the re-calibration images' scores, with what they were (``inputs``) recorded beside the rule's own report."""
    try:
        threshold = calibrate(good_scores, defective_scores, rule="auto", target_frr=target_frr, promise=promise)
    except CalibrationError as exc:
        raise ReferencesError(f"re-calibration: {exc}") from None
    threshold.details.update(inputs)
    return threshold


def derived_provenance(parent: Bundle, change: dict[str, Any], sources: list[dict[str, Any]]) -> dict[str, Any]:
    """The parent's lineage (see :func:`inspector.bundle.derived_provenance`) plus what changed in the bank."""
    prov = bundle_lineage(parent, drop=(SOURCES_KEY, "reference_change"))
    prov["reference_change"] = change
    prov[SOURCES_KEY] = sources
    return prov


# --------------------------------------------------------------------------------------------------- orchestration


def read_and_embed(embedder: OnnxEmbedder, paths: Sequence[Path]) -> tuple[Embedded, list[str], list[str | None]]:
    """What the model made of the readable images (in order: embeddings, patches on the part, whole-part
    descriptors), every file's sha256 ('' if unreadable) and per-file errors."""
    shas: list[str] = []
    pre_errors: list[str | None] = []
    for p in paths:
        try:
            shas.append(sha256_file(p))
            pre_errors.append(None)
        except OSError as exc:
            shas.append("")
            pre_errors.append(f"{p}: {exc.strerror or exc}")
    readable = [p for p, e in zip(paths, pre_errors) if e is None]
    embedded = embedder.embed(readable) if readable else Embedded(np.zeros((0,), np.float32), None, None, [])
    it = iter(embedded.errors)
    errors = [e if e is not None else next(it) for e in pre_errors]
    return embedded, shas, errors


def refuse(what: str, problems: list[str]) -> None:
    raise ReferencesError(f"{what}; nothing was written:\n  " + "\n  ".join(problems))


def check_new_bundle_path(bundle_path: Path, out_path: Path) -> None:
    if out_path.resolve() == bundle_path.resolve():
        raise ReferencesError(f"{out_path}: the output must be a new bundle, not the input bundle")
    if out_path.exists():
        raise ReferencesError(f"{out_path}: already exists (choose a new bundle path)")


def add_references(
    bundle_path: str | Path,
    images: Sequence[str | Path],
    out_path: str | Path,
    *,
    recalibrate_good: Sequence[str | Path] = (),
    recalibrate_defective: Sequence[str | Path] = (),
    target_false_reject_rate: float = 0.01,
    promise: str = "expected",
    skip_bad: bool = False,
    ids: Sequence[str] | None = None,
    threads: int | None = None,
) -> Path:
    """Embed new good images with the bundle's model, append them to its bank and write a new bundle at ``out_path``.

    Unreadable images, images already in the bank (same file sha256) or given twice are errors that name each file
    and write nothing, unless ``skip_bad`` (then they are skipped and listed in ``provenance.reference_change``).
    With ``recalibrate_good`` the threshold is set on those goods' scores against the NEW bank to keep ``promise``
    for ``target_false_reject_rate`` (:mod:`inspector.calibration`); with ``recalibrate_defective`` too, recall at
    that threshold is reported. The re-calibration images must not be in the bank. Without them the parent's
    threshold is kept.
    """
    bundle_path, out_path = Path(bundle_path), Path(out_path)
    paths = [Path(p) for p in images]
    good_paths = [Path(p) for p in recalibrate_good]
    bad_paths = [Path(p) for p in recalibrate_defective]
    if not paths:
        raise ReferencesError("no images to add")
    if ids is not None and len(ids) != len(paths):
        raise ReferencesError(f"{len(ids)} ids for {len(paths)} images")
    if bad_paths and not good_paths:
        raise ReferencesError("re-calibration with defective images also needs good images (--recalibrate-good)")
    check_new_bundle_path(bundle_path, out_path)
    parent = load_bundle(bundle_path)
    mode = parent.mode
    sources = reference_sources(parent)
    embedder = OnnxEmbedder(parent.model_path, parent.spec.preprocessing, threads=threads)

    embedded, shas, errors = read_and_embed(embedder, paths)
    emb, on_part = embedded.embeddings, embedded.valid
    new_ids = list(ids) if ids is not None else default_ids(paths, shas)
    existing_ids = {s["id"] for s in sources}
    existing_sha = {s["sha256"]: s["id"] for s in sources if s.get("sha256")}
    problems: list[str] = []  # always fatal
    skippable: list[tuple[int, str]] = []  # fatal unless skip_bad
    seen_sha: dict[str, Path] = {}
    seen_ids: set[str] = set()
    for i, (p, sha, err, ref_id) in enumerate(zip(paths, shas, errors, new_ids)):
        if err is not None:
            skippable.append((i, err))
        elif sha in existing_sha:
            skippable.append((i, f"{p}: already in the bank as reference {existing_sha[sha]!r}"))
        elif sha in seen_sha:
            skippable.append((i, f"{p}: same content as {seen_sha[sha]}"))
        else:
            seen_sha[sha] = p
            if ref_id in existing_ids or ref_id in seen_ids:
                problems.append(f"{p}: reference id {ref_id!r} is already in use")
            seen_ids.add(ref_id)
    if skippable and not skip_bad:
        problems = [msg for _, msg in skippable] + problems
    if problems:
        refuse(f"cannot add references to {bundle_path}", problems)
    skip = {i for i, _ in skippable}
    keep = [i for i in range(len(paths)) if i not in skip]
    if not keep:
        refuse(f"no usable images to add to {bundle_path}", [msg for _, msg in skippable])
    readable_index = [i for i, e in enumerate(errors) if e is None]
    kept_rows = [readable_index.index(i) for i in keep]
    emb_keep = emb[kept_rows]
    mask = patch_mask(emb_keep, parent.spec.scoring, on_part[kept_rows] if on_part is not None else None)
    rows, per_image = flatten_embeddings(emb_keep, mode, int(parent.references.shape[1]), mask)
    bank, new_sources = append_references(
        parent.references, sources, rows, per_image, [new_ids[i] for i in keep], [shas[i] for i in keep]
    )
    descriptors, density = parent.descriptors, parent.spec.density
    if density is not None and descriptors is not None:
        if embedded.descriptors is None:
            raise ReferencesError(f"{bundle_path}: the model did not describe the new parts")
        descriptors = np.concatenate([descriptors, embedded.descriptors[kept_rows]])
        density = replace(density, ids=(*_descriptor_ids(parent), *(new_ids[i] for i in keep)))

    threshold = parent.spec.threshold
    if good_paths:
        threshold, density = recalibrate_on_goods(
            embedder,
            parent,
            bank,
            new_sources,
            good_paths,
            bad_paths,
            target_false_reject_rate,
            descriptors,
            density,
            promise,
        )

    change = {
        "action": "add",
        "added": [
            {"id": new_ids[i], "file": str(paths[i]), "sha256": shas[i], "rows": n} for i, n in zip(keep, per_image)
        ],
        "skipped": [msg for _, msg in skippable],
        "threshold_before": parent.spec.threshold.to_dict(),
        "recalibrated": bool(good_paths),
    }
    spec = replace(
        parent.spec,
        threshold=threshold,
        provenance=derived_provenance(parent, change, new_sources),
        reference_ids=row_ids(new_sources) if (mode == "image" or parent.spec.reference_ids) else [],
        density=density,
    )
    return write_bundle(out_path, parent.model_path, bank, spec, descriptors=descriptors)


def _descriptor_ids(bundle: Bundle) -> tuple[str, ...]:
    """One reference id per whole-part descriptor row (a bundle's initial golden parts are ``initial``)."""
    n = 0 if bundle.descriptors is None else len(bundle.descriptors)
    ids = bundle.spec.density.ids if bundle.spec.density is not None else ()
    return tuple(ids) if len(ids) == n else (INITIAL_SOURCE,) * n


def recalibrate_on_goods(
    embedder: OnnxEmbedder,
    parent: Bundle,
    bank: np.ndarray,
    sources: list[dict[str, Any]],
    good_paths: list[Path],
    bad_paths: list[Path],
    target_frr: float,
    descriptors: np.ndarray | None = None,
    density: DensitySpec | None = None,
    promise: str = "expected",
) -> tuple[Threshold, DensitySpec | None]:
    """The threshold for the new references from re-calibration goods (and defects); a bundle that also scores
    whole parts gets both scores' scales re-measured on those goods and its threshold set on the fused score."""
    in_bank = {s["sha256"]: s["id"] for s in sources if s.get("sha256")}
    good, good_sha, good_err = read_and_embed(embedder, good_paths)
    bad, bad_sha, bad_err = read_and_embed(embedder, bad_paths) if bad_paths else (None, [], [])
    problems = [e for e in good_err + bad_err if e is not None]
    for p, sha in zip(good_paths + bad_paths, good_sha + bad_sha):
        if sha and sha in in_bank:
            problems.append(
                f"{p}: is in the reference bank (as {in_bank[sha]!r}); calibrate on images the bank does not hold"
            )
    overlap = set(filter(None, good_sha)) & set(filter(None, bad_sha))
    problems += [f"{p}: given as both good and defective" for p, sha in zip(bad_paths, bad_sha) if sha in overlap]
    if problems:
        refuse("cannot re-calibrate the threshold", problems)
    part_view = density is not None and descriptors is not None
    scorer = Scorer.of(
        bank,
        parent.spec.scoring,
        part_references=descriptors if part_view else None,
        part_blocks=density.blocks if density is not None else None,
    )
    good_raw = scorer.raw(good.embeddings, good.valid, good.descriptors if part_view else None)
    scorer = scorer.fitted_on(good_raw)  # both views' scales re-measured on the goods, against the new references
    if density is not None:  # the bundle's rule for the views stays: re-calibration moves scales, not the rule
        scorer = scorer.with_combine(density.combine)
    good_scores = scorer.fuse(good_raw)
    bad_scores = None
    if bad is not None:
        bad_scores = scorer.fuse(scorer.raw(bad.embeddings, bad.valid, bad.descriptors if part_view else None))
    if density is not None:
        density = scorer.density_spec(density.ids)
    inputs = {
        "scored_against": "new reference bank",
        "good": [{"file": str(p), "sha256": s} for p, s in zip(good_paths, good_sha)],
        "defective": [{"file": str(p), "sha256": s} for p, s in zip(bad_paths, bad_sha)],
        "previous": parent.spec.threshold.to_dict(),
    }
    return recalibrated_threshold(good_scores, bad_scores, target_frr, inputs, promise), density


def remove_references(bundle_path: str | Path, ids: Sequence[str], out_path: str | Path) -> Path:
    """Drop the rows of the given reference ids and write a new bundle (threshold kept, as the parent's)."""
    bundle_path, out_path = Path(bundle_path), Path(out_path)
    if not ids:
        raise ReferencesError("no reference ids to remove")
    check_new_bundle_path(bundle_path, out_path)
    parent = load_bundle(bundle_path)
    mode = parent.mode
    bank, new_sources = drop_references(parent.references, reference_sources(parent), ids)
    descriptors, density = parent.descriptors, parent.spec.density
    if density is not None and descriptors is not None:
        keep = np.array([i not in set(ids) for i in _descriptor_ids(parent)], dtype=bool)
        if keep.sum() < 2:
            raise ReferencesError(
                f"{bundle_path}: removing {sorted(set(ids))} would leave {int(keep.sum())} whole-part "
                "references; the part Gaussian needs at least 2"
            )
        descriptors = descriptors[keep]
        density = replace(density, ids=tuple(i for i, k in zip(_descriptor_ids(parent), keep) if k))
    change = {
        "action": "remove",
        "removed": list(dict.fromkeys(ids)),
        "rows_removed": int(parent.references.shape[0] - bank.shape[0]),
        "threshold_before": parent.spec.threshold.to_dict(),
        "recalibrated": False,
    }
    spec = replace(
        parent.spec,
        provenance=derived_provenance(parent, change, new_sources),
        reference_ids=row_ids(new_sources) if (mode == "image" or parent.spec.reference_ids) else [],
        density=density,
    )
    return write_bundle(out_path, parent.model_path, bank, spec, descriptors=descriptors)
