"""One configuration mechanism for the ``pipelines`` program: typed models, read once at the entry point.

A training run is the recipe (what is trained: :class:`pipelines.recipe.Recipe`) plus :class:`PipelineSettings`
(where things go). Both are validated by pydantic: the settings are a pydantic-settings model, the recipe a tree
of frozen dataclasses validated as one pydantic type (its leaves live in ``inspector`` and ``models``, which keep
plain dataclasses so the line installs without the training stack). Values come from, lowest first:

1. the defaults;
2. a config file, ``--config FILE`` in JSON or YAML (nested objects or dotted keys);
3. environment variables with the program's one prefix, ``INSPECTOR_PIPELINE_``: ``INSPECTOR_PIPELINE_<FIELD>`` for
   a setting, ``INSPECTOR_PIPELINE_RECIPE__<KEY>__<KEY>`` for a recipe value (``__`` for the dots);
4. ``--set key=value`` flags (dotted keys into the recipe, e.g. ``train.epochs=3``).

Every source goes through :func:`apply_overrides`, so an unknown key or a bad value is the same clear error
wherever it came from. The resolved recipe is what the run logs to MLflow as its params.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import Field, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from pipelines.recipe import Recipe

#: the one environment prefix of the ``pipelines`` program
ENV_PREFIX = "INSPECTOR_PIPELINE_"
#: recipe values in the environment: ``INSPECTOR_PIPELINE_RECIPE__TRAIN__EPOCHS=3`` is ``train.epochs=3``
RECIPE_ENV_PREFIX = ENV_PREFIX + "RECIPE__"

_NULLS = ("", "none", "null", "~")


class PipelineSettings(BaseSettings):
    """Where a training run reads and writes; the recipe itself is the separate, fully typed :class:`Recipe`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", protected_namespaces=())

    work_dir: Path = Field(Path("runs"), description="checkpoints, bundles and the default MLflow store live here")
    experiment: str = Field("parts", description="MLflow experiment, one per product line")
    model_name: str = Field("parts-inspector", description="registered model name")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite under work_dir)")
    group_pattern: str | None = Field(
        None, description="regex with one numeric group: images within group_gap form one group"
    )
    group_gap: int = Field(0, ge=0)
    group_by_folder: bool = Field(
        False, description="the images of one folder are one capture group (goods kept by date, shift or camera)"
    )
    baseline: bool = Field(
        True, description="also evaluate the frozen baseline (the run's trunk, pooled) on the same test split"
    )


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON or YAML file (by its suffix: ``.yaml``/``.yml`` are YAML) as a mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds settings by name (an object), got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """A ``--set`` or environment string as a value pydantic then checks against the field's type: ``none``/``null``
    is None, ``[…]``/``{…}`` is YAML, ``a,b`` is a list; anything else stays a string (pydantic reads numbers and
    booleans from strings)."""
    value = text.strip()
    if value.lower() in _NULLS:
        return None
    if value[:1] in ("[", "{"):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"cannot read {text!r} ({exc})") from None
    if "," in value:
        return [parse_value(item) for item in value.split(",") if item.strip()]
    return value


def parse_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", …]`` → ``{"train.epochs": "3", …}`` (values through :func:`parse_value`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def environment_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Recipe values set in the environment (``INSPECTOR_PIPELINE_RECIPE__TRAIN__EPOCHS=3``) as dotted overrides."""
    env = os.environ if environ is None else environ
    return {
        name[len(RECIPE_ENV_PREFIX) :].lower().replace("__", "."): parse_value(value)
        for name, value in sorted(env.items())
        if name.upper().startswith(RECIPE_ENV_PREFIX) and value.strip()
    }


def load_overrides(path: Path | None, pairs: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every recipe override of one run, as dotted keys: the config file, then the environment, then ``--set``
    (each later source wins). ``environ`` defaults to the process environment; pass ``{}`` to ignore it."""
    out: dict[str, Any] = {}
    if path is not None:
        out.update(flatten(read_config_file(path)))
    out.update(environment_overrides(environ))
    out.update(parse_pairs(pairs))
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings → dotted keys (``{"train": {"epochs": 3}}`` → ``{"train.epochs": 3}``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """A new recipe with dotted-key overrides applied and the whole recipe validated again (pydantic).

    An unknown key is a ``KeyError`` that lists the keys there are; a value of the wrong type a ``ValueError`` naming
    the key. An explicit ``preprocess.height``/``preprocess.width`` means a fixed input size: it turns off the
    automatic size (``input_pixels``) unless that is set in the same overrides. An ``embedder.backbone`` brings the
    values that go with that trunk (``pipelines.recipe.trunk_overrides``: its normalisation, its patch reading),
    except those set in the same overrides.
    """
    if "embedder.backbone" in overrides:
        from pipelines.recipe import trunk_overrides

        mode = overrides.get("embedder.mode", recipe.embedder.mode)
        overrides = {**trunk_overrides(str(overrides["embedder.backbone"]), str(mode)), **overrides}
    data = dataclasses.asdict(recipe)
    for key, value in overrides.items():
        _set_path(data, key.split("."), value, key)
    if {"preprocess.height", "preprocess.width"} & set(overrides) and "input_pixels" not in overrides:
        data["input_pixels"] = None
    try:
        return _recipe_type().validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"bad recipe setting: {problems}") from None


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """A recipe from its ``dataclasses.asdict`` form (e.g. read back from JSON), validated like any override."""
    return apply_overrides(_recipe_type().validate_python(dict(data)), {})


@cache
def _recipe_type() -> TypeAdapter[Recipe]:
    """The recipe's validator, built on first use: importing this module must not import torch (deployments and
    the gate read their settings here)."""
    from pipelines.recipe import Recipe

    return TypeAdapter(Recipe)


def _set_path(data: dict[str, Any], parts: list[str], value: Any, full_key: str) -> None:
    name = parts[0]
    if name not in data:
        raise KeyError(f"unknown setting {full_key!r}: choose from {sorted(data)}")
    if len(parts) == 1:
        many = isinstance(data[name], (tuple, list)) and value is not None and not isinstance(value, (tuple, list))
        data[name] = [value] if many else value  # ``feature_stages=3`` is one stage
        return
    if not isinstance(data[name], dict):
        raise KeyError(f"unknown setting {full_key!r}: {name!r} has no settings of its own")
    _set_path(data[name], parts[1:], value, full_key)
