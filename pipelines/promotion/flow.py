"""The promotion flow: read the gate set and both aliases, score both versions as the line loads them, decide,
record, and only then move ``champion``.

A failed or partial run never moves ``champion``: anything that raises (unreadable gate set, no challenger, the
registry down) raises before the last step, and the last step moves the alias only when every rule passed and
neither alias moved during the gate.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from inspector.registry import RegistrySource
from inspector.registry_contract import CHALLENGER, CHAMPION
from pipelines.line_registry import line_registry_source
from pipelines.promotion.evaluation import score_version
from pipelines.promotion.gate_set import GateSet, changed_gate_images, load_gate_set
from pipelines.promotion.registry_ops import (
    GateError,
    alias_version,
    move_champion,
    pin_gate_hash,
    pinned_gate_hash,
    record_decision,
    sign_version,
)
from pipelines.promotion.rules import GateDecision, GateRules, ModelScore, decide


@task(cache_policy=NO_CACHE)
def load_gate_task(gate_manifest: str) -> GateSet:
    return load_gate_set(Path(gate_manifest))


@task(cache_policy=NO_CACHE)
def score_task(model_name: str, alias: str, version: Any, gate: GateSet, registry: RegistrySource) -> ModelScore:
    score = score_version(model_name, alias, version, gate, registry)
    get_run_logger().info(
        "%s v%s: %s%s",
        alias,
        score.version,
        {k: round(v, 4) for k, v in score.metrics.items()},
        f" (bundle: {score.bundle_error})" if score.bundle_error else "",
    )
    return score


@task(cache_policy=NO_CACHE)
def sign_task(model_name: str, challenger: ModelScore, signing_key: str) -> str:
    key_id = sign_version(model_name, challenger, signing_key)
    get_run_logger().info("signed v%s with key %s…", challenger.version, key_id[:12])
    return key_id


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
    signing_key: str | None = None,
) -> dict[str, Any]:
    """Gate ``challenger`` against ``champion`` on the frozen gate set; move ``champion`` only if every rule passes.

    With ``signing_key`` (the path of an Ed25519 private key, PEM) a challenger that passes is signed before
    anything is recorded or moved, so a line that requires signatures runs gated bundles only; a key that cannot
    sign stops the run with ``champion`` unchanged.

    Returns the decision as a dict (``promote``, ``moved``, ``rules``, both models' metrics, ``reasons``).
    Raises (moving nothing) when the gate set is unreadable, there is no challenger, or the registry is down.
    """
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    rules = rules if isinstance(rules, GateRules) else GateRules(**(rules or {}))
    gate = load_gate_task(gate_manifest)
    challenger_version = alias_version(model_name, CHALLENGER)
    if challenger_version is None:
        raise GateError(f"{model_name}: no version has the alias {CHALLENGER!r}; train one first")
    champion_version = alias_version(model_name, CHAMPION)
    pinned = rules.gate_hash or pinned_gate_hash(model_name)
    with tempfile.TemporaryDirectory(prefix="gate-") as cache:
        registry = line_registry_source(Path(cache))
        challenger = score_task(model_name, CHALLENGER, challenger_version, gate, registry)
        champion = (
            score_task(model_name, CHAMPION, champion_version, gate, registry) if champion_version is not None else None
        )
        decision = decide(model_name, challenger, champion, rules, gate, pinned, changed_gate_images(gate))
    if decision.promote and signing_key:
        sign_task(model_name, challenger, signing_key)
    record_task(decision)
    if not pinned and decision.rules[0].passed:
        pin_gate_hash(model_name, gate.hash)
    decision = move_task(decision)
    print(f"gate {'PASSED' if decision.promote else 'REFUSED'} for {model_name} v{challenger.version}: {decision.note}")
    for r in decision.rules:
        print(f"  [{'pass' if r.passed else 'FAIL'}] {r.name}: {r.reason}")
    if challenger.calibration_shortfall:
        print(f"  [warn] calibration: {challenger.calibration_shortfall}")
    return decision.to_dict()
