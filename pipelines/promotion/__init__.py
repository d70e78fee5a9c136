"""The promotion gate: ``challenger`` replaces ``champion`` only when it is at least as good on a frozen gate set.

Both versions are fetched with the line's own registry client and cache and scored by ``inspector`` (the line's
code) on the same gate images, so the gate tests exactly what the line will load. The decision, both models'
metrics and the reasons go to version tags on the challenger and to an MLflow run in ``<model>-promotion``;
``champion`` moves last, and only if ``challenger`` still points at the version that was evaluated. A rollback
moves ``champion`` back along a history kept on the registered model.

- :mod:`~pipelines.promotion.rules`: what a challenger must meet and the decision (pure);
- :mod:`~pipelines.promotion.gate_set`: the frozen gate images;
- :mod:`~pipelines.promotion.evaluation`: one version fetched as the line fetches it, scored on the gate set;
- :mod:`~pipelines.promotion.registry_ops`: alias moves, rollback, decision tags;
- :mod:`~pipelines.promotion.flow`: the Prefect flow that runs them in order.
"""

from pipelines.promotion.evaluation import score_version
from pipelines.promotion.flow import promote_flow
from pipelines.promotion.gate_set import GateSet, changed_gate_images, gate_set_from_folder, load_gate_set
from pipelines.promotion.registry_ops import (
    GateError,
    RollbackResult,
    alias_version,
    move_champion,
    record_decision,
    rollback,
)
from pipelines.promotion.rules import GateDecision, GateRules, ModelScore, RuleResult, decide, evaluate_rules

__all__ = [
    "GateDecision",
    "GateError",
    "GateRules",
    "GateSet",
    "ModelScore",
    "RollbackResult",
    "RuleResult",
    "alias_version",
    "changed_gate_images",
    "decide",
    "evaluate_rules",
    "gate_set_from_folder",
    "load_gate_set",
    "move_champion",
    "promote_flow",
    "record_decision",
    "rollback",
    "score_version",
]
