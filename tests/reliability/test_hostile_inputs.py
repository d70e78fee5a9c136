"""The reliability suite: hostile and odd files through every door (the line CLI, the HTTP service, training ingest),
tampering with every file of a bundle, and the token on every route that changes state.

The corpus is generated here, file by file, so each kind is named: broken (empty, truncated, corrupt), disguised
(text, HTML, a script or an archive with an image's name), oversized (a decompression bomb, a header that claims
more pixels than exist), and odd but valid (16-bit, palette, RGBA, CMYK, one pixel, a sliver, an EXIF-rotated JPEG,
an animated GIF). The rules: never a traceback or a 500, every bad file named in its error, every valid file scored.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.cli import main
from inspector.errors import BundleError

#: files the line must refuse, by name, without losing the rest of the batch
BROKEN = {
    "empty.png",
    "truncated.png",
    "truncated.jpg",
    "corrupt.png",
    "text.jpg",
    "page.png",
    "script.bmp",
    "archive.tiff",
    "bomb.png",
    "liar_header.png",
    "garbage.webp",
    "half_header.bmp",
}
#: a real image this bundle must not guess at: a 16-bit camera's frame on a bundle built for 8-bit parts is refused
#: by name with the fix (training sets the camera's bit depth; ingest keeps it)
MISMATCHED = {"sixteen_bit.png"}
#: files that are odd but real images: each must be scored
VALID = {
    "palette.png",
    "rgba.png",
    "cmyk.jpg",
    "one_pixel.png",
    "sliver.png",
    "rotated.jpg",
    "animated.png",
    "grey.bmp",
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but holds almost no data."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_corpus(folder: Path) -> Path:
    """Every kind of file in ``BROKEN`` and ``VALID``, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    png, jpeg = _encoded(photo, "PNG"), _encoded(photo, "JPEG", quality=90)
    files: dict[str, bytes] = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "corrupt.png": png[:40] + bytes(rng.integers(0, 255, 400, dtype=np.uint8)),
        "text.jpg": b"shift report: line 7 stopped at 14:02\n",
        "page.png": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
        "script.bmp": b"#!/bin/sh\nrm -rf /\n",
        "archive.tiff": b"PK\x03\x04" + bytes(100),
        "bomb.png": _encoded(Image.new("1", (8200, 8200)), "PNG"),  # 67 MP of zeros, over the 64 MP limit: tiny on disk
        "liar_header.png": _png_claiming(30000, 30000),
        "garbage.webp": b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8),
        "half_header.bmp": _encoded(photo, "BMP")[:20],
        "sixteen_bit.png": _encoded(Image.fromarray((rng.integers(0, 4095, (48, 40)) * 16).astype(np.uint16)), "PNG"),
        "palette.png": _encoded(photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "rgba.png": _encoded(photo.convert("RGBA"), "PNG"),
        "cmyk.jpg": _encoded(photo.convert("CMYK"), "JPEG"),
        "one_pixel.png": _encoded(Image.new("RGB", (1, 1), (120, 60, 30)), "PNG"),
        "sliver.png": _encoded(Image.fromarray(rng.integers(0, 255, (2, 600, 3), dtype=np.uint8)), "PNG"),
        "grey.bmp": _encoded(photo.convert("L"), "BMP"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees by the camera
    files["rotated.jpg"] = _encoded(photo, "JPEG", exif=exif)
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    files["animated.png"] = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])  # a GIF named .png
    for name, data in files.items():
        (folder / name).write_bytes(data)
    assert set(files) == BROKEN | MISMATCHED | VALID
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


def test_the_cli_names_every_bad_file_and_scores_every_valid_one(
    tiny_bundle: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["score", str(corpus), "--bundle", str(tiny_bundle), "--json"]) == 2  # bad input among them
    captured = capsys.readouterr()
    rows = {Path(r["path"]).name: r for r in json.loads(captured.out)}
    assert set(rows) == BROKEN | MISMATCHED | VALID
    assert "preprocess.bit_depth" in rows["sixteen_bit.png"]["error"], "the refusal says what to do"
    for name in BROKEN | MISMATCHED:
        assert rows[name]["score"] is None and name in rows[name]["error"], rows[name]
    for name in VALID:
        assert rows[name]["error"] is None and np.isfinite(rows[name]["score"]), rows[name]
    assert "Traceback" not in captured.err


def test_the_service_never_answers_500_and_names_every_bad_file(tiny_bundle: Path, corpus: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from inspector.service import ServiceSettings, create_app

    settings = ServiceSettings(bundle=tiny_bundle, threads=1, max_bytes=50_000_000, max_images=64)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for path in sorted(corpus.iterdir()):
            response = client.post("/v1/score", files=[("files", (path.name, path.read_bytes(), "image/png"))])
            assert response.status_code != 500, (path.name, response.text)
            body = response.json()
            result = body["results"][0] if response.status_code == 200 else body["errors"][0]
            if path.name in VALID:
                assert response.status_code == 200 and result["error"] is None, (path.name, body)
            else:
                assert response.status_code == 422 and path.name in result["error"], (path.name, body)
        everything = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(corpus.iterdir())]
        batch = client.post("/v1/score", files=everything)
        assert batch.status_code == 200
        scored = {r["name"] for r in batch.json()["results"] if r["error"] is None}
        assert scored == VALID, "one bad file fails that item, never the batch"


def test_training_ingest_rejects_every_bad_file_by_name_and_keeps_the_rest(corpus: Path, tmp_path: Path) -> None:
    from pipelines.data.manifest import ingest

    goods = shutil.copytree(corpus, tmp_path / "good")
    defects = tmp_path / "defective" / "scratch"
    defects.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(defects / "d.png")
    manifest = ingest(good=goods, defective=tmp_path / "defective")
    rejected = {Path(r.path).name: r.reason for r in manifest.rejected}
    assert set(rejected) == BROKEN  # each by its path, with a reason
    assert all(reason.strip() for reason in rejected.values()), rejected
    assert {Path(e.path).name for e in manifest.entries} == VALID | MISMATCHED | {"d.png"}


def _bundle_files(bundle: Path) -> Iterator[str]:
    yield from ("model.onnx", "references.npy", "inspector.json")
    if (bundle / "descriptors.npy").exists():
        yield "descriptors.npy"


def test_tampering_with_any_file_of_a_bundle_is_refused_by_name(tiny_bundle: Path, tmp_path: Path) -> None:
    from inspector.bundle import load_bundle

    for name in _bundle_files(tiny_bundle):
        copy = shutil.copytree(tiny_bundle, tmp_path / name)
        data = bytearray((copy / name).read_bytes())
        if name == "inspector.json":
            manifest = json.loads(data)
            manifest["threshold"]["value"] *= 10  # every part would pass
            (copy / name).write_text(json.dumps(manifest))
        else:
            data[-1] ^= 0xFF
            (copy / name).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=name.replace(".", r"\.")):
            load_bundle(copy)
        (copy / name).unlink()
        with pytest.raises(BundleError, match=name.replace(".", r"\.")):
            load_bundle(copy)


def test_every_route_that_changes_state_wants_the_token(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from inspector.service import ServiceSettings, create_app

    settings = ServiceSettings(bundle=tiny_bundle, threads=1, token="line-7", record=True, record_dir=tmp_path)
    app = create_app(settings)
    changing = [  # every route the app declares that is not a read
        (path, method)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method in ("post", "put", "patch", "delete")
    ]
    login = "/review/api/login"  # takes the token in its body, and refuses a wrong one
    assert {path for path, _ in changing} == {
        "/v1/score",
        "/v1/reload",
        "/v1/parts/{part}/score",
        "/v1/parts/{part}/reload",
        "/review/api/parts/{part_id}/review",
        login,
    }
    with TestClient(app) as client:
        for path, method in changing:
            if path != login:
                assert client.request(method, path).status_code == 401
                assert client.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post(login, json={"reviewer": "qa", "token": "wrong"}).status_code == 401
        ok = client.post("/v1/reload", headers={"Authorization": "Bearer line-7"})
        assert ok.status_code == 200
