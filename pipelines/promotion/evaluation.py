"""Score one registered version on the gate set, with the bundle fetched exactly as the line fetches it.

The bundle comes through the line's registry client and cache (:mod:`pipelines.line_registry`, over
:mod:`inspector.registry`): the same MLmodel lookup, download, manifest check and check against the version's
hash tags. A bundle the line would refuse is a *result* here (``bundle_error``), so the gate refuses it with the
line's own reason; a registry that cannot be reached is a crash, and the caller moves nothing.
"""

from __future__ import annotations

from typing import Any

from inspector.bundle import MANIFEST_DIGEST, load_bundle
from inspector.calibration import shortfall
from inspector.errors import InspectorError
from inspector.registry import RegistrySource, RegistryUnreachable
from pipelines.promotion.gate_set import GateSet
from pipelines.promotion.rules import ModelScore


def score_version(model_name: str, alias: str, version: Any, gate: GateSet, registry: RegistrySource) -> ModelScore:
    """Fetch one version's bundle through the line's client and score the gate images with ``inspector``.

    ``version`` is the registry's model version the alias pointed at when the gate started: the gate scores that
    version by number, so an alias moving meanwhile cannot swap the bundle under it.
    """
    from pipelines.evaluation import evaluate_bundle, pixel_level_auroc  # torch: only a gate run pays for it

    score = ModelScore(alias, str(version.version), version.run_id or "")
    try:
        fetched = registry.fetch(f"models:/{model_name}/{version.version}")
        bundle = load_bundle(fetched.path)
    except RegistryUnreachable:
        raise
    except InspectorError as exc:
        score.bundle_error = str(exc)
        return score
    score.calibration_shortfall = shortfall(bundle.spec.threshold.details)
    digest = bundle.manifest.get(MANIFEST_DIGEST)
    score.content_digest = str(digest) if digest else None
    parity = bundle.spec.model.get("parity_max_abs_diff")
    score.parity = float(parity) if parity is not None else None
    records = [e.record() for e in gate.manifest.entries]
    evaluation = evaluate_bundle(fetched.path, records)
    score.metrics = {k: float(v) for k, v in evaluation.metrics().items()}
    pixel = pixel_level_auroc(fetched.path, records)
    if pixel is not None:  # the gate's defects have masks: where, not only whether
        score.metrics["pixel_auroc"] = pixel
    score.threshold = float(evaluation.threshold)
    score.scored, score.score_errors = len(evaluation.scores), len(evaluation.errors)
    return score
