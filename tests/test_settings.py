"""Typed run settings: dotted overrides from flags and files, with clear errors for unknown keys and bad values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.recipe import Recipe
from pipelines.settings import PipelineSettings, apply_overrides, load_overrides


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"train": {"epochs": 2, "lr": 0.01}, "embedder": {"feature_stages": [2, 3]}}))
    recipe = apply_overrides(
        Recipe(), load_overrides(cfg, ["train.epochs=5", "preprocess.resize=stretch", "synthetic_fraction=none"])
    )
    assert recipe.train.epochs == 5 and recipe.train.lr == 0.01  # the flag beats the file
    assert recipe.embedder.feature_stages == (2, 3)
    assert recipe.preprocess.resize == "stretch" and recipe.synthetic_fraction is None
    assert Recipe().train.epochs != 5, "the default recipe is not mutated"


def test_bad_overrides_are_clear_errors() -> None:
    with pytest.raises(KeyError, match="unknown setting 'train.epoch'"):
        apply_overrides(Recipe(), {"train.epoch": "3"})
    with pytest.raises(ValueError):
        apply_overrides(Recipe(), {"train.epochs": "many"})
    with pytest.raises(ValueError, match="key=value"):
        load_overrides(None, ["epochs"])


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECTOR_PIPELINE_EXPERIMENT", "brackets")
    assert PipelineSettings().experiment == "brackets"
    assert PipelineSettings(experiment="x").experiment == "x"


def test_cli_environment_gives_the_ephemeral_prefect_server_time_to_start() -> None:
    """`make demo` on a 2-core machine busy with training timed out at Prefect's 20 s default; the CLI's default must
    reach Prefect's own settings (a misspelt variable would be silently ignored), and a user's value must win."""
    probe = (
        "from pipelines import default_env; default_env(); "
        "from prefect.settings import get_current_settings; "
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)"
    )
    for env_value, expected in [(None, "120"), ("45", "45")]:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
        if env_value is not None:
            env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = env_value
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env, check=True
        )
        assert out.stdout.strip().splitlines()[-1] == expected


def test_summary_table_says_why_a_figure_is_missing() -> None:
    from pipelines.cli import summary_table

    table = summary_table(
        {
            "test_image_auroc": float("nan"),
            "test_false_reject_rate": 0.04,
            "baseline_test_image_auroc": float("nan"),
            "baseline_test_false_reject_rate": 0.0,
        }
    )
    assert "nan" not in table and table.count("n/a") >= 3 and "0.040" in table
    assert "lacks good or defective parts" in table
    full = summary_table({"test_image_auroc": 0.9, "baseline_test_image_auroc": 0.7})
    assert "0.900" in full and "0.700" in full and "n/a" not in full
