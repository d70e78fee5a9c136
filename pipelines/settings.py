"""Typed settings of a training run: the recipe (what is trained) plus where things go (data, MLflow, outputs).

One object, with defaults that work, overridable from a JSON/YAML file, ``--set key=value`` flags (dotted keys
into the recipe, e.g. ``train.epochs=3``) and ``INSPECTOR_PIPELINE_*`` environment variables; the same object is
logged to MLflow as the run's params.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Union

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.recipe import Recipe


class PipelineSettings(BaseSettings):
    """Where a training run reads and writes; the recipe itself is a separate, fully typed dataclass tree."""

    model_config = SettingsConfigDict(env_prefix="INSPECTOR_PIPELINE_", extra="forbid", protected_namespaces=())

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
    baseline: bool = Field(True, description="also evaluate the frozen ImageNet baseline on the same test split")


def _coerce(value: str, annotation: Any) -> Any:
    """Parse a ``--set`` string into the field's declared type (bool, int, float, tuple, optional, literal)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"cannot read {value!r} as {annotation}")
    if origin is typing.Literal:
        for arg in args:
            if str(arg) == value:
                return arg
        raise ValueError(f"{value!r} is not one of {list(args)}")
    if origin is tuple or annotation is tuple:
        items = [v for v in value.strip("()[] ").split(",") if v.strip()]
        inner = args[0] if args else str
        return tuple(_coerce(v.strip(), inner) for v in items)
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if annotation in (int, float, str):
        return annotation(value)
    return json.loads(value)


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """A new recipe with dotted-key overrides applied (``{"train.epochs": "3", "seed": 1}``); unknown keys are errors.

    An explicit ``preprocess.height``/``preprocess.width`` means a fixed input size: it turns off the automatic
    size (``input_pixels``) unless that is set in the same overrides.
    """
    for key, value in overrides.items():
        recipe = _replace_path(recipe, key.split("."), value, key)
    if {"preprocess.height", "preprocess.width"} & set(overrides) and "input_pixels" not in overrides:
        recipe = dataclasses.replace(recipe, input_pixels=None)
    return recipe


def _replace_path(obj: Any, parts: list[str], value: Any, full_key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = parts[0]
    if name not in fields:
        raise KeyError(f"unknown setting {full_key!r}: {type(obj).__name__} has {sorted(fields)}")
    if len(parts) > 1:
        return dataclasses.replace(obj, **{name: _replace_path(getattr(obj, name), parts[1:], value, full_key)})
    hints = typing.get_type_hints(type(obj))
    new = _coerce(value, hints[name]) if isinstance(value, str) else value
    return dataclasses.replace(obj, **{name: new})


def load_overrides(path: Path | None, pairs: list[str]) -> dict[str, Any]:
    """Overrides from a JSON file (flat dotted keys or nested objects) and ``key=value`` strings (these win)."""
    out: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read config ({exc})") from None
        out.update(_flatten(data))
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat
