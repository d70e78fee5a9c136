"""The input size follows the parts' aspect: portrait parts get a portrait input, at a fixed pixel budget."""

from __future__ import annotations

import pytest

from pipelines.recipe import Recipe, auto_input_size, resolve_input_size


def test_portrait_parts_get_a_portrait_input() -> None:
    # the magnetic tiles: median 270 wide x 324 high
    assert auto_input_size([(270, 324), (250, 330), (300, 310)], 81920) == (320, 256)


def test_square_and_landscape() -> None:
    assert auto_input_size([(500, 500)], 81920) == (288, 288)
    h, w = auto_input_size([(640, 320)] * 3, 81920)
    assert w > h and w % 32 == 0 and h % 32 == 0 and abs(h * w - 81920) / 81920 < 0.15


def test_extreme_aspect_is_capped_and_bad_input_refused() -> None:
    h, w = auto_input_size([(50, 1000)], 81920)
    assert h / w < 2.25  # capped at 2, up to rounding to whole cells
    with pytest.raises(ValueError, match="no image sizes"):
        auto_input_size([], 81920)
    with pytest.raises(ValueError, match="below one"):
        auto_input_size([(10, 10)], 100)


def test_resolve_only_when_asked() -> None:
    fixed = Recipe(input_pixels=None)
    assert resolve_input_size(fixed, [(100, 400)]) is fixed
    auto = resolve_input_size(Recipe(input_pixels=81920), [(270, 324)])
    assert (auto.preprocess.height, auto.preprocess.width) == (320, 256)


def test_explicit_size_override_turns_auto_off() -> None:
    from pipelines.settings import apply_overrides

    assert Recipe().input_pixels is not None  # the default follows the parts
    fixed = apply_overrides(Recipe(), {"preprocess.height": "256"})
    assert fixed.input_pixels is None and fixed.preprocess.height == 256
    both = apply_overrides(Recipe(), {"preprocess.height": "256", "input_pixels": "50176"})
    assert both.input_pixels == 50176
