"""The line CLI on a real bundle: output formats, exit codes, bad files named without losing the batch."""

from __future__ import annotations

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
    assert all(r["verdict"] == ("anomalous" if r["score"] > 0.5 else "good") for r in rows)
    # one batch at a time or three side by side: the same rows
    for streams in ("1", "3"):
        assert main(["score", str(parts), "--bundle", str(tiny_bundle), "--json", "--streams", streams]) == 0
        again = json.loads(capsys.readouterr().out)
        assert [r["path"] for r in again] == [r["path"] for r in rows]
        assert all(abs(a["score"] - b["score"]) <= 1e-6 for a, b in zip(again, rows))
    with pytest.raises(SystemExit):
        main(["score", str(parts), "--bundle", str(tiny_bundle), "--streams", "0"])


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
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("path,score")
    assert sum(1 for line in lines[1:] if ",good," in line or ",anomalous," in line) == 2


def test_fail_on_anomaly_exit_code(tiny_bundle: Path, parts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["score", str(parts), "--bundle", str(tiny_bundle), "--json"])
    flagged = any(r["verdict"] == "anomalous" for r in json.loads(capsys.readouterr().out))
    assert main(["score", str(parts), "--bundle", str(tiny_bundle), "--fail-on-anomaly"]) == (1 if flagged else 0)


def test_check_and_tampered_bundle(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tiny_bundle)]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    (copy / "references.npy").write_bytes(b"garbage")
    assert main(["check", str(copy)]) == 2
    assert "references.npy" in capsys.readouterr().err
