"""Deployments of the retraining and promotion flows, served from one host (``pipelines serve-deployments``).

Two ways to run them, same flows and parameters:

- one host, no work pool: :func:`serve_deployments` (``prefect.serve``) creates both deployments with their cron
  schedules on the Prefect server and runs their flow runs in subprocesses of this process;
- a GPU training host with a worker: ``deploy/prefect.yaml`` (``prefect deploy --all``) puts them in the
  ``inspector-training`` process work pool and ``prefect worker start --pool inspector-training`` runs them.

Parameters come from a JSON or YAML file (``--config``) or ``INSPECTOR_PIPELINE_DEPLOY_*`` environment variables
(the ``pipelines`` program's one prefix, :mod:`pipelines.settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.settings import ENV_PREFIX, read_config_file

RETRAIN_DEPLOYMENT = "retrain-nightly"
PROMOTE_DEPLOYMENT = "promote-on-demand"
WORK_POOL = "inspector-training"


class DeploymentSettings(BaseSettings):
    """Schedules and parameters of the two deployments."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX + "DEPLOY_", extra="forbid")

    retrain_cron: str = Field("0 2 * * *", description="when retraining runs (cron, in `timezone`)")
    timezone: str = Field("UTC")
    promote_cron: str | None = Field(None, description="optional schedule for re-gating the current challenger")
    retrain_parameters: dict[str, Any] = Field(
        default_factory=dict, description="parameters of retrain_flow (gate_manifest, data, …)"
    )
    promote_parameters: dict[str, Any] = Field(
        default_factory=dict, description="parameters of promote_flow (model_name, gate_manifest, …)"
    )
    tags: list[str] = Field(default_factory=lambda: ["inspector"])

    @classmethod
    def load(cls, path: Path | None) -> DeploymentSettings:
        if path is None:
            return cls()
        try:
            return cls(**read_config_file(path))
        except ValidationError as exc:
            raise ValueError(f"{path}: bad deployment settings ({exc})") from None


def _schedules(cron: str | None, timezone: str) -> list[Any]:
    from prefect.schedules import Cron

    return [Cron(cron, timezone=timezone)] if cron else []


def build_deployments(settings: DeploymentSettings) -> list[Any]:
    """The two ``RunnerDeployment`` objects (not yet registered with the server)."""
    from pipelines.promotion import promote_flow
    from pipelines.retrain import retrain_flow

    return [
        retrain_flow.to_deployment(
            RETRAIN_DEPLOYMENT,
            schedules=_schedules(settings.retrain_cron, settings.timezone),
            parameters=settings.retrain_parameters,
            tags=settings.tags,
            description="Nightly: retrain on new images, register a challenger, run the promotion gate.",
        ),
        promote_flow.to_deployment(
            PROMOTE_DEPLOYMENT,
            schedules=_schedules(settings.promote_cron, settings.timezone),
            parameters=settings.promote_parameters,
            tags=settings.tags,
            description="Gate the current challenger against the champion; move champion only if every rule passes.",
        ),
    ]


def serve_deployments(settings: DeploymentSettings, *, dry_run: bool = False) -> list[Any]:
    """Register both deployments and serve them from this process until interrupted (``dry_run``: only build)."""
    deployments = build_deployments(settings)
    for d in deployments:
        crons = [getattr(s.schedule, "cron", None) for s in d.schedules]
        print(f"{d.flow_name}/{d.name}: schedules {crons}, parameters {d.parameters}")
    if not dry_run:
        from prefect import serve

        serve(*deployments, pause_on_shutdown=False)
    return deployments
