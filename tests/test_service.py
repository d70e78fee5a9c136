"""The HTTP service on a real uvicorn on 127.0.0.1: scoring, bad input, auth, size limits, metrics, readiness,
and an atomic reload under concurrent requests with zero failed requests."""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from inspector.bundle import BundleSpec, load_bundle, write_bundle  # noqa: E402
from inspector.engine import Inspector  # noqa: E402
from inspector.errors import InspectorError  # noqa: E402
from inspector.service import ServiceSettings, create_app  # noqa: E402

TOKEN = "line-7-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[1]


def png_bytes(seed: int, size: tuple[int, int] = (30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


class LiveServer:
    """A real uvicorn server in a thread, on a socket bound to 127.0.0.1:<free port> before it starts."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture()
def start_server() -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def start(bundle: Path, **kw: object) -> LiveServer:
        server = LiveServer(ServiceSettings(bundle=bundle, threads=1, **kw)).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server(tiny_bundle: Path) -> Iterator[LiveServer]:
    """The shared server: bearer token on, 2 MB and 8 images per request."""
    s = LiveServer(
        ServiceSettings(bundle=tiny_bundle, token=TOKEN, max_bytes=2_000_000, max_images=8, threads=1)
    ).start()
    yield s
    s.stop()


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def second_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same network and references, published as model version 2."""
    b = load_bundle(tiny_bundle)
    spec = BundleSpec(b.spec.preprocessing, b.spec.scoring, b.spec.threshold, model={**b.spec.model, "version": "2"})
    return write_bundle(tmp_path_factory.mktemp("v2") / "bundle", b.model_path.read_bytes(), b.references, spec)


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "image/png")) for name, data in items]


def test_a_whole_part_bundle_answers_with_both_views(
    start_server: Callable[..., LiveServer], density_bundle: tuple[Path, dict]
) -> None:
    bundle, parts = density_bundle
    paths = parts["good"][:1] + parts["patchy"][:1]
    expected = Inspector.from_bundle(bundle, threads=1).score(paths)
    server = start_server(bundle)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        reply = c.post("/v1/score", files=files(*[(p.name, p.read_bytes()) for p in paths]))
    assert reply.status_code == 200, reply.text
    for got, want in zip(reply.json()["results"], expected):
        assert got["score"] == pytest.approx(want.score, abs=1e-6)
        assert got["views"] == pytest.approx(want.views, abs=1e-6) and got["score"] == pytest.approx(
            sum(got["views"].values()) / 2, abs=1e-9
        )  # the bundle fuses the views by their mean


def test_score_one_and_many_match_the_python_api(client: httpx.Client, tiny_bundle: Path) -> None:
    images = [png_bytes(i) for i in range(3)]
    expected = [r.score for r in Inspector.from_bundle(tiny_bundle, threads=1).score(images)]

    one = client.post("/v1/score", files=files(("a.png", images[0])))
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["model_version"] == "tiny:1" and body["latency_ms"] > 0
    (r,) = body["results"]
    assert r["name"] == "a.png" and r["error"] is None and r["threshold"] == 0.5
    assert r["score"] == pytest.approx(expected[0], abs=1e-6)
    assert r["score"] > 0.5 and r["verdict"] == "anomalous"  # random noise, far from the references

    many = client.post("/v1/score", files=files(*[(f"p{i}.png", d) for i, d in enumerate(images)]))
    assert many.status_code == 200, many.text
    results = many.json()["results"]
    assert [x["name"] for x in results] == ["p0.png", "p1.png", "p2.png"]
    assert [x["score"] for x in results] == pytest.approx(expected, abs=1e-6)

    raw = client.post("/v1/score?name=raw.png", content=images[1], headers={"Content-Type": "image/png"})
    assert raw.status_code == 200 and raw.json()["results"][0]["name"] == "raw.png"


def test_bad_files_get_named_errors_and_the_rest_is_scored(
    client: httpx.Client, bad_images: dict[str, Path], tiny_bundle: Path
) -> None:
    (expected,) = Inspector.from_bundle(tiny_bundle, threads=1).score([bad_images["good"]])
    items = [(p.name, p.read_bytes()) for p in bad_images.values()]
    resp = client.post("/v1/score", files=files(*items))
    assert resp.status_code == 200, resp.text
    by_name = {r["name"]: r for r in resp.json()["results"]}
    assert set(by_name) == {p.name for p in bad_images.values()}
    good = by_name.pop("good.png")
    assert good["error"] is None and good["score"] == pytest.approx(expected.score, abs=1e-6)
    assert expected.score > 0.5 and good["verdict"] == "anomalous"  # random noise, far from the references
    for name, r in by_name.items():
        assert r["score"] is None and r["verdict"] is None
        assert r["error"] and r["error"].startswith(f"{name}: "), r
    assert "over the limit" in by_name["huge.png"]["error"] and "empty" in by_name["empty.png"]["error"]


def test_every_image_bad_is_422_with_reasons(client: httpx.Client, bad_images: dict[str, Path]) -> None:
    resp = client.post("/v1/score", files=files(("notes.png", b"not an image"), ("empty.png", b"")))
    assert resp.status_code == 422
    body = resp.json()
    assert "notes.png" in body["detail"] and "empty.png" in body["detail"]
    assert [e["name"] for e in body["errors"]] == ["notes.png", "empty.png"]
    wrong_field = client.post("/v1/score", files={"image": ("a.png", png_bytes(0), "image/png")})
    assert wrong_field.status_code == 422 and "'files'" in wrong_field.json()["detail"]
    assert client.post("/v1/score", data={"files": "x"}).status_code == 415  # urlencoded: not images
    assert client.post("/v1/score", content=b"{}", headers={"Content-Type": "application/json"}).status_code == 415


def test_bearer_token(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        img = files(("a.png", png_bytes(0)))
        missing = anon.post("/v1/score", files=img)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert anon.post("/v1/score", files=img, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert anon.post("/v1/score", files=img, headers={"Authorization": TOKEN}).status_code == 401  # no scheme
        assert anon.post("/v1/reload", json={}).status_code == 401
        assert anon.post("/v1/score", files=img, headers=AUTH).status_code == 200
        assert anon.get("/healthz").status_code == 200  # probes and scraping stay open


def test_size_limits_are_413_and_the_server_survives(client: httpx.Client) -> None:
    big = os.urandom(2_500_000)
    declared = client.post("/v1/score", files=files(("big.png", big)))
    assert declared.status_code == 413 and "2000000" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for i in range(0, len(big), 256_000):
            yield big[i : i + 256_000]

    streamed = client.post("/v1/score", content=chunks(), headers={"Content-Type": "image/png"})
    assert streamed.status_code == 413

    too_many = client.post("/v1/score", files=files(*[(f"{i}.png", png_bytes(i, (8, 8))) for i in range(9)]))
    assert too_many.status_code == 413 and "8" in too_many.json()["detail"]
    assert client.post("/v1/score", files=files(("a.png", png_bytes(0)))).status_code == 200


def test_readyz_healthz_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "tiny:1"
    first = client.post("/v1/score", files=files(("a.png", png_bytes(3))))
    assert first.status_code == 200
    text = client.get("/metrics").text
    assert 'inspector_http_requests_total{method="POST",path="/v1/score",status="200"}' in text
    assert "inspector_model_info{bundle=" in text and 'version="tiny:1"' in text
    assert "inspector_http_request_duration_seconds_bucket" in text
    assert "inspector_images_scored_total" in text and "inspector_anomalies_flagged_total" in text
    assert "inspector_model_ready 1.0" in text
    assert _gauge(text, "process_resident_memory_bytes") > 0  # the process and platform, on the service's registry
    assert "python_info{" in text
    # drift: the flag rate of the latest parts, beside what the threshold was calibrated for (not recorded here: NaN)
    assert math.isnan(_gauge(text, "inspector_model_calibrated_false_reject_rate"))
    verdicts = [r["verdict"] == "anomalous" for r in first.json()["results"]]
    for i in range(4):
        body = client.post("/v1/score", files=files(*[(f"{i}{j}.png", png_bytes(10 * i + j)) for j in range(3)])).json()
        verdicts += [r["verdict"] == "anomalous" for r in body["results"]]
    assert len(verdicts) == 13
    assert _gauge(client.get("/metrics").text, "inspector_recent_flag_rate") == pytest.approx(
        sum(verdicts) / len(verdicts)
    )


def _gauge(text: str, name: str) -> float:
    """One unlabelled sample's value from a Prometheus text page."""
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_reload_under_concurrent_requests_fails_nothing(
    start_server: Callable[..., LiveServer], tiny_bundle: Path, second_bundle: Path, tmp_path: Path
) -> None:
    server = start_server(tiny_bundle)
    image = files(("part.png", png_bytes(7)))
    outcomes: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for _ in range(30):
                try:
                    r = c.post("/v1/score", files=image)
                    result = (r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text)
                except httpx.HTTPError as exc:  # a dropped connection counts as a failure too
                    result = (-1, repr(exc))
                with lock:
                    outcomes.append(result)

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 30
        while len(outcomes) < n and time.monotonic() < deadline:
            time.sleep(0.005)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    reloads = []
    with httpx.Client(base_url=server.url, timeout=30) as admin:
        for at, bundle in ((15, second_bundle), (50, tiny_bundle), (85, second_bundle)):
            wait_for(at)
            reloads.append(admin.post("/v1/reload", json={"bundle": str(bundle)}))
        for t in threads:
            t.join(timeout=60)

        assert [r.status_code for r in reloads] == [200, 200, 200], [r.text for r in reloads]
        assert [r.json()["model_version"] for r in reloads] == ["tiny:2", "tiny:1", "tiny:2"]
        failures = [o for o in outcomes if o[0] != 200]
        assert len(outcomes) == 120 and failures == []
        assert {v for _, v in outcomes} == {"tiny:1", "tiny:2"}

        # a bad bundle is refused and the old model keeps serving
        broken = tmp_path / "broken"
        shutil.copytree(second_bundle, broken)
        (broken / "references.npy").write_bytes(b"tampered")
        refused = admin.post("/v1/reload", json={"bundle": str(broken)})
        assert refused.status_code == 422 and "references.npy" in refused.json()["detail"]
        assert refused.json()["model_version"] == "tiny:2"
        no_registry = admin.post("/v1/reload", json={"model_uri": "models:/tiny@champion"})
        assert no_registry.status_code == 422 and "--tracking-uri" in no_registry.json()["detail"]
        assert admin.get("/readyz").json()["model_version"] == "tiny:2"
        assert admin.post("/v1/score", files=image).json()["model_version"] == "tiny:2"
        metrics = admin.get("/metrics").text
        assert 'inspector_model_reloads_total{result="ok"} 4.0' in metrics  # startup + 3
        assert 'inspector_model_reloads_total{result="failed"} 2.0' in metrics
        assert "inspector_model_swaps_total 3.0" in metrics


def test_startup_refuses_what_it_cannot_serve(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inspector.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(InspectorError, match="needs --tracking-uri"):
        create_app(ServiceSettings(model_uri="models:/tiny@champion"))
    with pytest.raises(InspectorError, match="not a registry model URI"):
        create_app(ServiceSettings(model_uri="runs:/abc/model", tracking_uri="http://127.0.0.1:9"))
    with pytest.raises(InspectorError, match="either --bundle or --model-uri"):
        create_app(
            ServiceSettings(bundle=tiny_bundle, model_uri="models:/tiny@champion", tracking_uri="http://127.0.0.1:9")
        )
    with pytest.raises(InspectorError, match="over http"):
        create_app(ServiceSettings(model_uri="models:/tiny@champion", tracking_uri="sqlite:///x.db"))
    assert main(["serve", "--model-uri", "models:/tiny@champion"]) == 2
    # registry unreachable and nothing cached: a clear error, no server
    assert (
        main(
            [
                "serve",
                "--model-uri",
                "models:/tiny@champion",
                "--tracking-uri",
                "http://127.0.0.1:9",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--registry-timeout",
                "2",
            ]
        )
        == 2
    )
    assert main(["serve", "--bundle", str(tmp_path)]) == 2  # not a bundle: clear error, no server


def test_cli_serve_runs_uvicorn(tiny_bundle: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INSPECTOR_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inspector.cli",
            "serve",
            "--bundle",
            str(tiny_bundle),
            "--port",
            str(port),
            "--threads",
            "1",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert ready is not None and ready.status_code == 200, (
            proc.stdout.read() if proc.poll() is not None else "no answer"
        )
        assert ready.json()["model_version"] == "tiny:1"
        scored = httpx.post(
            f"http://127.0.0.1:{port}/v1/score", files=files(("a.png", png_bytes(0))), headers=AUTH, timeout=30
        )
        assert scored.status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_local_mlflow_store_in_the_environment_does_not_stop_a_bundle_service(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a host that also trains, MLFLOW_TRACKING_URI may point at a local SQLite store: serving a bundle ignores
    it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/somewhere/mlflow.db")
    settings = ServiceSettings.from_env(bundle=tiny_bundle)
    settings.check_source()
    assert settings.tracking_uri is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert ServiceSettings.from_env(bundle=tiny_bundle).tracking_uri == "http://127.0.0.1:5000"


def test_drift_gauges_follow_the_served_model(tiny_bundle: Path, tmp_path: Path) -> None:
    """The calibrated false-reject rate comes from the served bundle; the recent flag rate covers the latest
    FLAG_WINDOW parts of the model being served, and starts afresh when another is swapped in."""
    from dataclasses import replace

    from inspector.bundle import Threshold, load_bundle, write_bundle
    from inspector.service import FLAG_WINDOW, LoadedModel, ServiceMetrics

    old = load_bundle(tiny_bundle)
    details = {"false_reject_rate": 0.008, "frr_upper_95": 0.031}
    calibrated = write_bundle(
        tmp_path / "calibrated",
        old.model_path,
        old.references,
        replace(old.spec, threshold=Threshold(0.5, rule="target_frr", details=details)),
    )
    metrics = ServiceMetrics()

    def gauges() -> tuple[float, float, float]:
        text = metrics.render()[0].decode()
        return (
            _gauge(text, "inspector_recent_flag_rate"),
            _gauge(text, "inspector_model_calibrated_false_reject_rate"),
            _gauge(text, "inspector_model_false_reject_rate_upper95"),
        )

    metrics.model_loaded(LoadedModel(Inspector.from_bundle(calibrated), calibrated))
    rate, frr, upper = gauges()
    assert math.isnan(rate) and (frr, upper) == (0.008, 0.031)
    metrics.parts_scored([True] * 10 + [False] * (FLAG_WINDOW - 10))
    assert gauges()[0] == pytest.approx(10 / FLAG_WINDOW)
    metrics.parts_scored([True] * 10)  # the oldest 10 (flagged) leave the window, 10 newer flagged ones come in
    assert gauges()[0] == pytest.approx(10 / FLAG_WINDOW)
    metrics.parts_scored([False] * (FLAG_WINDOW - 1))
    assert gauges()[0] == pytest.approx(1 / FLAG_WINDOW)  # only the last of the newer flagged ones is left
    metrics.parts_scored([False])
    assert gauges()[0] == 0.0
    metrics.model_loaded(LoadedModel(Inspector.from_bundle(tiny_bundle), tiny_bundle))
    rate, frr, upper = gauges()
    assert math.isnan(rate) and math.isnan(frr) and math.isnan(upper)


def test_concurrent_cameras_are_scored_together_with_their_own_results(
    start_server: Callable[..., LiveServer], tiny_bundle: Path
) -> None:
    server = start_server(tiny_bundle)
    blobs = [png_bytes(100 + i) for i in range(32)]
    expected = [r.score for r in Inspector.from_bundle(tiny_bundle, threads=1).score(blobs)]
    start = threading.Barrier(8)
    local = threading.local()

    def one(i: int) -> float:
        if i < 8:
            start.wait()
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=server.url, timeout=30)
        r = local.client.post("/v1/score", files=files((f"cam{i}.png", blobs[i])))
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["name"] == f"cam{i}.png"
        return float(result["score"])

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(len(blobs))))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        metrics = c.get("/metrics").text
    assert _gauge(metrics, "inspector_score_batched_requests_total") == 32  # every request went through the batcher
    assert 1 <= _gauge(metrics, "inspector_score_batches_total") <= 32


def test_each_request_alone_when_combining_is_off(start_server: Callable[..., LiveServer], tiny_bundle: Path) -> None:
    server = start_server(tiny_bundle, combine_images=1)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for i in range(3):
            assert (
                c.post("/v1/score", files=files(("a.png", png_bytes(i)), ("b.png", png_bytes(i + 50)))).status_code
                == 200
            )
        metrics = c.get("/metrics").text
    assert (
        _gauge(metrics, "inspector_score_batches_total")
        == 3
        == _gauge(metrics, "inspector_score_batched_requests_total")
    )


def test_a_camera_that_drops_its_link_mid_upload_is_counted_not_a_traceback(
    server: LiveServer, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes its connection half-way through the body: one log line and a counter, no traceback."""
    host, port = server.url.removeprefix("http://").split(":")
    body = b"--cut\r\nContent-Disposition: form-data; name=files; filename=a.png\r\n\r\n" + png_bytes(1)[:200]
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: multipart/form-data; boundary=cut\r\nContent-Length: 50000\r\n\r\n"
    )

    def disconnects() -> float:
        line = next(
            (x for x in client.get("/metrics").text.splitlines() if x.startswith("inspector_client_disconnects_total")),
            "inspector_client_disconnects_total 0",
        )
        return float(line.split()[-1])

    before = disconnects()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            with socket.create_connection((host, int(port)), timeout=10) as raw:
                raw.sendall(head.encode() + body)
                time.sleep(0.2)
        deadline = time.monotonic() + 10
        while disconnects() < before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert disconnects() == before + 2
    assert not [r for r in caplog.records if r.exc_info], "no traceback in the service log"
    assert sum("disconnected" in r.getMessage() for r in caplog.records) == 2
    assert client.post("/v1/score", files=files(("ok.png", png_bytes(2)))).status_code == 200
