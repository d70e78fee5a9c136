"""The gate's rules and its decision: pure functions over what was measured, so every verdict is testable alone.

A bad model must never reach the line, so every rule has to pass, each with a reason a person can read:

- ``gate_set``: the gate manifest's hash equals the pinned one (``GateRules.gate_hash``, else the registered
  model's ``gate_set_hash`` tag, pinned by the first gate that ran) and every gate image still has its sha256;
- ``bundle_integrity``: both bundles load as the line loads them (its client and cache: manifest hashes, schema,
  and the hashes recorded on the version at registration);
- ``onnx_parity``: the torch-vs-ONNX difference *recorded in the bundle at export* (``model.parity_max_abs_diff``,
  measured on real images by ``models.export.check_parity``) is present and within ``max_parity_diff``. It is not
  re-run: that needs the torch weights, which the registry's bundle deliberately does not carry;
- ``min_auroc`` (absolute floor), ``no_regression`` (AUROC ≥ champion's − tolerance; with no champion yet the
  absolute rules decide), ``false_reject_rate`` and ``escape_rate`` at the challenger's own threshold, and
  ``min_pixel_auroc`` when asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.promotion.gate_set import GateSet
from pipelines.settings import parse_pairs


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
        for key, value in parse_pairs(pairs).items():
            if key not in cls.model_fields:
                raise ValueError(f"unknown gate rule {key!r}: rules are {sorted(cls.model_fields)}")
            values[key] = value
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
    """One registered version on the gate set: where it came from, whether the line could load it, its metrics."""

    alias: str
    version: str
    run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    bundle_error: str | None = None  # why the line would refuse this version's bundle
    parity: float | None = None
    threshold: float | None = None
    scored: int = 0
    score_errors: int = 0
    #: the bundle's calibration goods were too few to resolve its target false-reject rate (a warning, not a rule)
    calibration_shortfall: str | None = None
    #: the bundle's content digest (``manifest_sha256``): what the gate signs when it promotes with a key
    content_digest: str | None = None


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


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _metric(score: ModelScore | None, name: str) -> float | None:
    if score is None or score.bundle_error:
        return None
    value = score.metrics.get(name)
    return None if value is None or math.isnan(value) else float(value)


def _gate_set_rule(gate_hash: str, pinned_hash: str | None, changed_images: Sequence[str]) -> RuleResult:
    if pinned_hash and pinned_hash != gate_hash:
        return RuleResult(
            "gate_set", False, f"gate manifest hash {gate_hash[:12]}… is not the pinned {pinned_hash[:12]}…"
        )
    if changed_images:
        return RuleResult(
            "gate_set",
            False,
            f"{len(changed_images)} gate images changed since the manifest: {list(changed_images)[:3]}",
        )
    pinned = "matches the pinned hash" if pinned_hash else "pinned now (first gate)"
    return RuleResult("gate_set", True, f"gate set {gate_hash[:12]}… {pinned}")


def _integrity_rule(challenger: ModelScore, champion: ModelScore | None) -> RuleResult:
    problems = []
    if challenger.bundle_error:
        problems.append(f"challenger v{challenger.version}: {challenger.bundle_error}")
    if champion is not None and champion.bundle_error:
        problems.append(f"champion v{champion.version}: {champion.bundle_error}")
    if not challenger.bundle_error and challenger.score_errors:
        problems.append(
            f"challenger could not score {challenger.score_errors} of "
            f"{challenger.scored + challenger.score_errors} gate images"
        )
    return RuleResult(
        "bundle_integrity",
        not problems,
        "; ".join(problems) or "bundles verified as the line loads them (sha256 of every file and registry tags)",
    )


def _parity_rule(challenger: ModelScore, rules: GateRules) -> RuleResult:
    if challenger.bundle_error:
        return RuleResult("onnx_parity", False, "challenger bundle not verified")
    if challenger.parity is None:
        return RuleResult("onnx_parity", False, "no parity result recorded in the bundle (model.parity_max_abs_diff)")
    ok = challenger.parity <= rules.max_parity_diff
    return RuleResult(
        "onnx_parity",
        ok,
        f"recorded torch/ONNX max abs diff {challenger.parity:.2e} {'≤' if ok else '>'} {rules.max_parity_diff:.0e}",
    )


def _quality_rules(challenger: ModelScore, champion: ModelScore | None, rules: GateRules) -> list[RuleResult]:
    out: list[RuleResult] = []
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
    out = [_gate_set_rule(gate_hash, pinned_hash, changed_images)]
    if champion is not None and champion.version == challenger.version:
        out.append(
            RuleResult("distinct_versions", False, f"challenger version {challenger.version} is already the champion")
        )
    out.append(_integrity_rule(challenger, champion))
    out.append(_parity_rule(challenger, rules))
    out.extend(_quality_rules(challenger, champion, rules))
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
