"""Atomic writes are durable: the data and the rename are flushed to disk (a power cut cannot be caused here, so the
flushes are recorded by wrapping os.fsync, and the writes themselves are real)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from inspector.bundle import BundleSpec, Threshold, load_bundle, write_bundle
from inspector.durable import replace_durably
from inspector.preprocess import PreprocessConfig
from inspector.scoring import ScoringConfig


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths os.fsync was called on, in order (Linux: read back from the descriptor)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a file descriptor")
    calls: list[Path] = []
    real = os.fsync

    def recording(fd: int) -> None:
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def test_a_replaced_file_and_its_folder_are_flushed(tmp_path: Path, synced: list[Path]) -> None:
    tmp = tmp_path / ".part.tmp"
    tmp.write_text("data")
    replace_durably(tmp, tmp_path / "part.json")
    assert (tmp_path / "part.json").read_text() == "data"
    assert not tmp.exists()
    assert synced == [tmp, tmp_path]  # the data before the rename, the folder's new entry after it


def test_a_bundle_is_flushed_file_by_file_before_it_is_renamed_into_place(tmp_path: Path, synced: list[Path]) -> None:
    spec = BundleSpec(PreprocessConfig(height=8, width=8), ScoringConfig(), Threshold(1.0))
    out = write_bundle(tmp_path / "bundle", b"model bytes", np.ones((2, 4), np.float32), spec)
    names = {p.name for p in synced}
    assert {"model.onnx", "references.npy", "inspector.json"} <= names
    assert synced[-1] == tmp_path, "the rename into place is flushed last"
    assert load_bundle(out).references.shape == (2, 4)
