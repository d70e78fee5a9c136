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
    pairs = ["train.epochs=5", "preprocess.resize=stretch", "synthetic_fraction=none", "offset_candidates=0,1"]
    recipe = apply_overrides(Recipe(), load_overrides(cfg, pairs, environ={}))
    assert recipe.train.epochs == 5  # the flag beats the file
    assert recipe.train.lr == 0.01
    assert recipe.embedder.feature_stages == (2, 3)
    assert recipe.preprocess.resize == "stretch"
    assert recipe.synthetic_fraction is None
    assert recipe.offset_candidates == (0.0, 1.0)
    assert Recipe().train.epochs != 5, "the default recipe is not mutated"
    assert apply_overrides(Recipe(), {"embedder.feature_stages": "3"}).embedder.feature_stages == (3,)


def test_yaml_config_environment_and_flags_in_that_order(tmp_path: Path) -> None:
    """One mechanism, three sources: the file, then INSPECTOR_PIPELINE_RECIPE__* variables, then --set."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  epochs: 2\n  batch_size: 8\nscoring:\n  k: 3\nseed: 7\n")
    env = {"INSPECTOR_PIPELINE_RECIPE__TRAIN__EPOCHS": "4", "INSPECTOR_PIPELINE_RECIPE__MAX_BANK_PATCHES": "512"}
    recipe = apply_overrides(Recipe(), load_overrides(cfg, ["seed=9"], environ=env))
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.scoring.k) == (4, 8, 3)
    assert recipe.max_bank_patches == 512
    assert recipe.seed == 9
    assert recipe.scoring.offset == Recipe().scoring.offset, "a nested override keeps the recipe's other values"
    dotted = tmp_path / "dotted.yml"
    dotted.write_text("train.epochs: 3\n")
    assert apply_overrides(Recipe(), load_overrides(dotted, [], environ={})).train.epochs == 3


def test_bad_overrides_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown setting 'train.epoch'"):
        apply_overrides(Recipe(), {"train.epoch": "3"})
    with pytest.raises(KeyError, match="'seed' has no settings of its own"):
        apply_overrides(Recipe(), {"seed.value": "3"})
    with pytest.raises(ValueError, match="train.epochs"):
        apply_overrides(Recipe(), {"train.epochs": "many"})
    with pytest.raises(ValueError, match="train.epochs"):
        apply_overrides(Recipe(), load_overrides(None, [], environ={"INSPECTOR_PIPELINE_RECIPE__TRAIN__EPOCHS": "x"}))
    with pytest.raises(ValueError, match="key=value"):
        load_overrides(None, ["epochs"], environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml: cannot read config"):
        load_overrides(broken, [], environ={})
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match="listed.json: a config file holds settings by name"):
        load_overrides(listed, [], environ={})


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECTOR_PIPELINE_EXPERIMENT", "brackets")
    monkeypatch.setenv("INSPECTOR_PIPELINE_RECIPE__TRAIN__EPOCHS", "2")  # a recipe value is not a setting
    assert PipelineSettings().experiment == "brackets"
    assert PipelineSettings(experiment="x").experiment == "x"
    assert load_overrides(None, [])["train.epochs"] == "2", "the process environment is read by default"


def test_deployment_settings_read_yaml_and_the_program_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.deployments import DeploymentSettings

    cfg = tmp_path / "deploy.yaml"
    cfg.write_text("retrain_cron: '30 3 * * 1-5'\nretrain_parameters:\n  data: /srv/images\n")
    loaded = DeploymentSettings.load(cfg)
    assert (loaded.retrain_cron, loaded.retrain_parameters) == ("30 3 * * 1-5", {"data": "/srv/images"})
    monkeypatch.setenv("INSPECTOR_PIPELINE_DEPLOY_TIMEZONE", "Europe/Berlin")
    assert DeploymentSettings().timezone == "Europe/Berlin"
    cfg.write_text("retrain_crom: daily\n")
    with pytest.raises(ValueError, match="deploy.yaml: bad deployment settings"):
        DeploymentSettings.load(cfg)


def test_line_runtime_settings_come_from_the_entry_point_not_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine reads no environment: INSPECTOR_* reaches it only through the settings an entry point builds."""
    from inspector.engine import default_streams
    from inspector.errors import InspectorError
    from inspector.settings import RuntimeSettings

    env = {"INSPECTOR_THREADS": "3", "INSPECTOR_STREAMS": "2", "INSPECTOR_ORT_SPIN": "true"}
    runtime = RuntimeSettings.from_env(env)
    assert runtime.engine_options() == {"threads": 3, "streams": 2, "spinning": True}
    assert RuntimeSettings.from_env(env, streams=1, threads=None).engine_options()["streams"] == 1  # flags win
    with pytest.raises(InspectorError, match="streams"):
        RuntimeSettings.from_env({"INSPECTOR_STREAMS": "0"})
    monkeypatch.setenv("INSPECTOR_STREAMS", "5")
    assert default_streams(2, ["CPUExecutionProvider"]) == 2
    assert default_streams(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == 1


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
