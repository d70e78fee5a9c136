"""The registry contract: the names registration, the promotion gate and the line agree on, and the one check that a
downloaded bundle is the bundle that was registered.

Three programs meet in the MLflow registry: ``pipelines.tracking`` registers a bundle as a model version and tags
it, the promotion gate reads and writes tags and moves aliases, and the line (``inspector.registry``) follows an
alias and downloads the bundle. Each name they share is defined here once, so a tag renamed on one side cannot
silently stop being checked on another. Standard library and ``inspector.bundle`` only: the line PC imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

from inspector.bundle import DESCRIPTORS_FILE, MANIFEST, MANIFEST_DIGEST, MODEL_FILE, REFERENCES_FILE, Bundle
from inspector.errors import BundleError

#: The pyfunc artifact under which registration logs the bundle directory (``artifacts/bundle`` in MLmodel).
BUNDLE_ARTIFACT = "bundle"
#: The alias the line follows, and the alias registration gives each new version for the gate to judge.
CHAMPION = "champion"
CHALLENGER = "challenger"

# Version tags written at registration.
RUN_ID_TAG = "run_id"
BUNDLE_MODEL_VERSION_TAG = "bundle_model_version"
THRESHOLD_TAG = "threshold"
#: Written by the promotion gate when it is given a signing key: the bundle's ``signature.json``, which the line's
#: client writes beside the bundle it downloads (so a line that requires signatures runs gated bundles only).
SIGNATURE_TAG = "bundle_signature"
THRESHOLD_RULE_TAG = "threshold_rule"
WHOLE_PART_SCORE_TAG = "whole_part_score"
DATASET_HASH_TAG = "dataset_hash"
GIT_COMMIT_TAG = "git_commit"
#: Version tag → bundle file: the sha256 recorded at registration that every download must match (for
#: ``inspector.json``, the digest of its content: threshold, preprocessing and scoring settings included).
HASH_TAGS: Mapping[str, str] = {
    "bundle_sha256.model": MODEL_FILE,
    "bundle_sha256.references": REFERENCES_FILE,
    "bundle_sha256.descriptors": DESCRIPTORS_FILE,
    "bundle_sha256.manifest": MANIFEST,
}

# Version tags written by the promotion gate and by rollback.
GATE_DECISION_TAG = "gate.decision"
GATE_REASONS_TAG = "gate.reasons"
GATE_RUN_ID_TAG = "gate.run_id"
GATE_DECIDED_AT_TAG = "gate.decided_at"
GATE_SET_HASH_VERSION_TAG = "gate.set_hash"
GATE_CHAMPION_VERSION_TAG = "gate.champion_version"
GATE_NOTE_TAG = "gate.note"
GATE_CALIBRATION_TAG = "gate.calibration_shortfall"
GATE_PROMOTED_AT_TAG = "gate.promoted_at"
ROLLBACK_TO_AT_TAG = "gate.rollback_to_at"
ROLLED_BACK_AT_TAG = "gate.rolled_back_at"
PROMOTED = "promoted"
REFUSED = "refused"

# Registered-model tags kept by the gate.
CHAMPION_HISTORY_TAG = "champion_history"
PREVIOUS_CHAMPION_TAG = "previous_champion"
GATE_SET_HASH_TAG = "gate_set_hash"


def gate_rule_tag(rule: str) -> str:
    """The version tag holding one gate rule's verdict and reason."""
    return f"gate.rule.{rule}"


def gate_metric_tag(role: str, metric: str) -> str:
    """The version tag holding one gate-set metric of the challenger or the champion it was compared with."""
    return f"gate.{role}.{metric}"


def slug(name: str, fallback: str = "_") -> str:
    """``name`` as one safe path component (experiment folders, cache folders): other characters become ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or fallback


def recorded_hashes(bundle: Bundle) -> dict[str, str]:
    """File name → the sha256 the bundle records for it (its manifest's content digest for ``inspector.json``)."""
    hashes = {name: str(value) for name, value in bundle.manifest.get("files", {}).items()}
    if MANIFEST_DIGEST in bundle.manifest:
        hashes[MANIFEST] = str(bundle.manifest[MANIFEST_DIGEST])
    return hashes


def bundle_hash_tags(bundle: Bundle) -> dict[str, str]:
    """The hash tags registration writes for ``bundle``: the sha256 of each of its files that a tag covers."""
    hashes = recorded_hashes(bundle)
    return {tag: hashes[name] for tag, name in HASH_TAGS.items() if name in hashes}


def check_bundle_matches_tags(bundle: Bundle, tags: Mapping[str, str], what: str) -> None:
    """Refuse a downloaded bundle whose files are not the ones its version's tags recorded at registration.

    ``load_bundle`` only proves the files match the bundle's own manifest; an artifact replaced whole (manifest
    included) passes that, and only the registry's tags, written when the version was created, catch it.
    """
    hashes = recorded_hashes(bundle)
    for tag, name in HASH_TAGS.items():
        expected = tags.get(tag)
        if expected and hashes.get(name) != expected:
            raise BundleError(
                f"{what}: {name} sha256 in the bundle ({str(hashes.get(name))[:12]}…) does not match the registry's "
                f"tag {tag} ({expected[:12]}…): artifact replaced or corrupt"
            )
