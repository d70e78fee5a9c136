"""The line CLI on a real bundle: output formats, exit codes, bad files named without losing the batch."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.cli import main


@pytest.fixture()
def parts(tmp_path: Path) -> Path:
    folder = tmp_path / "parts"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_score_folder_json(tiny_bundle: Path, parts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", str(parts), "--bundle", str(tiny_bundle), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(r["error"] is None and r["model_version"] == "tiny:1" for r in rows)
    # random noise is far from the references: every part above the 0.5 threshold, and flagged
    assert [r["verdict"] for r in rows] == ["anomalous"] * 3 and all(r["score"] > r["threshold"] == 0.5 for r in rows)
    # one batch at a time or three side by side: the same rows
    for streams in ("1", "3"):
        assert main(["score", str(parts), "--bundle", str(tiny_bundle), "--json", "--streams", streams]) == 0
        again = json.loads(capsys.readouterr().out)
        assert [r["path"] for r in again] == [r["path"] for r in rows]
        assert all(abs(a["score"] - b["score"]) <= 1e-6 for a, b in zip(again, rows))
    with pytest.raises(SystemExit):
        main(["score", str(parts), "--bundle", str(tiny_bundle), "--streams", "0"])


def test_a_folder_scan_says_what_it_skipped_and_why(
    tiny_bundle: Path, parts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = [Image.new("RGB", (30, 40), c) for c in ("red", "blue")]
    frames[0].save(parts / "spin.gif", save_all=True, append_images=frames[1:])  # an animated GIF: not a line image
    (parts / "notes.txt").write_text("shift 2")
    assert main(["score", str(parts), "--bundle", str(tiny_bundle), "--json"]) == 0  # skipping is not an error
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    skipped = {Path(r["path"]).name: r["skipped"] for r in rows if "skipped" in r}
    assert sorted(skipped) == ["notes.txt", "spin.gif"]
    assert "not an image type (.gif;" in skipped["spin.gif"]
    assert sum(r["score"] is not None for r in rows) == 3
    assert "skipped 2 file(s) in the folders given" in captured.err
    assert main(["score", str(parts), "--bundle", str(tiny_bundle)]) == 0
    table = capsys.readouterr().out
    assert "spin.gif  SKIPPED not an image type" in table
    assert main(["score", str(parts), "--bundle", str(tiny_bundle), "--csv"]) == 0
    csv_rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(csv_rows) == 5
    assert sum(bool(r["skipped"]) for r in csv_rows) == 2


def test_bad_file_named_rest_scored_exit_2(
    tiny_bundle: Path, parts: Path, bad_images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "score",
            str(parts / "p0.png"),
            str(bad_images["truncated"]),
            str(parts / "p1.png"),
            "--bundle",
            str(tiny_bundle),
            "--csv",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2
    assert "truncated.jpg" in err and "cannot decode" in err
    reader = csv.DictReader(io.StringIO(out))
    rows = list(reader)
    assert reader.fieldnames == ["path", "score", "threshold", "verdict", "model_version", "error"]
    assert [Path(r["path"]).name for r in rows] == ["p0.png", "truncated.jpg", "p1.png"]
    assert [r["verdict"] for r in rows] == ["anomalous", "", "anomalous"]  # random noise, far from the references
    assert rows[1]["score"] == "" and "cannot decode" in rows[1]["error"]
    assert rows[0]["error"] == rows[2]["error"] == "" and float(rows[0]["score"]) > float(rows[0]["threshold"])


def test_fail_on_anomaly_exit_code(
    tiny_bundle: Path, parts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["score", str(parts), "--bundle", str(tiny_bundle), "--fail-on-anomaly"]) == 1  # all flagged
    capsys.readouterr()
    # the bundle's first reference image (drawn as the fixture draws it): every patch in the bank, a good part
    golden = tmp_path / "golden.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(golden)
    assert main(["score", str(golden), "--bundle", str(tiny_bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["verdict"] == "good"
    assert main(["score", str(golden), "--bundle", str(tiny_bundle), "--fail-on-anomaly"]) == 0


def test_check_and_tampered_bundle(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tiny_bundle)]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    (copy / "references.npy").write_bytes(b"garbage")
    assert main(["check", str(copy)]) == 2
    assert "references.npy" in capsys.readouterr().err
