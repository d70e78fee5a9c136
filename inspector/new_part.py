"""A new part type from a handful of golden photos, without retraining: the given bundle's embedder, a golden bank
and whole-part statistics from the goldens, and a threshold from what so few photos can show.

Why: a line that makes many variants cannot retrain and wait for defect photos each time one starts; a Siamese
embedder compares a part with references of a kind it never trained on. The threshold comes from the goldens'
leave-one-out scores (each scored against the others, as :func:`inspector.scorer.out_of_fold_views` scores a
fold) or, when given, from extra good photos scored against the whole bank
(:func:`inspector.references.recalibrate_on_goods`); either way :func:`inspector.calibration.calibrate` sets
it, and the bundle records, in words, the false-reject rate those few goods can vouch for (a one-sided 95 %
Clopper-Pearson bound): 8 goldens only show it is at most 31 %.

What cannot work is refused by name, and nothing is written: one golden and no extra goods (nothing to score it
against), an image that does not decode, the same photo given twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inspector.bundle import Bundle, BundleSpec, Threshold, load_bundle, write_bundle
from inspector.bundle import derived_provenance as bundle_lineage
from inspector.calibration import CONFIDENCE
from inspector.density import DensitySpec
from inspector.engine import Embedded, OnnxEmbedder
from inspector.preprocess import auto_input_size
from inspector.references import (
    SOURCES_KEY,
    ReferencesError,
    append_references,
    check_new_bundle_path,
    default_ids,
    flatten_embeddings,
    read_and_embed,
    recalibrate_on_goods,
    recalibrated_threshold,
    refuse,
)
from inspector.scorer import RawScores, Scorer, out_of_fold_views
from inspector.scoring import ScoringConfig, patch_mask

#: the provenance key of what a few-shot bundle was made from and what it can promise
NEW_PART_KEY = "new_part"
#: how the two views are fused when the threshold rests on the goldens alone: by the larger, not the trained
#: bundles' mean. The ranking is the same (k = 4 to 16, three part types: within the draw spread), but the threshold
#: is extrapolated from k leave-one-out scores, and on the mean's it flagged 3-22 % of the defects at k = 4 against
#: 25-52 % (benchmarks/README.md). With extra good photos the threshold rests on them, under the parent's rule.
FEW_SHOT_COMBINE = "max"
#: the input's pixels and side multiple when the model lets the size be re-chosen (the training flow's defaults)
INPUT_PIXELS = 81920
INPUT_MULTIPLE = 32


def promise_statement(details: dict[str, Any], source: str) -> str:
    """What the goods a threshold was set on can promise, in words: ``8 goldens (each scored against the other 7):
    the false-reject rate is only known to be ≤ 31 % at 95 %``, then how many goods would resolve the target."""
    n, bound = int(details["n_good"]), float(details["frr_upper_95"])
    text = f"{n} {source}: the false-reject rate is only known to be ≤ {bound * 100:.0f} % at {CONFIDENCE * 100:.0f} %"
    needed, target = details.get("goods_to_resolve_target"), details.get("target_false_reject_rate")
    if isinstance(needed, int) and isinstance(target, float) and not details.get("resolves_target", True):
        text += f"; {needed} goods would show the {target * 100:.1f} % target"
    if not details.get("n_defect"):
        text += "; no defect was seen, so the escape rate is unknown"
    return text


def model_input_size(embedder: OnnxEmbedder) -> tuple[int, int] | None:
    """The (height, width) the ONNX model is fixed to, or None where both are dynamic (any size runs)."""
    shape = embedder.session.get_inputs()[0].shape
    height, width = shape[2], shape[3]
    return (height, width) if isinstance(height, int) and isinstance(width, int) else None


def input_size_choice(parent: Bundle, fixed: tuple[int, int] | None, sizes: Sequence[tuple[int, int]]) -> dict:
    """The input size for the goldens' aspect (as the training flow chooses it), and whether the model can take it:
    an export with a fixed height and width keeps the parent's size, and letterboxing keeps the goldens' aspect."""
    pre = parent.spec.preprocessing
    chosen = auto_input_size(sizes, INPUT_PIXELS, multiple=INPUT_MULTIPLE)
    used = chosen if fixed is None else (pre.height, pre.width)
    reason = (
        "the model's height and width are dynamic: re-chosen from the goldens' aspect"
        if fixed is None
        else f"the model's input is fixed at {fixed[0]}x{fixed[1]}: kept, the goldens letterboxed ({pre.resize})"
    )
    return {"goldens_aspect_size": list(chosen), "used": list(used), "reason": reason}


def _size(path: Path) -> tuple[int, int]:
    """An image's (width, height), read from its header (it decoded once already)."""
    with Image.open(path) as image:
        return image.size


def _problems(paths: Sequence[Path], shas: Sequence[str], errors: Sequence[str | None]) -> list[str]:
    """Each image that did not decode and each photo given twice, by name."""
    problems = [e for e in errors if e is not None]
    seen: dict[str, Path] = {}
    for p, sha, err in zip(paths, shas, errors):
        if err is None and sha in seen:
            problems.append(f"{p}: same content as {seen[sha]}")
        seen.setdefault(sha, p)
    return problems


def few_shot_bank(
    golden: Embedded, scoring: ScoringConfig, mode: str, dim: int, ids: Sequence[str], shas: Sequence[str]
) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
    """The goldens' bank rows (patches on the part), their sources, and the golden each row came from."""
    mask = patch_mask(golden.embeddings, scoring, golden.valid)
    rows, per_image = flatten_embeddings(golden.embeddings, mode, dim, mask)
    bank, sources = append_references(np.zeros((0, dim), np.float32), [], rows, per_image, ids, shas)
    return bank, sources, np.repeat(np.arange(len(per_image)), per_image)


def leave_one_out_threshold(
    golden: Embedded,
    bank: np.ndarray,
    row_golden: np.ndarray,
    scoring: ScoringConfig,
    part_blocks: Sequence[int] | None,
    target_frr: float,
    promise: str,
) -> tuple[Scorer, Threshold]:
    """Each golden scored against the others (bank rows and whole-part Gaussian), the views' scales fitted on those
    scores and the threshold set on them: the scorer to ship (every golden in its bank) and its threshold."""
    k = len(golden.embeddings)
    descriptors = golden.descriptors if part_blocks is not None else None
    terms, part = out_of_fold_views(
        golden.embeddings, golden.valid, descriptors, bank, row_golden, np.arange(k), scoring, part_blocks
    )
    raw = RawScores(terms.view(scoring.offset), part)
    scorer = Scorer.of(bank, scoring, part_references=descriptors, part_blocks=part_blocks).fitted_on(raw)
    scorer = scorer.with_combine(FEW_SHOT_COMBINE)
    inputs = {"scored_against": "the other goldens (leave-one-out)", "goldens": k}
    return scorer, recalibrated_threshold(scorer.fuse(raw), None, target_frr, inputs, promise)


def new_part(
    bundle_path: str | Path,
    goldens: Sequence[str | Path],
    out_path: str | Path,
    *,
    goods: Sequence[str | Path] = (),
    name: str | None = None,
    target_false_reject_rate: float = 0.01,
    promise: str = "expected",
    threads: int | None = None,
) -> Path:
    """Write a bundle for a new part type at ``out_path``: ``bundle_path``'s embedder, ``goldens`` as its golden bank
    (and whole-part Gaussian, with 3 goldens or more, or 2 and extra goods), the threshold from the goldens'
    leave-one-out scores or from ``goods`` (extra good photos, not goldens). ``name``: the part type (default: the
    output folder's name). Raises :class:`ReferencesError` naming what cannot work; nothing is written then."""
    bundle_path, out_path = Path(bundle_path), Path(out_path)
    golden_paths, good_paths = [Path(p) for p in goldens], [Path(p) for p in goods]
    if not golden_paths:
        raise ReferencesError("new part: no golden photos given")
    if len(golden_paths) == 1 and not good_paths:
        raise ReferencesError(
            f"new part: one golden photo ({golden_paths[0]}) and no extra good photos cannot set a threshold: "
            "leave-one-out needs 2 goldens or more, or give extra goods (--goods); nothing was written"
        )
    check_new_bundle_path(bundle_path, out_path)
    parent = load_bundle(bundle_path)
    embedder = OnnxEmbedder(parent.model_path, parent.spec.preprocessing, threads=threads)
    golden, shas, errors = read_and_embed(embedder, golden_paths)
    problems = _problems(golden_paths, shas, errors)
    if problems:
        refuse(f"cannot make a new part from {len(golden_paths)} golden photos", problems)
    sizes = [_size(p) for p in golden_paths]
    size = input_size_choice(parent, model_input_size(embedder), sizes)
    if size["used"] != [parent.spec.preprocessing.height, parent.spec.preprocessing.width]:
        pre = replace(parent.spec.preprocessing, height=size["used"][0], width=size["used"][1])
        embedder = OnnxEmbedder(parent.model_path, pre, threads=threads)
        golden = embedder.embed(golden_paths)
    scoring, mode, dim = parent.spec.scoring, parent.mode, int(parent.references.shape[1])
    ids = default_ids(golden_paths, shas)
    bank, sources, row_golden = few_shot_bank(golden, scoring, mode, dim, ids, shas)
    k, density = len(golden_paths), parent.spec.density
    descriptors = golden.descriptors
    part_view = density is not None and descriptors is not None and k >= (2 if good_paths else 3)
    if good_paths:
        density_in = replace(density, ids=tuple(ids)) if part_view and density is not None else None
        threshold, new_density = recalibrate_on_goods(
            embedder,
            parent,
            bank,
            sources,
            good_paths,
            [],
            target_false_reject_rate,
            descriptors if part_view else None,
            density_in,
            promise,
        )
        source = f"extra good photos (scored against the {k} goldens)"
    else:
        blocks = density.blocks if part_view and density is not None else None
        scorer, threshold = leave_one_out_threshold(
            golden, bank, row_golden, scoring, blocks, target_false_reject_rate, promise
        )
        new_density = scorer.density_spec(ids)
        source = f"goldens (each scored against the other {k - 1})"
    statement = promise_statement(threshold.details, source)
    threshold.details["few_shot_promise"] = statement
    spec = few_shot_spec(parent, name or out_path.name, size, threshold, sources, new_density, ids, statement)
    return write_bundle(out_path, parent.model_path, bank, spec, descriptors=descriptors if new_density else None)


def few_shot_spec(
    parent: Bundle,
    part: str,
    size: dict[str, Any],
    threshold: Threshold,
    sources: list[dict[str, Any]],
    density: DensitySpec | None,
    ids: Sequence[str],
    statement: str,
) -> BundleSpec:
    """The new part's manifest: the parent's embedder and scoring, the part's name, size, threshold and lineage; the
    dataset hash is the goldens' (sorted file digests), so two bundles from the same photos say so."""
    prov = bundle_lineage(parent, drop=(SOURCES_KEY, "reference_change", NEW_PART_KEY, "dataset_hash"))
    golden_shas = sorted(str(s.get("sha256", "")) for s in sources)
    prov["dataset_hash"] = hashlib.sha256("\n".join(golden_shas).encode()).hexdigest()
    prov["embedder_dataset_hash"] = parent.spec.provenance.get("dataset_hash", "unknown")
    prov[NEW_PART_KEY] = {
        "part": part,
        "goldens": len(sources),
        "embedder": parent.model_version,
        "input_size": size,
        "whole_part_score": density is not None,
        "promise": statement,
    }
    prov[SOURCES_KEY] = sources
    pre = replace(parent.spec.preprocessing, height=size["used"][0], width=size["used"][1])
    model = {**parent.spec.model, "name": part, "version": f"{len(sources)}-shot", "embedder": parent.model_version}
    per_row = len(sources) == sum(s["rows"][1] - s["rows"][0] for s in sources)
    return BundleSpec(
        preprocessing=pre,
        scoring=parent.spec.scoring,
        threshold=threshold,
        model=model,
        provenance=prov,
        reference_ids=list(ids) if per_row else [],
        density=density,
    )
