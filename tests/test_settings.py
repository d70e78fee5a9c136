"""Typed run settings: dotted overrides from flags and files, with clear errors for unknown keys and bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.recipe import Recipe
from pipelines.settings import PipelineSettings, apply_overrides, load_overrides


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"train": {"epochs": 2, "lr": 0.01}, "embedder": {"feature_stages": [2, 3]}}))
    recipe = apply_overrides(Recipe(), load_overrides(cfg, ["train.epochs=5", "preprocess.resize=stretch", "synthetic_fraction=none"]))
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
