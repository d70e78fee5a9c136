"""Orchestration: Prefect flows and MLflow registry work over `models` (torch) and `inspector` (the line scorer)."""

import os


def default_env() -> None:
    """Environment defaults for local runs, each overridable: no albumentations update check, no Prefect telemetry,
    and two minutes (not Prefect's 20 s) for the ephemeral Prefect server to start, which a 2-core machine busy with
    training missed: ``make demo`` then failed with "Timed out while attempting to connect to ephemeral Prefect API
    server"."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
