"""One service, several part types, on a real uvicorn on 127.0.0.1: each request scored by its part's model, an
unknown part answered with the parts there are, one part hot-swapped under concurrent load with no failed request
and the other untouched, and ``/metrics`` labelled by part."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from inspector.bundle import BundleSpec, load_bundle, write_bundle  # noqa: E402
from inspector.errors import InspectorError  # noqa: E402
from inspector.service import ServiceSettings  # noqa: E402
from tests.test_service import LiveServer, files, png_bytes  # noqa: E402


@pytest.fixture()
def bundles_dir(tiny_bundle: Path, density_bundle: tuple[Path, dict], tmp_path: Path) -> Path:
    """Two part types in one folder: 'bracket' (patch view only) and 'housing' (with a whole-part view)."""
    root = tmp_path / "bundles"
    shutil.copytree(tiny_bundle, root / "bracket")
    shutil.copytree(density_bundle[0], root / "housing")
    (root / "notes").mkdir()  # not a bundle: left out
    return root


def _bracket_v2(tiny_bundle: Path, root: Path) -> Path:
    b = load_bundle(tiny_bundle)
    spec = BundleSpec(b.spec.preprocessing, b.spec.scoring, b.spec.threshold, model={**b.spec.model, "version": "2"})
    return write_bundle(root / "bracket-v2", b.model_path.read_bytes(), b.references, spec)


def _metric(text: str, name: str, part: str) -> float:
    prefix = f'{name}{{part="{part}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix)).split()[1])


def test_two_part_types_one_swapped_under_load(bundles_dir: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    server = LiveServer(ServiceSettings(bundles_dir=bundles_dir, threads=1)).start()
    image = files(("part.png", png_bytes(7)))
    outcomes: list[tuple[str, int, str | None, bool]] = []
    lock = threading.Lock()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            ready = c.get("/readyz").json()
            assert ready["status"] == "ready" and set(ready["parts"]) == {"bracket", "housing"}
            by_path = c.post("/v1/parts/housing/score", files=image).json()
            by_field = c.post("/v1/score", files=image, data={"part": "housing"}).json()
            by_query = c.post("/v1/score?part=bracket", files=image).json()
            assert by_path["part"] == by_field["part"] == "housing" and by_query["part"] == "bracket"
            assert by_path["results"][0]["views"] and by_query["results"][0].get("views") is None
            assert by_path["results"][0]["score"] == pytest.approx(by_field["results"][0]["score"])
            unknown = c.post("/v1/parts/flange/score", files=image)
            assert unknown.status_code == 404 and "'flange'" in unknown.json()["detail"]
            assert "bracket, housing" in unknown.json()["detail"]
            unnamed = c.post("/v1/score", files=image)
            assert unnamed.status_code == 422 and "bracket, housing" in unnamed.json()["detail"]

        def worker(part: str) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                for _ in range(25):
                    try:
                        r = c.post(f"/v1/parts/{part}/score", files=image)
                        body = r.json() if r.status_code == 200 else {}
                        result = (part, r.status_code, body.get("model_version"), bool(body.get("results")))
                    except httpx.HTTPError as exc:  # a dropped connection is a failure too
                        result = (part, -1, repr(exc), False)
                    with lock:
                        outcomes.append(result)

        threads = [threading.Thread(target=worker, args=(p,)) for p in ("bracket", "housing", "bracket", "housing")]
        for t in threads:
            t.start()
        v2 = _bracket_v2(tiny_bundle, tmp_path)
        with httpx.Client(base_url=server.url, timeout=30) as admin:
            while len(outcomes) < 20:
                threading.Event().wait(0.005)
            swapped = admin.post("/v1/parts/bracket/reload", json={"bundle": str(v2)})
            scored_by_then = len(outcomes)
            for t in threads:
                t.join(timeout=60)
            metrics = admin.get("/metrics").text
            after = admin.post("/v1/score", files=image, data={"part": "bracket"}).json()
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["previous_version"] == "tiny:1" and swapped.json()["model_version"] == "tiny:2"
        assert scored_by_then < 100  # the swap happened under load
        assert len(outcomes) == 100 and [o for o in outcomes if o[1] != 200 or not o[3]] == []
        assert {o[2] for o in outcomes if o[0] == "bracket"} <= {"tiny:1", "tiny:2"}
        assert {o[2] for o in outcomes if o[0] == "housing"} == {"tiny:1"}  # the other part type untouched
        assert after["model_version"] == "tiny:2"
        assert _metric(metrics, "inspector_part_model_swaps_total", "bracket") == 1.0
        assert 'inspector_part_model_swaps_total{part="housing"}' not in metrics
        assert _metric(metrics, "inspector_part_images_scored_total", "housing") == 52.0  # 2 + 50 under load
        assert _metric(metrics, "inspector_part_images_scored_total", "bracket") == 51.0
        assert 'path="/v1/parts/{part}/score"' in metrics and "flange" not in metrics  # bounded labels
    finally:
        server.stop()


def test_part_settings_name_each_source_and_refuse_clashes(tmp_path: Path, tiny_bundle: Path) -> None:
    settings = ServiceSettings.from_env(
        {"INSPECTOR_PARTS": f"bracket={tiny_bundle}, models:/housing@champion", "MLFLOW_TRACKING_URI": "http://h:5000"}
    )
    assert settings.part_sources() == {"bracket": str(tiny_bundle), "housing": "models:/housing@champion"}
    assert ServiceSettings(parts=[str(tiny_bundle)]).part_sources() == {tiny_bundle.name: str(tiny_bundle)}
    with pytest.raises(InspectorError, match="'bracket' is given twice"):
        ServiceSettings(parts=[f"bracket={tiny_bundle}", f"bracket={tmp_path}"]).part_sources()
    with pytest.raises(InspectorError, match="not both"):
        ServiceSettings(bundle=tiny_bundle, parts=[str(tiny_bundle)]).check_source()
    with pytest.raises(InspectorError, match="holds no bundle"):
        ServiceSettings(bundles_dir=tmp_path).part_sources()
    with pytest.raises(InspectorError, match="--tracking-uri"):
        ServiceSettings(parts=["models:/housing@champion"]).check_source()
