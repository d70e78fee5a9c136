"""Static INT8 quantisation of a bundle: a verifiable new bundle, small measured drift, parent untouched, CLI codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.bundle import MODEL_FILE, load_bundle, sha256_file
from inspector.cli import main
from inspector.engine import Inspector
from inspector.quantize import QuantizeError, quantize_bundle

# Measured on the tiny patch CNN (scores 0.6-0.95, threshold 0.5): max |score fp32 - int8| ~0.017 on the calibration
# images and ~0.013 on held-out images; 0.05 leaves ~3x headroom while still catching a broken quantisation.
SCORE_TOLERANCE = 0.05


def _pngs(folder: Path, n: int, seed: int, prefix: str = "c") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _snapshot(bundle: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(bundle.iterdir())}


@pytest.fixture(scope="module")
def quantized(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, str], dict[str, str]]:
    tmp = tmp_path_factory.mktemp("quantize")
    before = _snapshot(tiny_bundle)
    out = quantize_bundle(tiny_bundle, _pngs(tmp / "calib", 16, seed=1), tmp / "q")
    return out, before, _snapshot(tiny_bundle)


def test_quantized_bundle_verifies_and_scores_close_to_fp32(
    tiny_bundle: Path, quantized: tuple, tmp_path: Path
) -> None:
    out, _, _ = quantized
    parent, child = load_bundle(tiny_bundle), load_bundle(out)
    assert sha256_file(child.model_path) != sha256_file(parent.model_path)
    assert child.model_path.stat().st_size < parent.model_path.stat().st_size / 2
    np.testing.assert_array_equal(child.references, parent.references)
    assert child.spec.threshold == parent.spec.threshold
    assert child.spec.preprocessing == parent.spec.preprocessing and child.spec.scoring == parent.spec.scoring
    prov = child.spec.provenance
    assert prov["quantized"] == "int8-static"
    assert prov["parent_bundle"]["manifest_sha256"] == sha256_file(tiny_bundle / "inspector.json")
    q = prov["quantization"]
    assert q["format"] == "QDQ" and q["calibration"]["images"] == 16
    assert (
        q["model_bytes"]["fp32"] == parent.model_path.stat().st_size
        and q["model_bytes"]["int8"] == child.model_path.stat().st_size
    )
    assert 0 < q["drift"]["score_abs_diff_max"] < SCORE_TOLERANCE and q["drift"]["verdict_flips"] == 0
    assert child.model_version == "tiny:1+int8"

    held_out = _pngs(tmp_path / "held", 8, seed=7, prefix="h")  # not seen by calibration
    fp32 = [r.score for r in Inspector(parent).score(held_out)]
    int8 = [r.score for r in Inspector(child).score(held_out)]
    assert all(s is not None for s in int8)
    assert np.max(np.abs(np.array(fp32) - np.array(int8))) < SCORE_TOLERANCE


def test_parent_bundle_unchanged(tiny_bundle: Path, quantized: tuple) -> None:
    _, before, after = quantized
    assert before == after
    load_bundle(tiny_bundle)


def test_too_few_calibration_images_refused(tiny_bundle: Path, tmp_path: Path, bad_images: dict[str, Path]) -> None:
    images = _pngs(tmp_path / "few", 7, seed=2) + [bad_images["truncated"], bad_images["text"]]
    with pytest.raises(QuantizeError, match="only 7 calibration image"):
        quantize_bundle(tiny_bundle, images, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_refuses_existing_output_and_requantizing(tiny_bundle: Path, quantized: tuple, tmp_path: Path) -> None:
    images = _pngs(tmp_path / "c", 8, seed=3)
    with pytest.raises(QuantizeError, match="not the input bundle"):
        quantize_bundle(tiny_bundle, images, tiny_bundle)
    (tmp_path / "taken").mkdir()
    with pytest.raises(QuantizeError, match="already exists"):
        quantize_bundle(tiny_bundle, images, tmp_path / "taken")
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_bundle(quantized[0], images, tmp_path / "qq")


def test_cli_quantize_summary_and_exit_codes(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "calib"
    _pngs(folder, 10, seed=4)
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_bundle), str(folder), "--out", str(out), "--max-images", "9"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["calibration_images"] == 9
    assert summary["model_bytes"]["int8"] < summary["model_bytes"]["fp32"]
    assert summary["images_per_second"]["fp32"] > 0 and summary["images_per_second"]["int8"] > 0
    assert summary["drift"]["score_abs_diff_max"] < SCORE_TOLERANCE
    assert main(["check", str(out)]) == 0
    capsys.readouterr()

    assert main(["quantize", str(tiny_bundle), str(folder), "--out", str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    few = tmp_path / "few"
    _pngs(few, 3, seed=5)
    assert main(["quantize", str(tiny_bundle), str(few), "--out", str(tmp_path / "q2")]) == 2
    assert "at least 8" in capsys.readouterr().err
    assert main(["quantize", str(tiny_bundle), str(tmp_path / "missing"), "--out", str(tmp_path / "q3")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nobundle"), str(folder), "--out", str(tmp_path / "q4")]) == 2
    assert not (tmp_path / "q2").exists() and not (tmp_path / "q3").exists() and not (tmp_path / "q4").exists()
    assert MODEL_FILE in {p.name for p in out.iterdir()}
