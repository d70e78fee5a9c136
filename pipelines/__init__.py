"""Orchestration: Prefect flows and MLflow registry work over `models` (torch) and `inspector` (the line scorer)."""
