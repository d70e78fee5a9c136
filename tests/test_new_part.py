"""A new part type from a few golden photos: a real ONNX embedder that never saw the part, real image files, real
onnxruntime; the CLI end to end, what it promises, and what it refuses by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inspector.bundle import load_bundle
from inspector.calibration import frr_upper_bound
from inspector.cli import main
from inspector.engine import Inspector
from inspector.new_part import NEW_PART_KEY, new_part, promise_statement
from inspector.references import ReferencesError
from tests.parts import striped_parts, with_spot


@pytest.fixture(scope="module")
def striped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """A part type the density bundle's embedder never saw (striped, wider than tall): 8 goldens, 6 later goods,
    6 defects (a dark spot), 2 extra goods."""
    tmp = tmp_path_factory.mktemp("striped")
    rng = np.random.default_rng(3)
    files: dict[str, list[Path]] = {}
    for name, n in (("goldens", 8), ("later", 6), ("defects", 6), ("extra", 2)):
        files[name] = []
        for i, img in enumerate(striped_parts(rng, n)):
            path = tmp / f"{name}{i}.png"
            (with_spot(img, rng) if name == "defects" else img).save(path)
            files[name].append(path)
    return files


def _scores(bundle: Path, paths: list[Path]) -> np.ndarray:
    results = Inspector.from_bundle(bundle, threads=1).score(paths)
    assert all(r.error is None for r in results), results
    return np.array([r.score for r in results])


def test_new_part_cli_end_to_end(
    density_bundle: tuple[Path, dict[str, list[Path]]],
    striped: dict[str, list[Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle, _ = density_bundle
    goldens = [str(p) for p in striped["goldens"]]
    assert main(["new-part", str(bundle), *goldens, "--out", str(tmp_path / "striped"), "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["part"] == "striped" and summary["goldens"] == 8 and summary["whole_part_score"] is True
    assert "8 goldens (each scored against the other 7)" in summary["promise"]
    assert f"≤ {frr_upper_bound(0, 8) * 100:.0f} %" == "≤ 31 %" and "≤ 31 % at 95 %" in summary["promise"]
    assert "fixed at 32x32" in summary["input_size"]["reason"]  # the export's height and width are static

    new = load_bundle(tmp_path / "striped")  # verified: hashes and the manifest's own digest
    parent = load_bundle(bundle)
    assert new.manifest["files"]["model.onnx"] == parent.manifest["files"]["model.onnx"]  # the same embedder
    assert new.descriptors is not None and len(new.descriptors) == 8
    assert new.spec.density is not None and parent.spec.density is not None
    assert (new.spec.density.combine, parent.spec.density.combine) == ("max", "mean")  # goldens alone: the larger
    assert new.spec.provenance[NEW_PART_KEY]["embedder"] == parent.model_version
    assert new.spec.threshold.details["n_good"] == 8
    later, defects = _scores(new.path, striped["later"]), _scores(new.path, striped["defects"])
    assert defects.min() > later.max()  # every defect above every held-out good
    assert (later <= new.spec.threshold.value).all() and (defects > new.spec.threshold.value).all()


def test_new_part_threshold_from_extra_goods(
    density_bundle: tuple[Path, dict[str, list[Path]]], striped: dict[str, list[Path]], tmp_path: Path
) -> None:
    """One golden is enough with extra goods: the threshold is set on them, against the golden alone."""
    bundle, _ = density_bundle
    out = new_part(bundle, striped["goldens"][:1], tmp_path / "one", goods=striped["extra"], threads=1)
    made = load_bundle(out)
    details = made.spec.threshold.details
    assert details["n_good"] == 2 and details["good"][0]["file"] == str(striped["extra"][0])
    assert made.spec.density is None  # one golden part: no Gaussian to fit
    assert details["few_shot_promise"].startswith("2 extra good photos (scored against the 1 goldens)")
    assert details["few_shot_promise"] == promise_statement(details, "extra good photos (scored against the 1 goldens)")


def test_new_part_refuses_by_name(
    density_bundle: tuple[Path, dict[str, list[Path]]],
    striped: dict[str, list[Path]],
    bad_images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle, _ = density_bundle
    tmp_path = tmp_path / "out"
    one = str(striped["goldens"][0])
    assert main(["new-part", str(bundle), one, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "one golden photo" in err and one in err and "--goods" in err and not (tmp_path / "a").exists()

    goldens = [*striped["goldens"][:3], bad_images["truncated"], bad_images["text"]]
    with pytest.raises(ReferencesError) as info:
        new_part(bundle, goldens, tmp_path / "b")
    assert str(bad_images["truncated"]) in str(info.value) and str(bad_images["text"]) in str(info.value)
    assert not (tmp_path / "b").exists()

    with pytest.raises(ReferencesError, match="same content as"):
        new_part(bundle, [*striped["goldens"][:2], striped["goldens"][0]], tmp_path / "c")
    with pytest.raises(ReferencesError, match="in the reference bank"):  # an extra good that is a golden
        new_part(bundle, striped["goldens"][:2], tmp_path / "d", goods=striped["goldens"][1:2])
    assert not tmp_path.exists()  # nothing written, not even a temp dir


def test_pipelines_new_part_registers_its_own_model(
    density_bundle: tuple[Path, dict[str, list[Path]]],
    striped: dict[str, list[Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real SQLite MLflow store: the part type is its own registered model, fetched back verified."""
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main as pipelines_main
    from pipelines.tracking import download_bundle, tracking_uri

    uri = tracking_uri(tmp_path / "data")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    goldens = [str(p) for p in striped["goldens"][:4]]
    argv = ["new-part", str(density_bundle[0]), *goldens, "--name", "striped-bracket", "--out", str(tmp_path / "b")]
    assert pipelines_main([*argv, "--tracking-uri", uri]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model_uri"] == "models:/striped-bracket@challenger" and str(printed["version"]) == "1"
    version = MlflowClient(tracking_uri=uri).get_model_version_by_alias("striped-bracket", "challenger")
    assert version.tags["goldens"] == "4" and "4 goldens" in version.tags["few_shot_promise"]
    fetched = load_bundle(download_bundle("models:/striped-bracket@challenger", tmp_path / "fetched"))
    assert fetched.model_version == "striped-bracket:4-shot" and len(fetched.references) == len(
        load_bundle(tmp_path / "b").references
    )
