"""The promotion gate: ``challenger`` replaces ``champion`` only when it is at least as good on a frozen gate set.

A bad model must never reach the line, so every rule has to pass, each with a reason a person can read:

- ``gate_set``: the gate manifest's hash equals the pinned one (``GateRules.gate_hash``, else the registered
  model's ``gate_set_hash`` tag, pinned by the first gate that ran) and every gate image still has its sha256;
- ``bundle_integrity``: both bundles download and verify (``download_bundle`` → ``load_bundle`` hashes) and the
  challenger's file hashes equal the ones recorded on its version at registration;
- ``onnx_parity``: the torch-vs-ONNX difference *recorded in the bundle at export* (``model.parity_max_abs_diff``,
  measured on real images by ``models.export.check_parity``) is present and within ``max_parity_diff``. It is not
  re-run: that needs the torch weights, which the registry's bundle deliberately does not carry;
- ``min_auroc`` (absolute floor), ``no_regression`` (AUROC ≥ champion's − tolerance; with no champion yet the
  absolute rules decide), ``false_reject_rate`` and ``escape_rate`` at the challenger's own threshold.

Both models are scored by ``inspector`` (the line's code) on the same gate images. The decision, both models'
metrics and the reasons go to version tags on the challenger and to an MLflow run in ``<model>-promotion``;
``champion`` moves last, and only if ``challenger`` still points at the version that was evaluated. A rollback
moves ``champion`` back along a history kept on the registered model.

Pure functions (rules, decision) plus thin registry helpers; :func:`promote_flow` is the Prefect orchestration.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.ingest import Manifest, ingest, read_manifest, write_manifest

CHAMPION = "champion"
HISTORY_TAG = "champion_history"
PREVIOUS_TAG = "previous_champion"
GATE_HASH_TAG = "gate_set_hash"
MAX_HISTORY = 50
GATE_METRICS = ("image_auroc", "average_precision", "false_reject_rate", "escape_rate")


class GateError(RuntimeError):
    """The gate could not decide (bad gate set, unknown model or version): nothing was moved."""


class GateRules(BaseModel):
    """What a challenger must meet. Defaults are strict; every value can be set with ``--set name=value``."""

    model_config = ConfigDict(extra="forbid")

    min_auroc: float = Field(
        0.9, ge=0, le=1, description="absolute floor on gate-set image AUROC (decides alone with no champion)"
    )
    auroc_tolerance: float = Field(
        0.01, ge=0, le=1, description="challenger AUROC may be at most this much below the champion's"
    )
    max_false_reject_rate: float = Field(
        0.1, ge=0, le=1, description="good parts flagged, at the challenger's threshold"
    )
    max_escape_rate: float = Field(0.2, ge=0, le=1, description="defective parts passed, at the challenger's threshold")
    max_parity_diff: float = Field(1e-3, gt=0, description="torch vs ONNX max abs difference recorded at export")
    min_pixel_auroc: float | None = Field(
        None,
        ge=0,
        le=1,
        description="floor on the heatmaps' pixel AUROC against the gate "
        "set's masks (unset: reported, not a rule; set without masks: refused)",
    )
    gate_hash: str | None = Field(
        None, description="pinned gate-set hash (default: the registered model's gate_set_hash tag)"
    )

    @classmethod
    def from_overrides(cls, pairs: Sequence[str], base: Mapping[str, Any] | None = None) -> GateRules:
        """``["min_auroc=0.95", …]`` on top of ``base``; an unknown rule or a bad value raises ValueError."""
        values = dict(base or {})
        for pair in pairs:
            if "=" not in pair:
                raise ValueError(f"--set expects rule=value, got {pair!r}")
            key, value = (s.strip() for s in pair.split("=", 1))
            if key not in cls.model_fields:
                raise ValueError(f"unknown gate rule {key!r}: rules are {sorted(cls.model_fields)}")
            values[key] = None if value.lower() in ("none", "null", "") else value
        try:
            return cls(**values)
        except ValidationError as exc:  # names the field and the problem
            raise ValueError(f"bad gate rules: {exc}") from None


@dataclass(frozen=True)
class RuleResult:
    name: str
    passed: bool
    reason: str


@dataclass
class ModelScore:
    """One registered version on the gate set: where it came from, whether its bundle verified, its metrics."""

    alias: str
    version: str
    run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    bundle_error: str | None = None
    parity: float | None = None
    threshold: float | None = None
    scored: int = 0
    score_errors: int = 0
    hash_mismatch: str | None = None


@dataclass
class GateDecision:
    """The whole decision: every rule with its reason, both models' metrics and the gate set used."""

    model_name: str
    promote: bool
    rules: list[RuleResult]
    challenger: ModelScore
    champion: ModelScore | None
    gate_hash: str
    settings: dict[str, Any]
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    moved: bool = False
    note: str = ""

    @property
    def reasons(self) -> list[str]:
        return [f"{r.name}: {r.reason}" for r in self.rules if not r.passed] or ["all rules passed"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": self.reasons}


# --------------------------------------------------------------------------------------------- the gate set


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
    from pipelines.datasets import scan_dataset
    from pipelines.ingest import build_manifest

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


# --------------------------------------------------------------------------------------------- the rules (pure)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _metric(score: ModelScore | None, name: str) -> float | None:
    if score is None or score.bundle_error:
        return None
    value = score.metrics.get(name)
    return None if value is None or math.isnan(value) else float(value)


def evaluate_rules(
    challenger: ModelScore,
    champion: ModelScore | None,
    rules: GateRules,
    *,
    gate_hash: str,
    pinned_hash: str | None,
    changed_images: Sequence[str] = (),
) -> list[RuleResult]:
    """Every rule's verdict and reason. Pure: the registry and the models were read before."""
    out: list[RuleResult] = []
    if pinned_hash and pinned_hash != gate_hash:
        out.append(
            RuleResult("gate_set", False, f"gate manifest hash {gate_hash[:12]}… is not the pinned {pinned_hash[:12]}…")
        )
    elif changed_images:
        out.append(
            RuleResult(
                "gate_set",
                False,
                f"{len(changed_images)} gate images changed since the manifest: {list(changed_images)[:3]}",
            )
        )
    else:
        out.append(
            RuleResult(
                "gate_set",
                True,
                f"gate set {gate_hash[:12]}… {'matches the pinned hash' if pinned_hash else 'pinned now (first gate)'}",
            )
        )

    if champion is not None and champion.version == challenger.version:
        out.append(
            RuleResult("distinct_versions", False, f"challenger version {challenger.version} is already the champion")
        )

    problems = []
    if challenger.bundle_error:
        problems.append(f"challenger v{challenger.version}: {challenger.bundle_error}")
    if challenger.hash_mismatch:
        problems.append(f"challenger v{challenger.version}: {challenger.hash_mismatch}")
    if champion is not None and champion.bundle_error:
        problems.append(f"champion v{champion.version}: {champion.bundle_error}")
    if not challenger.bundle_error and challenger.score_errors:
        problems.append(
            f"challenger could not score {challenger.score_errors} of {challenger.scored + challenger.score_errors} gate images"
        )
    out.append(
        RuleResult(
            "bundle_integrity", not problems, "; ".join(problems) or "bundles verified (sha256 of model and references)"
        )
    )

    if challenger.bundle_error:
        out.append(RuleResult("onnx_parity", False, "challenger bundle not verified"))
    elif challenger.parity is None:
        out.append(
            RuleResult("onnx_parity", False, "no parity result recorded in the bundle (model.parity_max_abs_diff)")
        )
    else:
        ok = challenger.parity <= rules.max_parity_diff
        out.append(
            RuleResult(
                "onnx_parity",
                ok,
                f"recorded torch/ONNX max abs diff {challenger.parity:.2e} {'≤' if ok else '>'} {rules.max_parity_diff:.0e}",
            )
        )

    auroc = _metric(challenger, "image_auroc")
    ok = auroc is not None and auroc >= rules.min_auroc
    out.append(
        RuleResult(
            "min_auroc", ok, f"challenger AUROC {_fmt(auroc)} {'≥' if ok else 'below'} floor {rules.min_auroc:.4f}"
        )
    )

    if champion is None:
        out.append(RuleResult("no_regression", True, "no champion yet: the absolute rules decide"))
    else:
        base = _metric(champion, "image_auroc")
        ok = auroc is not None and base is not None and auroc >= base - rules.auroc_tolerance
        out.append(
            RuleResult(
                "no_regression",
                ok,
                f"challenger AUROC {_fmt(auroc)} vs champion {_fmt(base)} (tolerance {rules.auroc_tolerance})",
            )
        )

    if rules.min_pixel_auroc is not None:
        pixel = _metric(challenger, "pixel_auroc")
        ok = pixel is not None and pixel >= rules.min_pixel_auroc
        reason = (
            "the gate set has no defect masks to measure it on"
            if pixel is None and not challenger.bundle_error
            else f"challenger pixel AUROC {_fmt(pixel)} {'≥' if ok else 'below'} floor {rules.min_pixel_auroc:.4f}"
        )
        out.append(RuleResult("min_pixel_auroc", ok, reason))

    for name, limit in (("false_reject_rate", rules.max_false_reject_rate), ("escape_rate", rules.max_escape_rate)):
        value = _metric(challenger, name)
        ok = value is not None and value <= limit
        out.append(
            RuleResult(
                name,
                ok,
                f"challenger {name.replace('_', ' ')} {_fmt(value)} at threshold {_fmt(challenger.threshold)} "
                f"{'≤' if ok else 'above'} target {limit}",
            )
        )
    return out


def decide(
    model_name: str,
    challenger: ModelScore,
    champion: ModelScore | None,
    rules: GateRules,
    gate: GateSet,
    pinned_hash: str | None,
    changed_images: Sequence[str] = (),
) -> GateDecision:
    """Apply every rule; promote only when all pass."""
    results = evaluate_rules(
        challenger, champion, rules, gate_hash=gate.hash, pinned_hash=pinned_hash, changed_images=changed_images
    )
    return GateDecision(
        model_name,
        all(r.passed for r in results),
        results,
        challenger,
        champion,
        gate.hash,
        {**rules.model_dump(), "gate_manifest": str(gate.path), "pinned_hash": pinned_hash},
    )


# --------------------------------------------------------------------------------------------- registry helpers


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def alias_version(model_name: str, alias: str) -> Any | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INVALID_PARAMETER_VALUE,
        RESOURCE_DOES_NOT_EXIST,
        ErrorCode,
    )

    try:
        return _client().get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)):
            return None
        raise


def score_version(model_name: str, alias: str, version: Any, gate: GateSet, work: Path) -> ModelScore:
    """Download and verify one version's bundle and score the gate images with ``inspector``.

    A bundle that fails verification is a *result* (``bundle_error``), not a crash: the gate then refuses.
    A registry that cannot be reached is a crash (the caller moves nothing).
    """
    from inspector.bundle import load_bundle
    from inspector.errors import InspectorError
    from pipelines.recipe import evaluate_bundle, pixel_level_auroc
    from pipelines.tracking import download_bundle

    score = ModelScore(alias, str(version.version), version.run_id or "")
    try:
        path = download_bundle(f"models:/{model_name}/{version.version}", work / f"{alias}-v{version.version}")
        bundle = load_bundle(path)
    except (InspectorError, ValueError) as exc:
        score.bundle_error = str(exc)
        return score
    files = bundle.manifest["files"]
    for key, name in (
        ("bundle_sha256.model", "model.onnx"),
        ("bundle_sha256.references", "references.npy"),
        ("bundle_sha256.descriptors", "descriptors.npy"),
    ):
        recorded = (version.tags or {}).get(key)
        if recorded and recorded != files.get(name):
            score.hash_mismatch = (
                f"{name} sha256 {files.get(name, '')[:12]}… is not the {recorded[:12]}… recorded at registration"
            )
    parity = bundle.spec.model.get("parity_max_abs_diff")
    score.parity = float(parity) if parity is not None else None
    records = [e.record() for e in gate.manifest.entries]
    evaluation = evaluate_bundle(path, records)
    score.metrics = {k: float(v) for k, v in evaluation.metrics().items()}
    if (
        pixel := pixel_level_auroc(path, records)
    ) is not None:  # the gate's defects have masks: where, not only whether
        score.metrics["pixel_auroc"] = pixel
    score.threshold = float(evaluation.threshold)
    score.scored, score.score_errors = len(evaluation.scores), len(evaluation.errors)
    return score


def _history(model_name: str) -> list[str]:
    tags = _client().get_registered_model(model_name).tags or {}
    try:
        return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        return []


def _set_champion(model_name: str, version: str, history: list[str]) -> None:
    """Move the alias, then the history tags (the alias is what the line follows; history only serves rollback)."""
    client = _client()
    client.set_registered_model_alias(model_name, CHAMPION, version)
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history[-MAX_HISTORY:]))
    client.set_registered_model_tag(model_name, PREVIOUS_TAG, history[-2] if len(history) > 1 else "")


def _version_tags(decision: GateDecision, run_id: str) -> dict[str, str]:
    tags = {
        "gate.decision": "promoted" if decision.promote else "refused",
        "gate.reasons": "; ".join(decision.reasons)[:4900],
        "gate.run_id": run_id,
        "gate.decided_at": decision.decided_at,
        "gate.set_hash": decision.gate_hash,
        "gate.champion_version": decision.champion.version if decision.champion else "none",
    }
    for r in decision.rules:
        tags[f"gate.rule.{r.name}"] = f"{'pass' if r.passed else 'FAIL'}: {r.reason}"[:4900]
    for who, score in (("challenger", decision.challenger), ("champion", decision.champion)):
        for k, v in (score.metrics if score else {}).items():
            tags[f"gate.{who}.{k}"] = f"{v:.6g}"
    return tags


def record_decision(decision: GateDecision) -> str:
    """An MLflow run in ``<model>-promotion`` (params = rules, metrics = both models', decision.json) and version
    tags on the challenger. Returns the run id."""
    import mlflow

    from pipelines.tracking import _param_value, ensure_experiment

    ensure_experiment(f"{decision.model_name}-promotion")
    metrics = {
        f"{who}_{k}": v
        for who, s in (("challenger", decision.challenger), ("champion", decision.champion))
        if s
        for k, v in s.metrics.items()
        if math.isfinite(v)
    }
    with mlflow.start_run(run_name=f"gate v{decision.challenger.version}") as run:
        mlflow.log_params({k: _param_value(v) for k, v in decision.settings.items()})
        mlflow.log_params(
            {
                "challenger_version": decision.challenger.version,
                "champion_version": decision.champion.version if decision.champion else "none",
                "gate_set_hash": decision.gate_hash,
            }
        )
        mlflow.log_metrics({**metrics, "promoted": float(decision.promote)})
        mlflow.set_tags({"decision": "promoted" if decision.promote else "refused", "model_name": decision.model_name})
        mlflow.log_dict(decision.to_dict(), "decision.json")
    client = _client()
    for key, value in _version_tags(decision, run.info.run_id).items():
        client.set_model_version_tag(decision.model_name, decision.challenger.version, key, value)
    return run.info.run_id


def move_champion(decision: GateDecision) -> GateDecision:
    """Give ``champion`` to the evaluated challenger, if the gate passed and ``challenger`` still points at it."""
    if not decision.promote:
        decision.note = "gate refused: champion unchanged"
        return decision
    now = alias_version(decision.model_name, _challenger_alias())
    if now is None or str(now.version) != decision.challenger.version:
        decision.promote = False
        decision.note = (
            f"challenger alias moved to v{getattr(now, 'version', None)} during the gate (evaluated "
            f"v{decision.challenger.version}): champion unchanged"
        )
        _client().set_model_version_tag(decision.model_name, decision.challenger.version, "gate.decision", "refused")
        _client().set_model_version_tag(decision.model_name, decision.challenger.version, "gate.note", decision.note)
        return decision
    current = alias_version(decision.model_name, CHAMPION)
    expected = decision.champion.version if decision.champion else None
    if (str(current.version) if current else None) != expected:
        decision.promote = False
        decision.note = f"champion moved to v{getattr(current, 'version', None)} during the gate (compared with v{expected}): unchanged"
        _client().set_model_version_tag(decision.model_name, decision.challenger.version, "gate.note", decision.note)
        return decision
    history = _history(decision.model_name)
    if expected and (not history or history[-1] != expected):
        history.append(expected)  # a champion set outside the gate (e.g. the demo's first version)
    _set_champion(decision.model_name, decision.challenger.version, [*history, decision.challenger.version])
    _client().set_model_version_tag(
        decision.model_name,
        decision.challenger.version,
        "gate.promoted_at",
        datetime.now(UTC).isoformat(timespec="seconds"),
    )
    decision.moved = True
    decision.note = f"champion moved to v{decision.challenger.version}"
    return decision


def _challenger_alias() -> str:
    from pipelines.tracking import CHALLENGER

    return CHALLENGER


def pin_gate_hash(model_name: str, gate_hash: str) -> None:
    """Pin the gate set on first use, so a later gate on different images is refused unless re-pinned on purpose."""
    client = _client()
    if not (client.get_registered_model(model_name).tags or {}).get(GATE_HASH_TAG):
        client.set_registered_model_tag(model_name, GATE_HASH_TAG, gate_hash)


# --------------------------------------------------------------------------------------------- rollback


@dataclass
class RollbackResult:
    model_name: str
    from_version: str | None
    to_version: str
    run_id: str


def rollback(model_name: str, to_version: str | int | None = None) -> RollbackResult:
    """Move ``champion`` to ``to_version`` or, by default, to the champion before the current one.

    The history is a stack on the registered model (``champion_history``): a promotion pushes, a rollback to the
    previous champion pops, so repeated rollbacks walk further back. An unknown version is refused (GateError).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import ensure_experiment

    client = _client()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        raise GateError(f"registered model {model_name!r} not found") from None
    current = alias_version(model_name, CHAMPION)
    current_v = str(current.version) if current else None
    history = _history(model_name)
    if current_v and (not history or history[-1] != current_v):
        history.append(current_v)
    if to_version is None:
        if len(history) < 2:
            raise GateError(
                f"{model_name}: no previous champion to roll back to (history {history or 'empty'}); pass --to VERSION"
            )
        target = history[-2]
        new_history = history[:-1]
    else:
        target = str(to_version)
        known = {str(v.version) for v in client.search_model_versions(f"name='{model_name}'")}
        if target not in known:
            raise GateError(f"{model_name}: version {target} does not exist (versions: {sorted(known, key=int)})")
        new_history = [*history, target]
    _set_champion(model_name, target, new_history)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    ensure_experiment(f"{model_name}-promotion")
    with mlflow.start_run(run_name=f"rollback to v{target}") as run:
        mlflow.log_params({"action": "rollback", "from_version": current_v or "none", "to_version": target})
        mlflow.set_tags({"decision": "rollback", "model_name": model_name})
        mlflow.log_dict(
            {
                "action": "rollback",
                "from_version": current_v,
                "to_version": target,
                "at": stamp,
                "history": new_history,
            },
            "decision.json",
        )
    client.set_model_version_tag(model_name, target, "gate.rollback_to_at", stamp)
    if current_v:
        client.set_model_version_tag(model_name, current_v, "gate.rolled_back_at", stamp)
    return RollbackResult(model_name, current_v, target, run.info.run_id)


# --------------------------------------------------------------------------------------------- the flow


@task(cache_policy=NO_CACHE)
def load_gate_task(gate_manifest: str) -> GateSet:
    return load_gate_set(Path(gate_manifest))


@task(cache_policy=NO_CACHE)
def score_task(model_name: str, alias: str, version: Any, gate: GateSet, work: Path) -> ModelScore:
    score = score_version(model_name, alias, version, gate, work)
    get_run_logger().info(
        "%s v%s: %s%s",
        alias,
        score.version,
        {k: round(v, 4) for k, v in score.metrics.items()},
        f" (bundle: {score.bundle_error})" if score.bundle_error else "",
    )
    return score


@task(cache_policy=NO_CACHE)
def record_task(decision: GateDecision) -> str:
    return record_decision(decision)


@task(cache_policy=NO_CACHE)
def move_task(decision: GateDecision) -> GateDecision:
    return move_champion(decision)


@flow(name="promote-inspector", log_prints=True)
def promote_flow(
    model_name: str,
    gate_manifest: str,
    rules: GateRules | dict[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Gate ``challenger`` against ``champion`` on the frozen gate set; move ``champion`` only if every rule passes.

    Returns the decision as a dict (``promote``, ``moved``, ``rules``, both models' metrics, ``reasons``).
    Raises (moving nothing) when the gate set is unreadable, there is no challenger, or the registry is down.
    """
    import mlflow

    from pipelines.tracking import CHALLENGER

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    rules = rules if isinstance(rules, GateRules) else GateRules(**(rules or {}))
    gate = load_gate_task(gate_manifest)
    challenger_version = alias_version(model_name, CHALLENGER)
    if challenger_version is None:
        raise GateError(f"{model_name}: no version has the alias {CHALLENGER!r}; train one first")
    champion_version = alias_version(model_name, CHAMPION)
    pinned = rules.gate_hash or (_client().get_registered_model(model_name).tags or {}).get(GATE_HASH_TAG)
    with tempfile.TemporaryDirectory(prefix="gate-") as tmp:
        challenger = score_task(model_name, CHALLENGER, challenger_version, gate, Path(tmp))
        champion = (
            score_task(model_name, CHAMPION, champion_version, gate, Path(tmp))
            if champion_version is not None
            else None
        )
        decision = decide(model_name, challenger, champion, rules, gate, pinned, changed_gate_images(gate))
    record_task(decision)
    if not pinned and decision.rules[0].passed:
        pin_gate_hash(model_name, gate.hash)
    decision = move_task(decision)
    print(f"gate {'PASSED' if decision.promote else 'REFUSED'} for {model_name} v{challenger.version}: {decision.note}")
    for r in decision.rules:
        print(f"  [{'pass' if r.passed else 'FAIL'}] {r.name}: {r.reason}")
    return decision.to_dict()
