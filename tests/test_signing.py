"""Signed bundles: a line that asks for signatures runs only bundles its key signed, from a folder or the service."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.bundle import MANIFEST, manifest_digest
from inspector.cli import main
from inspector.errors import BundleError, InspectorError

serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
ed25519 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 key pair written as PEM files, as ``openssl genpkey -algorithm ed25519`` would."""
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)) if name == "release" else bytes(32))
    private = folder / f"{name}.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public = folder / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: _key_pair(tmp_path, name) for name in ("release", "other")}


@pytest.fixture()
def part(tmp_path: Path) -> Path:
    path = tmp_path / "part.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)
    return path


def _copy(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    return to


def test_a_signed_bundle_runs_and_every_other_is_refused_by_name(
    tiny_bundle: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]], part: Path, capsys: pytest.CaptureFixture
) -> None:
    (private, public), (other_private, _) = keys["release"], keys["other"]
    signed = _copy(tiny_bundle, tmp_path / "signed")
    assert main(["sign", str(signed), "--key", str(private)]) == 0
    out = capsys.readouterr().out
    secret = private.read_text().splitlines()[1]
    assert secret not in out and secret not in (signed / "signature.json").read_text(), "the key never leaves its file"
    strict = ["--require-signature", "--public-key", str(public), "--json"]
    assert main(["score", str(part), "--bundle", str(signed), *strict]) == 0
    assert json.loads(capsys.readouterr().out)[0]["score"] is not None

    unsigned = _copy(tiny_bundle, tmp_path / "unsigned")
    assert main(["score", str(part), "--bundle", str(unsigned)]) == 0  # a line that does not ask runs it
    assert main(["score", str(part), "--bundle", str(unsigned), *strict]) == 2
    assert "signature.json: missing" in capsys.readouterr().err

    foreign = _copy(tiny_bundle, tmp_path / "foreign")
    main(["sign", str(foreign), "--key", str(other_private)])
    assert main(["score", str(part), "--bundle", str(foreign), *strict]) == 2
    assert "signed by key" in capsys.readouterr().err

    # content changed after signing, its digest recomputed so the bundle is consistent in itself
    edited = _copy(signed, tmp_path / "edited")
    manifest = json.loads((edited / MANIFEST).read_text())
    manifest["threshold"]["value"] = 50.0
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (edited / MANIFEST).write_text(json.dumps(manifest))
    assert main(["score", str(part), "--bundle", str(edited)]) == 0  # hashes alone cannot tell
    assert main(["score", str(part), "--bundle", str(edited), *strict]) == 2
    assert "signs content" in capsys.readouterr().err

    forged = _copy(signed, tmp_path / "forged")
    record = json.loads((forged / "signature.json").read_text())
    record["signature"] = record["signature"][:-8] + ("A" * 6 + "==")
    (forged / "signature.json").write_text(json.dumps(record))
    assert main(["score", str(part), "--bundle", str(forged), *strict]) == 2
    assert "does not verify" in capsys.readouterr().err


def test_the_service_refuses_an_unsigned_bundle_and_serves_a_signed_one(
    tiny_bundle: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    pytest.importorskip("fastapi")
    from inspector.service import ServiceSettings, create_app, load_initial_model
    from inspector.signing import sign_bundle

    private, public = keys["release"]
    unsigned = _copy(tiny_bundle, tmp_path / "unsigned")
    settings = ServiceSettings(bundle=unsigned, threads=1, require_signature=True, public_key=public)
    with pytest.raises(BundleError, match="signature.json: missing"):
        load_initial_model(create_app(settings))
    sign_bundle(unsigned, private)
    assert load_initial_model(create_app(settings)).version == "tiny:1"
    with pytest.raises(InspectorError, match="require_signature needs public_key"):
        ServiceSettings.from_env({}, bundle=unsigned, require_signature=True)
