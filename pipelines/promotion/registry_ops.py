"""What the gate and rollback change in the registry: the ``champion`` alias, its history, and the decision tags.

``champion`` is what the line follows, so it moves last and only under guard: the gate must have passed, and
``challenger`` and ``champion`` must still point where they pointed when the gate read them. Every decision is
recorded twice: version tags on the challenger (what a person browsing the registry sees) and an MLflow run in
``<model>-promotion`` (params = rules, metrics = both models', ``decision.json``). The champion's history is a
stack kept as a registered-model tag, so repeated rollbacks walk further back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

from inspector.registry_contract import (
    CHALLENGER,
    CHAMPION,
    CHAMPION_HISTORY_TAG,
    GATE_CALIBRATION_TAG,
    GATE_CHAMPION_VERSION_TAG,
    GATE_DECIDED_AT_TAG,
    GATE_DECISION_TAG,
    GATE_NOTE_TAG,
    GATE_PROMOTED_AT_TAG,
    GATE_REASONS_TAG,
    GATE_RUN_ID_TAG,
    GATE_SET_HASH_TAG,
    GATE_SET_HASH_VERSION_TAG,
    PREVIOUS_CHAMPION_TAG,
    PROMOTED,
    REFUSED,
    ROLLBACK_TO_AT_TAG,
    ROLLED_BACK_AT_TAG,
    SIGNATURE_TAG,
    gate_metric_tag,
    gate_rule_tag,
)
from pipelines.promotion.rules import GateDecision, ModelScore
from pipelines.tracking import _param_value, ensure_experiment

MAX_HISTORY = 50
MAX_TAG_LENGTH = 4900  # under MLflow's 5000-character limit on a tag value


class GateError(RuntimeError):
    """The gate could not decide (bad gate set, unknown model or version): nothing was moved."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def alias_version(model_name: str, alias: str) -> Any | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    try:
        return MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)):
            return None
        raise


def pinned_gate_hash(model_name: str) -> str | None:
    """The gate-set hash pinned on the registered model by its first gate, or None before that."""
    return (MlflowClient().get_registered_model(model_name).tags or {}).get(GATE_SET_HASH_TAG) or None


def pin_gate_hash(model_name: str, gate_hash: str) -> None:
    """Pin the gate set on first use, so a later gate on different images is refused unless re-pinned on purpose."""
    if not pinned_gate_hash(model_name):
        MlflowClient().set_registered_model_tag(model_name, GATE_SET_HASH_TAG, gate_hash)


def _history(model_name: str) -> list[str]:
    tags = MlflowClient().get_registered_model(model_name).tags or {}
    try:
        return [str(v) for v in json.loads(tags.get(CHAMPION_HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        return []


def _set_champion(model_name: str, version: str, history: list[str]) -> None:
    """Move the alias, then the history tags (the alias is what the line follows; history only serves rollback)."""
    client = MlflowClient()
    client.set_registered_model_alias(model_name, CHAMPION, version)
    client.set_registered_model_tag(model_name, CHAMPION_HISTORY_TAG, json.dumps(history[-MAX_HISTORY:]))
    client.set_registered_model_tag(model_name, PREVIOUS_CHAMPION_TAG, history[-2] if len(history) > 1 else "")


def decision_tags(decision: GateDecision, run_id: str) -> dict[str, str]:
    """The version tags that record a gate decision on the challenger: verdict, reasons, every rule, both metrics."""
    tags = {
        GATE_DECISION_TAG: PROMOTED if decision.promote else REFUSED,
        GATE_REASONS_TAG: "; ".join(decision.reasons)[:MAX_TAG_LENGTH],
        GATE_RUN_ID_TAG: run_id,
        GATE_DECIDED_AT_TAG: decision.decided_at,
        GATE_SET_HASH_VERSION_TAG: decision.gate_hash,
        GATE_CHAMPION_VERSION_TAG: decision.champion.version if decision.champion else "none",
    }
    if decision.challenger.calibration_shortfall:
        tags[GATE_CALIBRATION_TAG] = decision.challenger.calibration_shortfall[:MAX_TAG_LENGTH]
    for r in decision.rules:
        tags[gate_rule_tag(r.name)] = f"{'pass' if r.passed else 'FAIL'}: {r.reason}"[:MAX_TAG_LENGTH]
    for role, score in ((CHALLENGER, decision.challenger), (CHAMPION, decision.champion)):
        for k, v in (score.metrics if score else {}).items():
            tags[gate_metric_tag(role, k)] = f"{v:.6g}"
    return tags


def record_decision(decision: GateDecision) -> str:
    """An MLflow run in ``<model>-promotion`` and the decision's version tags on the challenger. Returns the run id."""
    ensure_experiment(f"{decision.model_name}-promotion")
    metrics = {
        f"{role}_{k}": v
        for role, s in ((CHALLENGER, decision.challenger), (CHAMPION, decision.champion))
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
        mlflow.set_tags({"decision": PROMOTED if decision.promote else REFUSED, "model_name": decision.model_name})
        mlflow.log_dict(decision.to_dict(), "decision.json")
    client = MlflowClient()
    for key, value in decision_tags(decision, run.info.run_id).items():
        client.set_model_version_tag(decision.model_name, decision.challenger.version, key, value)
    return run.info.run_id


def move_champion(decision: GateDecision) -> GateDecision:
    """Give ``champion`` to the evaluated challenger, if the gate passed and neither alias moved during the gate."""
    if not decision.promote:
        decision.note = "gate refused: champion unchanged"
        return decision
    client = MlflowClient()
    name, evaluated = decision.model_name, decision.challenger.version
    now = alias_version(name, CHALLENGER)
    if now is None or str(now.version) != evaluated:
        decision.promote = False
        decision.note = (
            f"challenger alias moved to v{getattr(now, 'version', None)} during the gate (evaluated "
            f"v{evaluated}): champion unchanged"
        )
        client.set_model_version_tag(name, evaluated, GATE_DECISION_TAG, REFUSED)
        client.set_model_version_tag(name, evaluated, GATE_NOTE_TAG, decision.note)
        return decision
    current = alias_version(name, CHAMPION)
    expected = decision.champion.version if decision.champion else None
    if (str(current.version) if current else None) != expected:
        decision.promote = False
        decision.note = (
            f"champion moved to v{getattr(current, 'version', None)} during the gate (compared with v{expected}): "
            "unchanged"
        )
        client.set_model_version_tag(name, evaluated, GATE_NOTE_TAG, decision.note)
        return decision
    history = _history(name)
    if expected and (not history or history[-1] != expected):
        history.append(expected)  # a champion set outside the gate (e.g. the demo's first version)
    _set_champion(name, evaluated, [*history, evaluated])
    client.set_model_version_tag(name, evaluated, GATE_PROMOTED_AT_TAG, _now())
    decision.moved = True
    decision.note = f"champion moved to v{evaluated}"
    return decision


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
    client = MlflowClient()
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
    stamp = _now()
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
    client.set_model_version_tag(model_name, target, ROLLBACK_TO_AT_TAG, stamp)
    if current_v:
        client.set_model_version_tag(model_name, current_v, ROLLED_BACK_AT_TAG, stamp)
    return RollbackResult(model_name, current_v, target, run.info.run_id)


def sign_version(model_name: str, score: ModelScore, key_path: str) -> str:
    """Sign a gated version's content digest and store the signature as its version tag (``SIGNATURE_TAG``), which
    the line's client writes beside the bundle: a line that requires signatures then runs gated bundles only.
    Returns the key's fingerprint; the key itself is read from its file and goes nowhere else."""
    from inspector.signing import load_private_key, signature_record

    if not score.content_digest:
        raise GateError(f"{model_name} v{score.version}: the bundle has no content digest to sign (schema before 3)")
    record = signature_record(score.content_digest, load_private_key(key_path))
    MlflowClient().set_model_version_tag(model_name, score.version, SIGNATURE_TAG, json.dumps(record))
    return str(record["key_sha256"])
