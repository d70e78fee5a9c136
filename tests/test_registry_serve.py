"""`inspector serve --model-uri models:/<name>@champion` against a real `mlflow server` on 127.0.0.1.

One scenario on one registry (servers are the expensive part): serve version 1; move the alias to version 2 while
4 clients score (zero failed requests); pin and unpin through /v1/reload; stop the registry (the line keeps
scoring and says so) and restart it (recovers); a version whose artifact was tampered with in the store is refused
with back-off while the old version serves; a restart with the registry down serves the cached version. Plus the
``file:`` artifact path, and unit tests of URI and MLmodel parsing and of the cache.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.bundle import load_bundle
from inspector.errors import BundleError
from inspector.registry import (
    BundleCache,
    ModelUri,
    ModelVersionRef,
    RegistryClient,
    RegistryError,
    RegistrySource,
    RegistryUnreachable,
    _auth_header,
    bundle_path_in_mlmodel,
    mlmodel_scalars,
    parse_model_uri,
)
from inspector.registry_contract import bundle_hash_tags, check_bundle_matches_tags
from tests.servers import _stop_process, free_port, start_mlflow_server

ROOT = Path(__file__).resolve().parents[1]

MLMODEL = """\
artifact_path: mlflow-artifacts:/1/models/m-458b/artifacts
flavors:
  python_function:
    artifacts:
      bundle:
        path: artifacts/bundle
        uri: /tmp/register-bundle-bqfupfqf/bundle
    cloudpickle_version: 3.1.3
    code: code
    env:
      conda: conda.yaml
      virtualenv: python_env.yaml
    loader_module: mlflow.pyfunc.model
    python_model: python_model.pkl
metadata:
  bundle_model_version: tiny:1
  threshold: 0.5
model_id: m-458b
signature:
  inputs: null
  outputs: '[{"type": "string", "name": "path", "required": true}, {"type": "double",
    "name": "score", "required": false}, {"type": "string", "name": "verdict", "required":
    true}]'
utc_time_created: '2026-11-25 11:26:41.881752'
"""


# ------------------------------------------------------------------------------------------------ unit tests


def test_parse_model_uri() -> None:
    assert parse_model_uri("models:/parts@champion") == ModelUri("parts", alias="champion")
    assert parse_model_uri(" models:/line-7.parts/12 ") == ModelUri("line-7.parts", version="12")
    assert str(parse_model_uri("models:/parts@champion")) == "models:/parts@champion"
    assert str(parse_model_uri("models:/parts/3")) == "models:/parts/3"
    for bad in (
        "runs:/abc/model",
        "models:/parts",
        "models:/parts/latest",
        "models:/parts@",
        "/srv/bundle",
        "models:/a/b/1",
    ):
        with pytest.raises(RegistryError, match="not a registry model URI"):
            parse_model_uri(bad)


def test_mlmodel_parsing_finds_the_bundle_and_nothing_else() -> None:
    scalars = mlmodel_scalars(MLMODEL)
    assert scalars[("flavors", "python_function", "artifacts", "bundle", "path")] == "artifacts/bundle"
    assert scalars[("flavors", "python_function", "env", "conda")] == "conda.yaml"
    assert scalars[("metadata", "threshold")] == "0.5"
    assert scalars[("utc_time_created",)] == "2026-11-25 11:26:41.881752"  # quotes removed
    assert ("signature", "inputs") in scalars and not any(
        k[0] == '"name"' for k in scalars
    )  # continuation lines skipped
    assert bundle_path_in_mlmodel(MLMODEL, "models:/x@c") == "artifacts/bundle"

    not_ours = MLMODEL.replace(
        "      bundle:\n        path: artifacts/bundle\n", "      weights:\n        path: artifacts/w\n"
    )
    with pytest.raises(RegistryError, match=r"models:/x@c: not an inspector model"):
        bundle_path_in_mlmodel(not_ours, "models:/x@c")
    escaping = MLMODEL.replace("path: artifacts/bundle", "path: ../../etc")
    with pytest.raises(RegistryError, match="invalid bundle path"):
        bundle_path_in_mlmodel(escaping, "models:/x@c")
    with pytest.raises(RegistryError, match="not an inspector model"):
        bundle_path_in_mlmodel("", "models:/x@c")


def test_client_settings_auth_and_refusals() -> None:
    assert _auth_header({"MLFLOW_TRACKING_TOKEN": "t0k"}) == "Bearer t0k"
    assert _auth_header({"MLFLOW_TRACKING_USERNAME": "line", "MLFLOW_TRACKING_PASSWORD": "pw"}) == "Basic bGluZTpwdw=="
    assert _auth_header({}) is None
    for uri in ("sqlite:////var/mlflow.db", "file:///srv/mlruns", "127.0.0.1:5000"):
        with pytest.raises(RegistryError, match="over http"):
            RegistryClient(uri)
    client = RegistryClient("http://127.0.0.1:9/", timeout=2, env={})
    assert client.base == "http://127.0.0.1:9"
    with pytest.raises(RegistryUnreachable, match=r"models:/parts@champion: registry http://127.0.0.1:9 unreachable"):
        client.resolve("models:/parts@champion")
    with pytest.raises(RegistryError, match="s3.*proxied artifacts"):
        client.artifacts("s3://bucket/1/models/m-1/artifacts", "models:/parts/1")


def test_cache_remembers_served_versions_and_drops_tampered_copies(tiny_bundle: Path, tmp_path: Path) -> None:
    cache = BundleCache(tmp_path / "cache")
    assert cache.remembered("models:/tiny@champion") is None
    assert cache.remembered("models:/tiny/4") == "4"  # a pinned version needs no memory
    cache.remember("models:/tiny@champion", "3")
    assert cache.remembered("models:/tiny@champion") == "3" and cache.remembered("models:/tiny@challenger") is None

    shutil.copytree(tiny_bundle, cache.version_dir("tiny", "3"))
    bundle = cache.cached("tiny", "3")
    assert bundle is not None
    source = RegistrySource(RegistryClient("http://127.0.0.1:9", timeout=1, env={}), cache)
    assert source.cached_for("models:/tiny@champion").version == "3"  # type: ignore[union-attr]

    tags = bundle_hash_tags(bundle)
    assert tags["bundle_sha256.model"] == bundle.manifest["files"]["model.onnx"]
    assert tags["bundle_sha256.manifest"] == bundle.manifest["manifest_sha256"]
    check_bundle_matches_tags(bundle, tags, "models:/tiny/3")
    with pytest.raises(BundleError, match=r"models:/tiny/3: model.onnx sha256 .* does not match the registry's tag"):
        check_bundle_matches_tags(bundle, {**tags, "bundle_sha256.model": "0" * 64}, "models:/tiny/3")
    with pytest.raises(BundleError, match=r"inspector.json sha256 .* does not match the registry's tag"):
        check_bundle_matches_tags(bundle, {**tags, "bundle_sha256.manifest": "0" * 64}, "models:/tiny/3")

    # the registry now holds another bundle under number 3 (store rebuilt): the stale copy goes, a download is tried
    shutil.copytree(tiny_bundle, cache.version_dir("tiny", "5"))
    with pytest.raises(RegistryUnreachable):
        cache.fetch(
            source.client, ModelVersionRef("models:/tiny@champion", "tiny", "5", {"bundle_sha256.references": "f" * 64})
        )
    assert not cache.version_dir("tiny", "5").exists() and not list(cache.version_dir("tiny", "5").parent.glob(".5.*"))

    (cache.version_dir("tiny", "3") / "references.npy").write_bytes(b"tampered on disk")
    assert cache.cached("tiny", "3") is None and not cache.version_dir("tiny", "3").exists()
    assert source.cached_for("models:/tiny@champion") is None


# ------------------------------------------------------------------------------------------------ real servers


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (36, 30, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundles(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two distinguishable bundles: the tiny one, and a copy with one more golden reference."""
    from inspector.references import add_references

    root = tmp_path_factory.mktemp("bundles")
    extra = root / "extra_good.png"
    extra.write_bytes(png_bytes(99))
    v2 = add_references(tiny_bundle, [extra], root / "v2", threads=1)
    assert load_bundle(v2).references.shape[0] > load_bundle(tiny_bundle).references.shape[0]
    return {"v1": tiny_bundle, "v2": v2}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real ``mlflow server`` (SQLite, proxied artifacts) this process registers into; restartable on its port."""
    mlflow = pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("registry")
    url, stop = start_mlflow_server(root)
    state = {"url": url, "root": root, "stop": stop, "port": int(url.rsplit(":", 1)[1])}
    old_env = {
        k: os.environ.get(k)
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    }
    os.environ["MLFLOW_TRACKING_URI"] = url
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        yield state
    finally:
        state["stop"]()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for k, v in old_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def register(bundle: Path, name: str, alias: str, experiment: str = "line-7", artifact_root: Path | None = None) -> str:
    import mlflow

    from pipelines import tracking

    tracking.ensure_experiment(experiment, artifact_root)
    with mlflow.start_run():
        return tracking.register_bundle(bundle, name, alias=alias).version


def set_alias(name: str, alias: str, version: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, version)


class Service:
    """``inspector serve`` as a real subprocess (uvicorn) on a free 127.0.0.1 port."""

    def __init__(self, *args: str, log: Path) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "INSPECTOR_"))}
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "inspector.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    "--threads",
                    "1",
                    "--log-level",
                    "warning",
                    *args,
                ],
                cwd=ROOT,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.http = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"service exited with {self.proc.returncode}:\n{log.read_text()}"
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"service not ready:\n{log.read_text()}")

    def score(self, seed: int = 7) -> dict:
        r = self.http.post("/v1/score", files=[("files", ("part.png", png_bytes(seed), "image/png"))])
        assert r.status_code == 200, r.text
        return r.json()

    def ready(self) -> dict:
        r = self.http.get("/readyz")
        assert r.status_code == 200, r.text
        return r.json()

    def metric(self, name: str) -> float:
        match = re.search(rf"^{re.escape(name)} (\S+)$", self.http.get("/metrics").text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def stop(self) -> None:
        self.http.close()
        _stop_process(self.proc)


@pytest.fixture()
def services() -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(*args: str, log: Path) -> Service:
        started.append(Service(*args, log=log))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def wait_until(check: Callable[[], bool], timeout: float, what: str, service: Service | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            state = f"\n/readyz: {service.ready()}\nlog:\n{service.log.read_text()[-3000:]}" if service else ""
            raise AssertionError(f"timed out waiting for {what}{state}")
        time.sleep(0.1)


def tamper_artifact(registry: dict, name: str, version: str) -> Path:
    """Corrupt references.npy of one registered version where the server stores it (its artifact destination)."""
    uri = RegistryClient(registry["url"], timeout=10).download_uri(
        ModelVersionRef(f"models:/{name}/{version}", name, version)
    )
    assert uri.startswith("mlflow-artifacts:/"), uri
    target = (
        registry["root"]
        / "artifacts"
        / uri.removeprefix("mlflow-artifacts:/")
        / "artifacts"
        / "bundle"
        / "references.npy"
    )
    target.write_bytes(target.read_bytes()[:-16] + b"\x00" * 16)
    return target


def test_file_artifact_location_is_read_from_disk(registry: dict, bundles: dict[str, Path], tmp_path: Path) -> None:
    """An experiment whose artifacts live on a ``file:`` location (a share this host mounts): no proxy involved."""
    version = register(
        bundles["v2"], "line7-file", "champion", experiment="line-7-file", artifact_root=tmp_path / "share"
    )
    client = RegistryClient(registry["url"], timeout=5)
    ref = client.resolve("models:/line7-file@champion")
    assert ref.version == version and client.download_uri(ref).startswith("file://")
    source = RegistrySource(client, BundleCache(tmp_path / "cache"))
    fetched = source.fetch("models:/line7-file@champion")
    assert fetched.downloaded and fetched.version == version
    assert load_bundle(fetched.path).manifest["files"] == load_bundle(bundles["v2"]).manifest["files"]
    again = source.fetch("models:/line7-file@champion")
    assert not again.downloaded and again.path == fetched.path
    with pytest.raises(RegistryError, match=r"models:/line7-file@nope: unknown alias"):
        client.resolve("models:/line7-file@nope")
    with pytest.raises(RegistryError, match=r"models:/no-such-model@champion: not found"):
        client.resolve("models:/no-such-model@champion")


def test_line_service_follows_the_champion(
    registry: dict, bundles: dict[str, Path], services: Callable[..., Service], tmp_path: Path
) -> None:
    name = "line7-parts"
    assert register(bundles["v1"], name, "champion") == "1"
    cache = tmp_path / "cache"
    args = (
        "--model-uri",
        f"models:/{name}@champion",
        "--tracking-uri",
        registry["url"],
        "--poll-seconds",
        "0.5",
        "--registry-timeout",
        "5",
        "--cache-dir",
        str(cache),
    )
    svc = services(*args, log=tmp_path / "service1.log")

    # version 1 from the registry, verified into the cache
    ready = svc.ready()
    assert ready["registry_version"] == "1" and ready["model_uri"] == f"models:/{name}@champion"
    assert ready["registry"]["status"] == "reachable" and ready["bundle"] == str(cache / name / "1")
    assert svc.score()["registry_version"] == "1"
    assert load_bundle(cache / name / "1").manifest["files"] == load_bundle(bundles["v1"]).manifest["files"]

    # the champion moves to version 2 while 4 clients score: the service follows, no request fails
    assert register(bundles["v2"], name, "challenger") == "2"
    assert svc.ready()["registry_version"] == "1"  # a challenger is not served
    outcomes: list[tuple[int, str | None]] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(seed: int) -> None:
        import httpx

        with httpx.Client(base_url=svc.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/score", files=[("files", ("p.png", png_bytes(seed), "image/png"))])
                    outcome = (r.status_code, r.json().get("registry_version") if r.status_code == 200 else r.text)
                except httpx.HTTPError as exc:
                    outcome = (-1, repr(exc))
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(outcomes) >= 20, 60, "requests before the swap")
        set_alias(name, "champion", "2")
        wait_until(lambda: any(v == "2" for _, v in outcomes), 60, "the service to serve version 2", svc)
        n = len(outcomes)
        wait_until(lambda: len(outcomes) >= n + 20, 60, "requests after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    failures = [o for o in outcomes if o[0] != 200]
    assert failures == [] and len(outcomes) >= 40
    assert {v for _, v in outcomes} == {"1", "2"}
    assert outcomes[-1][1] == "2"
    assert svc.metric("inspector_model_swaps_total") == 1.0 and svc.metric("inspector_model_registry_version") == 2.0

    # /v1/reload takes a model URI: pin version 1, then follow the champion again
    pinned = svc.http.post("/v1/reload", json={"model_uri": f"models:/{name}/1"})
    assert pinned.status_code == 200 and pinned.json()["registry_version"] == "1"
    time.sleep(1.2)  # polls see the champion unchanged: a manual pin holds until the champion moves
    assert svc.score()["registry_version"] == "1"
    unknown = svc.http.post("/v1/reload", json={"model_uri": f"models:/{name}@nope"})
    assert unknown.status_code == 422 and "unknown alias" in unknown.json()["detail"]
    back = svc.http.post("/v1/reload", json={"model_uri": f"models:/{name}@champion"})
    assert back.status_code == 200 and back.json()["registry_version"] == "2"

    # the registry goes down: the line keeps scoring with version 2 and says so
    registry["stop"]()
    wait_until(
        lambda: svc.ready()["registry"]["status"] == "unreachable", 30, "/readyz to report the registry down", svc
    )
    ready = svc.ready()
    assert ready["status"] == "ready" and ready["registry_version"] == "2"
    assert (
        ready["registry"]["detail"].startswith("unreachable since ")
        and "Connection refused" in ready["registry"]["error"]
    )
    assert svc.metric("inspector_registry_up") == 0.0
    last_success = svc.metric("inspector_registry_last_success_timestamp_seconds")
    assert 0 < last_success <= time.time()
    assert svc.score()["registry_version"] == "2"

    # it comes back on the same address: the service sees it again
    registry["url"], registry["stop"] = start_mlflow_server(registry["root"], port=registry["port"])
    wait_until(lambda: svc.ready()["registry"]["status"] == "reachable", 60, "/readyz to report the registry back", svc)
    assert svc.metric("inspector_registry_up") == 1.0
    assert svc.metric("inspector_registry_last_success_timestamp_seconds") > last_success

    # version 3's artifact is corrupted in the store after registration: refused, version 2 keeps serving
    assert register(bundles["v1"], name, "challenger") == "3"
    tamper_artifact(registry, name, "3")
    set_alias(name, "champion", "3")
    wait_until(lambda: svc.ready()["registry"]["refused_versions"] == ["3"], 60, "version 3 to be refused", svc)
    ready = svc.ready()
    assert ready["registry_version"] == "2" and ready["registry"]["latest_version"] == "3"
    assert "version 3 refused" in ready["error"] and "references.npy" in ready["error"] and "sha256" in ready["error"]
    assert svc.metric("inspector_registry_refused_version") == 3.0
    assert svc.score()["registry_version"] == "2"
    assert not (cache / name / "3").exists()  # nothing half-verified in the cache
    failed_before = svc.metric('inspector_model_reloads_total{result="failed"}')
    polls_before = svc.metric('inspector_registry_polls_total{result="ok"}')
    polls = lambda: svc.metric('inspector_registry_polls_total{result="ok"}') - polls_before  # noqa: E731
    wait_until(lambda: polls() >= 10, 60, "10 more polls", svc)
    retries = svc.metric('inspector_model_reloads_total{result="failed"}') - failed_before
    assert retries <= polls() // 2, (polls(), retries)  # backed off (1, 2, 4 … s): not one download per poll
    started = time.monotonic()
    svc.stop()  # SIGTERM: uvicorn drains, the lifespan stops the poller, uvicorn re-raises SIGTERM (clean for systemd)
    assert svc.proc.returncode == -signal.SIGTERM and time.monotonic() - started < 15, svc.log.read_text()[-2000:]

    # restart with the registry down: the cache serves the version last served for the alias (2, not the bad 3)
    registry["stop"]()
    svc2 = services(*args, log=tmp_path / "service2.log")
    ready = svc2.ready()
    assert ready["registry_version"] == "2" and ready["registry"]["status"] == "unreachable"
    assert svc2.score()["registry_version"] == "2"
    assert svc2.metric("inspector_registry_up") == 0.0
    assert "serving the cached version" in (tmp_path / "service2.log").read_text()
