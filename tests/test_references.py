"""Golden references without retraining, on a real tiny patch-mode ONNX bundle, real onnxruntime, real image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.bundle import load_bundle
from inspector.cli import main
from inspector.engine import Inspector
from inspector.references import (
    ReferencesError,
    add_references,
    drop_references,
    recalibrated_threshold,
    remove_references,
    sources_from_ids,
)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _random_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)


@pytest.fixture()
def new_parts(tmp_path: Path) -> dict[str, Path]:
    """Two new good parts and a near-duplicate of the first (a little pixel noise)."""
    a = _random_image(100)
    noise = np.random.default_rng(7).integers(-3, 4, a.shape)
    return {
        "a": _save(tmp_path / "new" / "a.png", a),
        "b": _save(tmp_path / "new" / "b.png", _random_image(101)),
        "a_near": _save(tmp_path / "probe" / "a_near.png", np.clip(a.astype(int) + noise, 0, 255)),
    }


def _snapshot(bundle: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(bundle.iterdir())}


def _score(bundle: Path, paths: list[Path]) -> np.ndarray:
    results = Inspector.from_bundle(bundle, threads=1).score(paths)
    assert all(r.error is None for r in results), results
    return np.array([r.score for r in results])


def _patches_per_image(bundle: Path) -> int:
    emb = Inspector.from_bundle(bundle, threads=1).embed([Image.fromarray(_random_image(0))]).embeddings
    return int(emb.shape[1])


def test_add_references_writes_verified_new_bundle(
    tiny_bundle: Path, new_parts: dict[str, Path], tmp_path: Path
) -> None:
    before = _snapshot(tiny_bundle)
    parent = load_bundle(tiny_bundle)
    p = _patches_per_image(tiny_bundle)
    near_before, a_before = _score(tiny_bundle, [new_parts["a_near"], new_parts["a"]])

    out = add_references(tiny_bundle, [new_parts["a"], new_parts["b"]], tmp_path / "v2", threads=1)

    assert _snapshot(tiny_bundle) == before  # the input bundle is byte-for-byte unchanged
    child = load_bundle(out)  # verifies hashes and schema
    assert child.references.shape == (parent.references.shape[0] + 2 * p, parent.references.shape[1])
    np.testing.assert_array_equal(child.references[: len(parent.references)], parent.references)
    near_after, a_after = _score(out, [new_parts["a_near"], new_parts["a"]])
    assert a_after < 5e-3 < a_before  # an image in the bank is its own nearest patch everywhere
    assert near_after < near_before
    prov = child.spec.provenance
    assert prov["parent_bundle"]["manifest_sha256"] and prov["parent_bundle"]["references"] == len(parent.references)
    assert [a["id"] for a in prov["reference_change"]["added"]] == ["a.png", "b.png"]
    n0 = len(parent.references)
    assert prov["reference_sources"] == [
        {"id": "initial", "rows": [0, n0]},
        {"id": "a.png", "rows": [n0, n0 + p], "sha256": prov["reference_change"]["added"][0]["sha256"]},
        {"id": "b.png", "rows": [n0 + p, n0 + 2 * p], "sha256": prov["reference_change"]["added"][1]["sha256"]},
    ]
    assert child.spec.threshold == parent.spec.threshold and child.model_version == parent.model_version

    # the same content again is refused (it is already in the bank), and the output path must be new
    with pytest.raises(ReferencesError, match="already in the bank"):
        add_references(out, [new_parts["a"]], tmp_path / "v3")
    with pytest.raises(ReferencesError, match="already exists"):
        add_references(tiny_bundle, [new_parts["a"]], out)
    assert not (tmp_path / "v3").exists()


def test_bad_image_named_and_nothing_written(tiny_bundle: Path, bad_images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out" / "v2"
    with pytest.raises(ReferencesError) as err:
        add_references(
            tiny_bundle, [bad_images["good"], bad_images["truncated"], bad_images["text"], tmp_path / "typo.png"], out
        )
    message = str(err.value)
    assert all(name in message for name in ("truncated.jpg", "notes.png", "typo.png")) and "good.png" not in message
    assert not out.parent.exists()  # not even the folder it would have gone in

    out = add_references(tiny_bundle, [bad_images["good"], bad_images["empty"]], tmp_path / "v2s", skip_bad=True)
    change = load_bundle(out).spec.provenance["reference_change"]
    assert [a["id"] for a in change["added"]] == ["good.png"] and "empty.png" in change["skipped"][0]


def test_remove_references_round_trip(tiny_bundle: Path, new_parts: dict[str, Path], tmp_path: Path) -> None:
    parent = load_bundle(tiny_bundle)
    v2 = add_references(tiny_bundle, [new_parts["a"], new_parts["b"]], tmp_path / "v2")
    v3 = remove_references(v2, ["a.png"], tmp_path / "v3")
    b3 = load_bundle(v3)
    assert [s["id"] for s in b3.spec.provenance["reference_sources"]] == ["initial", "b.png"]
    np.testing.assert_array_equal(
        b3.references,
        np.delete(
            load_bundle(v2).references,
            np.s_[len(parent.references) : len(parent.references) + _patches_per_image(tiny_bundle)],
            axis=0,
        ),
    )
    v4 = remove_references(v3, ["b.png"], tmp_path / "v4")
    np.testing.assert_array_equal(load_bundle(v4).references, parent.references)
    assert load_bundle(v4).spec.provenance["revision"] == 3

    with pytest.raises(ReferencesError, match="'nope'.*'a.png'|unknown.*'nope'"):
        remove_references(v3, ["nope", "a.png"], tmp_path / "bad")
    with pytest.raises(ReferencesError, match="every reference"):
        remove_references(v3, ["initial", "b.png"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_pure_helpers() -> None:
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05])
    threshold = recalibrated_threshold(scores, None, 0.25, {"scored_against": "test"}, "point")  # 2 may be flagged
    details = threshold.details
    assert threshold.value == 0.7 and details["false_reject_rate"] == 0.2 and details["good_rejects_allowed"] == 2
    assert threshold.value == np.quantile(scores, 0.75, method="inverted_cdf")
    assert details["rule"] == "good_quantile" and details["scored_against"] == "test"
    assert recalibrated_threshold(scores, None, 0.0, {}).value == 0.9
    # the default promise: a new good flagged at most at 25 % on average → floor(0.25 · 11) − 1 = 1 flagged
    assert recalibrated_threshold(scores, None, 0.25, {}).value == 0.8
    sources = sources_from_ids(["x", "x", "y", "z", "z"])
    assert sources == [{"id": "x", "rows": [0, 2]}, {"id": "y", "rows": [2, 3]}, {"id": "z", "rows": [3, 5]}]
    bank, kept = drop_references(np.arange(10, dtype=np.float32).reshape(5, 2), sources, ["y"])
    assert bank[:, 0].tolist() == [0, 2, 6, 8] and kept[1] == {"id": "z", "rows": [2, 4]}


def test_recalibration_picks_the_quantile(tiny_bundle: Path, new_parts: dict[str, Path], tmp_path: Path) -> None:
    goods = [_save(tmp_path / "cal_good" / f"g{i}.png", _random_image(200 + i)) for i in range(8)]
    bright = np.full((32, 32, 3), 250, dtype=np.uint8)
    defects = [
        _save(
            tmp_path / "cal_bad" / f"d{i}.png",
            np.where(np.arange(32)[:, None, None] < 8 * (i + 1), bright, _random_image(300 + i)),
        )
        for i in range(3)
    ]
    out = add_references(
        tiny_bundle,
        [new_parts["a"]],
        tmp_path / "v2",
        recalibrate_good=goods,
        target_false_reject_rate=0.2,
        promise="point",
    )
    threshold = load_bundle(out).spec.threshold
    good_scores = _score(out, goods)  # independently, through the public scorer on the NEW bundle
    expected = np.sort(good_scores)[8 - 1 - 1]  # floor(0.2 * 8) = 1 good part may be rejected
    assert threshold.value == pytest.approx(expected, abs=1e-6)
    assert threshold.value == pytest.approx(np.quantile(good_scores, 0.8, method="inverted_cdf"), abs=1e-6)
    assert (
        threshold.rule == "good_quantile"
        and threshold.details["n_good"] == 8
        and threshold.details["target_false_reject_rate"] == 0.2
    )
    assert np.mean(good_scores > threshold.value + 1e-6) <= 0.2

    out = add_references(
        tiny_bundle,
        [new_parts["a"]],
        tmp_path / "v2d",
        recalibrate_good=goods,
        recalibrate_defective=defects,
        target_false_reject_rate=0.2,
    )
    threshold = load_bundle(out).spec.threshold
    bad_scores = _score(out, defects)
    # the default promise: a new good flagged at most at 20 % on average → floor(0.2 · 9) − 1 = 0: the highest good
    assert threshold.rule == "target_frr" and threshold.value == pytest.approx(good_scores.max(), abs=1e-6)
    assert threshold.details["recall"] == pytest.approx(np.mean(bad_scores > threshold.value))

    with pytest.raises(ReferencesError, match="a.png: is in the reference bank"):
        add_references(tiny_bundle, [new_parts["a"]], tmp_path / "v2x", recalibrate_good=[*goods, new_parts["a"]])
    assert not (tmp_path / "v2x").exists()


def test_cli_exit_codes_and_summary(
    tiny_bundle: Path,
    new_parts: dict[str, Path],
    bad_images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    parent = load_bundle(tiny_bundle)
    v2 = tmp_path / "v2"
    assert (
        main(
            [
                "add-references",
                str(tiny_bundle),
                str(new_parts["a"].parent),
                "--out",
                str(v2),
                "--recalibrate-good",
                str(new_parts["a_near"]),
                "--target-frr",
                "0.01",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["references"]["before"] == len(parent.references) < summary["references"]["after"]
    assert summary["added"] == ["a.png", "b.png"] and summary["threshold"]["before"]["value"] == 0.5
    assert summary["threshold"]["after"]["rule"] == "good_quantile"

    assert main(["add-references", str(tiny_bundle), str(bad_images["corrupt"]), "--out", str(tmp_path / "x")]) == 2
    assert "corrupt.png" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["add-references", str(tiny_bundle), str(tmp_path / "missing*.png"), "--out", str(tmp_path / "x")]) == 2
    assert main(["add-references", str(tiny_bundle), str(new_parts["b"]), "--out", str(v2)]) == 2  # exists

    assert main(["remove-references", str(v2), "--ids", "b.png", "--out", str(tmp_path / "v3")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["removed"] == ["b.png"] and summary["references"]["after"] < summary["references"]["before"]
    assert main(["remove-references", str(v2), "--ids", "zzz.png", "--out", str(tmp_path / "v4")]) == 2
    assert "zzz.png" in capsys.readouterr().err and not (tmp_path / "v4").exists()


def test_image_mode_bundle_keeps_one_id_per_row(tmp_path: Path) -> None:
    """An image-mode bundle (N, D) embedder: added ids extend ``references.ids`` row for row; removal drops rows."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from inspector.bundle import BundleSpec, Threshold, write_bundle
    from inspector.engine import OnnxEmbedder
    from inspector.preprocess import PreprocessConfig
    from inspector.scoring import ScoringConfig

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["embeddings"]),
        ],
        "gap",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    pre = PreprocessConfig(height=16, width=16)
    refs = [_save(tmp_path / "refs" / f"r{i}.png", _random_image(10 + i)) for i in range(3)]
    bank = OnnxEmbedder(_write(tmp_path / "gap.onnx", model), pre).embed(refs).embeddings
    spec = BundleSpec(
        pre,
        ScoringConfig(),
        Threshold(0.1),
        model={"name": "gap", "version": "1", "mode": "image"},
        reference_ids=[p.name for p in refs],
    )
    v1 = write_bundle(tmp_path / "v1", tmp_path / "gap.onnx", bank, spec)

    new = [
        _save(tmp_path / "new" / "n0.png", _random_image(20)),
        _save(tmp_path / "other" / "n0.png", _random_image(21)),
    ]
    v2 = load_bundle(add_references(v1, new, tmp_path / "v2"))
    ids = v2.spec.reference_ids
    assert ids[:3] == ["r0.png", "r1.png", "r2.png"] and len(ids) == 5 == len(v2.references)
    assert (
        ids[3].startswith("n0.png@") and ids[4].startswith("n0.png@") and ids[3] != ids[4]
    )  # same name, different parts
    v3 = load_bundle(remove_references(v2.path, ["r1.png", ids[4]], tmp_path / "v3"))
    assert v3.spec.reference_ids == ["r0.png", "r2.png", ids[3]]
    np.testing.assert_array_equal(v3.references, v2.references[[0, 2, 3]])


def _write(path: Path, model) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def test_added_references_keep_only_the_patches_on_the_part(tiny_bundle: Path, tmp_path: Path) -> None:
    """A letterboxed reference adds only its on-part patches, as training's bank does; its own score stays ~0."""
    narrow = tmp_path / "narrow.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(
        narrow
    )  # 32x16 on the canvas
    inspector = Inspector.from_bundle(tiny_bundle, threads=1)
    emb, on_part, _, _ = inspector.embedder.embed([narrow])
    assert on_part is not None and 0 < on_part.sum() < on_part.size
    parent = load_bundle(tiny_bundle)
    out = add_references(tiny_bundle, [narrow], tmp_path / "v2", threads=1)
    child = load_bundle(out)
    n0, kept = len(parent.references), int(on_part.sum())
    assert child.references.shape[0] == n0 + kept
    np.testing.assert_allclose(child.references[n0:], emb[0][on_part[0]], atol=1e-6)
    assert child.spec.provenance["reference_sources"][-1]["rows"] == [n0, n0 + kept]
    assert child.spec.provenance["reference_change"]["added"][0]["rows"] == kept
    assert _score(out, [narrow])[0] < 5e-3 < _score(tiny_bundle, [narrow])[0]
    v3 = remove_references(out, ["narrow.png"], tmp_path / "v3")
    np.testing.assert_array_equal(load_bundle(v3).references, parent.references)
