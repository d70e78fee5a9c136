"""The loop back from the line: kept parts in a real database (SQLite and a throwaway PostgreSQL), retention on real
files, recording that never fails a scoring request, and the whole loop walked in a real headless Chromium:
the line flags parts, a reviewer marks three, the export re-references the champion, the gate decides."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from inspector.review.estimates import ReviewCounts, line_estimates
from inspector.review.retention import StoredPart, parts_to_purge
from inspector.review.schema import KeptPart
from inspector.review.store import PartFilter, ReviewError, ReviewStore, utcnow
from tests.servers import postgres_cluster, postgres_missing

TOKEN = "review-secret"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


# --------------------------------------------------------------------------------------------- pure rules


def test_line_estimates_scale_reviews_to_the_kept_parts() -> None:
    # 100 flagged, half reviewed: 10 of 50 good; 20 passed kept at 2 % (= 1000 parts), 10 reviewed: 1 defect
    c = ReviewCounts(
        flagged=100, passed=1000.0, flagged_reviewed=50, flagged_good=10, passed_reviewed=10, passed_defect=1
    )
    e = line_estimates(c)
    assert e.false_reject_share == pytest.approx(0.2)
    assert e.false_reject_rate == pytest.approx(20 / (20 + 900))
    assert e.escape_rate == pytest.approx(100 / (80 + 100))
    nothing = line_estimates(ReviewCounts(flagged=5, passed=50.0))
    assert math.isnan(nothing.false_reject_share) and math.isnan(nothing.false_reject_rate)
    assert math.isnan(nothing.escape_rate)


def test_retention_rule_age_first_then_oldest_unreviewed_until_under_budget() -> None:
    now = datetime(2026, 6, 1)
    parts = [
        StoredPart(1, now - timedelta(days=40), 100, reviewed=True),  # too old, reviewed or not
        StoredPart(2, now - timedelta(days=5), 100, reviewed=True),
        StoredPart(3, now - timedelta(days=4), 100, reviewed=False),
        StoredPart(4, now - timedelta(days=3), 100, reviewed=False),
        StoredPart(5, now - timedelta(days=1), 100, reviewed=False),
    ]
    purge = parts_to_purge(parts, now, timedelta(days=30), budget_bytes=250)
    assert purge.old == [1] and purge.over_budget == [3, 4]  # reviewed part 2 outlives newer unreviewed ones
    assert parts_to_purge(parts, now, timedelta(days=30), budget_bytes=10**6).over_budget == []
    assert parts_to_purge(parts, now, timedelta(days=30), budget_bytes=0).over_budget == [3, 4, 5, 2]


# --------------------------------------------------------------------------------------------- the database


def _part(i: int, verdict: str = "anomalous", **kw: object) -> KeptPart:
    values: dict[str, object] = dict(
        recorded_at=utcnow() - timedelta(minutes=10 - i),
        part_type="bracket" if i % 2 else "tile",
        model_version=f"tiny:{1 + i // 3}",
        registry_version=None,
        name=f"part{i}.png",
        image=f"images/{i}.png",
        image_sha256=f"{i:064x}",
        stored_bytes=10,
        heatmap=None,
        score=0.5 + 0.1 * i if verdict == "anomalous" else 0.2,
        threshold=0.5,
        views={"patch": 1.0, "part": 0.5},
        verdict=verdict,
        kept="flagged" if verdict == "anomalous" else "sample",
        sample_rate=1.0 if verdict == "anomalous" else 0.1,
    )
    values.update(kw)
    return KeptPart(**values)


@contextlib.contextmanager
def database(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'review.db'}"
    else:
        reason = postgres_missing()
        if reason:
            pytest.skip(f"PostgreSQL: {reason}")
        with postgres_cluster(tmp_path, database="review") as url:
            yield url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_keeps_parts_decisions_and_their_audit(backend: str, tmp_path: Path) -> None:
    with database(backend, tmp_path) as url:
        store = ReviewStore(url, tmp_path)
        ids = [store.add_part(_part(i)) for i in range(5)] + [store.add_part(_part(5, "good"))]
        assert [p.id for p in store.parts()] == ids[::-1]  # newest first
        assert [p.id for p in store.parts(PartFilter(part_type="tile"))] == [ids[4], ids[2], ids[0]]
        assert [p.id for p in store.parts(PartFilter(verdict="good"))] == [ids[5]]
        assert [p.id for p in store.parts(PartFilter(model_version="tiny:1"))] == ids[:3][::-1]
        assert [p.id for p in store.parts(PartFilter(day=utcnow().date() - timedelta(days=1)))] == []
        assert [p.id for p in store.parts(limit=2, before_id=ids[3])] == [ids[2], ids[1]]

        store.add_review(ids[0], "defect", "ann", "scratch")
        store.add_review(ids[0], "good", "bob")  # a second opinion: appended, and it is the decision now
        store.add_review(ids[1], "defect", "ann", "crack")
        store.add_review(ids[5], "defect", "ann", "dent")  # an escape
        assert store.part(ids[0]).decision == "good" and store.part(ids[0]).reviewer == "bob"
        assert [p.id for p in store.parts(PartFilter(reviewed=False))] == [ids[4], ids[3], ids[2]]
        with pytest.raises(ReviewError, match="a defect needs its type"):
            store.add_review(ids[2], "defect", "ann")
        with pytest.raises(ReviewError, match="unknown decision 'maybe'"):
            store.add_review(ids[2], "maybe", "ann")
        with pytest.raises(ReviewError, match="no such kept part"):
            store.add_review(999, "good", "ann")

        counts = store.counts()
        assert (counts.flagged, counts.flagged_reviewed, counts.flagged_good) == (5, 2, 1)
        assert counts.passed == pytest.approx(10.0) and (counts.passed_reviewed, counts.passed_defect) == (1, 1)
        assert store.reviewed_by_decision() == {"good": 1, "defect": 2}
        assert store.choices()["defect_types"] == ["crack", "dent", "scratch"]
        (day,) = store.days()
        assert (day.flagged, day.flagged_reviewed, day.flagged_good) == (5, 2, 1) and len(day.ratios) == 6

        latest = store.reviewed_after(0)
        assert [(p.part_id, p.decision, p.reviewer) for p in latest] == [
            (ids[0], "good", "bob"),
            (ids[1], "defect", "ann"),
            (ids[5], "defect", "ann"),
        ]
        store.record_export(max(p.review_id for p in latest), 1, 2, {"challenger": None})
        assert store.reviewed_after(store.last_export_watermark()) == []
        store.close()
        page_alone(url, tmp_path)
        again = ReviewStore(url, tmp_path)  # the migrations run again on a current schema: nothing changes
        assert len(again.parts()) == 6 and again.last_export_watermark() == max(p.review_id for p in latest)
        again.close()
    with pytest.raises(ReviewError, match="'not a url': cannot be opened"):
        ReviewStore("not a url", tmp_path)
    with pytest.raises(ReviewError, match=r"'nosuchdb://app:\*\*\*@host/review': cannot be opened"):
        ReviewStore("nosuchdb://app:secret@host/review", tmp_path)


def page_alone(url: str, tmp_path: Path) -> None:
    """``inspector review``'s app over the same database: the token guards it, the parts are there."""
    from fastapi.testclient import TestClient

    from inspector.review.pages import create_review_app
    from inspector.review.settings import RecordingSettings

    settings = RecordingSettings(record_db=url, record_dir=tmp_path, reviewer_token=TOKEN)
    app = create_review_app(settings)
    with TestClient(app) as client:
        assert client.get("/review/api/parts").status_code == 401
        assert client.post("/review/api/login", json={"reviewer": "ann", "token": "nope"}).status_code == 401
        assert client.post("/review/api/login", json={"reviewer": "ann", "token": TOKEN}).status_code == 200
        assert len(client.get("/review/api/parts").json()) == 6  # signed in by cookie now
        assert client.get("/review/parts/1/image").status_code == 404  # these rows name no file on disk
        assert app.state.review.recorder is None  # the page alone records nothing


# --------------------------------------------------------------------------------------------- recording


def _recorded_service(tiny_bundle: Path, tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    from inspector.service import ServiceSettings, create_app

    settings = ServiceSettings(
        bundle=tiny_bundle, threads=1, record=True, record_dir=tmp_path / "rec", token=TOKEN, **kw
    )
    return create_app(settings)


def _images(folder: Path, n: int) -> list[Path]:
    return sorted(folder.glob("*.png"))[:n]


def test_retention_purges_old_and_over_budget_files_and_never_the_line_pcs(
    tiny_bundle: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from inspector.cli import main

    app = _recorded_service(tiny_bundle, tmp_path, record_passed=1.0)
    images = _images(demo_root / "test" / "good", 6)
    with TestClient(app) as client:
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
        assert client.post("/v1/score", files=files, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        recorder = app.state.review.recorder
        recorder.drain()
        store = app.state.review.store
        kept = store.parts()
        assert len(kept) == 6 and all(p.has_image and p.has_heatmap for p in kept)
        root = store.root
        on_disk = sorted(root.rglob("*.png"))
        assert len(on_disk) == 12  # photo + heatmap each
        store.add_review(kept[-1].id, "good", "ann")  # the oldest part, reviewed: its row is the audit

        # a month on: every file past the age limit goes; the reviewed part keeps its row, the others go altogether
        recorder.max_age = timedelta(days=30)
        recorder.apply_retention(now=utcnow() + timedelta(days=31))
        assert not list(root.rglob("*.png"))
        assert [p.id for p in store.parts()] == [kept[-1].id] and not store.part(kept[-1].id).has_image

        # a disk budget of two parts' files: the oldest unreviewed go first
        assert client.post("/v1/score", files=files, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        recorder.drain()
        sizes = {p.id: p.stored_bytes for p in store.stored_parts()}
        newest = sorted(sizes)[-2:]
        recorder.budget_bytes = sum(sizes[i] for i in newest)
        recorder.apply_retention()
        assert sorted(p.id for p in store.stored_parts()) == newest
        assert len(list(root.rglob("*.png"))) == 4
        metrics = client.get("/metrics").text
        assert 'inspector_review_purged_total{rule="age"} 6.0' in metrics
        assert 'inspector_review_purged_total{rule="disk"} 4.0' in metrics

    # `inspector score --record` keeps flagged files by their path on the line PC; retention never deletes them
    monkeypatch.setenv("INSPECTOR_RECORD_DIR", str(tmp_path / "cli"))
    monkeypatch.setenv("INSPECTOR_RECORD_PASSED", "1")
    line_files = _images(demo_root / "test" / "good", 2)
    assert main(["score", *map(str, line_files), "--bundle", str(tiny_bundle), "--json", "--record"]) in (0, 1)
    cli_store = ReviewStore(f"sqlite:///{tmp_path / 'cli' / 'review.db'}", tmp_path / "cli")
    assert {Path(str(cli_store.file_of(p.id, "image"))) for p in cli_store.parts()} == set(line_files)
    from inspector.review.recorder import Recorder

    Recorder(cli_store, passed_rate=1.0, max_age=timedelta(days=1), budget_bytes=0, queue_size=4).apply_retention(
        now=utcnow() + timedelta(days=2)
    )
    assert all(p.is_file() for p in line_files)
    cli_store.close()


def test_a_down_database_a_full_disk_or_a_full_queue_never_fail_scoring(
    tiny_bundle: Path,
    demo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fastapi.testclient import TestClient

    from inspector.review import recorder as recorder_module
    from tests.servers import free_port

    images = _images(demo_root / "test" / "good", 3)
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # nothing listens on this port: a real connection refused, every time
    down = f"postgresql+psycopg2://app@127.0.0.1:{free_port()}/review"
    from inspector.service import ServiceSettings, create_app

    with TestClient(create_app(ServiceSettings(bundle=tiny_bundle, threads=1))) as client:  # recording off
        assert "start the service with --record" in client.get("/review").json()["detail"]
    app = _recorded_service(tiny_bundle, tmp_path, record_db=down, record_passed=1.0)
    with TestClient(app) as client:
        response = client.post("/v1/score", files=files, headers=auth)
        assert response.status_code == 200 and len(response.json()["results"]) == 3
        app.state.review.recorder.drain()
        metrics = client.get("/metrics").text
        # three parts, and the first retention pass
        assert 'inspector_review_record_failures_total{reason="database"} 4.0' in metrics
        assert "inspector_review_database_up 0.0" in metrics
        assert client.get("/review/api/parts", headers=auth).status_code == 503
    assert sum("review recording (database)" in r.message for r in caplog.records) == 1  # one line a minute
    assert not list((tmp_path / "rec").rglob("*.png"))  # files of parts that could not be stored are removed

    def full_disk(path: Path, data: bytes) -> None:  # a full disk cannot be caused here for real
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(recorder_module, "_write_file", full_disk)
    app = _recorded_service(tiny_bundle, tmp_path / "disk", record_passed=1.0, record_queue=1)
    with TestClient(app) as client:
        assert client.post("/v1/score", files=files, headers=auth).status_code == 200
        app.state.review.recorder.drain()
        assert 'inspector_review_record_failures_total{reason="disk"}' in client.get("/metrics").text

    recorder = app.state.review.recorder  # stopped now: a queue of one fills at once
    from inspector.engine import Inspector

    inspector = Inspector.from_bundle(tiny_bundle)
    dropped = recorder.metrics.failures.labels("queue_full")._value.get()
    offered = [recorder.keep(inspector, f"p{i}", 0.9, "anomalous", None, b"x", "tiny") for i in range(3)]
    assert offered == [True, False, False]
    assert recorder.metrics.failures.labels("queue_full")._value.get() == dropped + 2
    # and a queue bounded in image bytes: a burst of large photos is dropped, not held in memory
    monkeypatch.setattr(recorder_module, "QUEUE_BYTES", 5)
    roomy = recorder_module.Recorder(
        recorder.store, passed_rate=1.0, max_age=timedelta(days=1), budget_bytes=10**9, queue_size=10
    )
    assert [roomy.keep(inspector, f"p{i}", 0.9, "anomalous", None, b"abc", "tiny") for i in range(2)] == [True, False]


# --------------------------------------------------------------------------------------------- the loop, in a browser


@pytest.fixture()
def browser() -> Iterator[object]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: object, condition: object, timeout: float = 20):  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


@pytest.mark.slow
def test_the_loop_flagged_parts_reviewed_in_chromium_become_a_gated_challenger(
    tiny_bundle: Path,
    demo_root: Path,
    tmp_path: Path,
    browser: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from inspector.bundle import load_bundle
    from pipelines.data.manifest import read_manifest
    from pipelines.promotion import gate_set_from_folder
    from pipelines.review import review_loop_flow
    from pipelines.tracking import ensure_experiment, register_bundle
    from tests.test_service import LiveServer

    # the registry: the tiny bundle is the champion the line serves
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    ensure_experiment("review-loop")
    with mlflow.start_run() as run:
        register_bundle(tiny_bundle, "line", run_id=run.info.run_id)
    MlflowClient().set_registered_model_alias("line", "champion", "1")
    gate = gate_set_from_folder(demo_root, tmp_path / "gate.json")

    # 1. the line flags parts (the tiny random model flags these demo parts) and keeps them
    from inspector.service import ServiceSettings

    settings = ServiceSettings(
        bundle=tiny_bundle, threads=1, record=True, record_dir=tmp_path / "rec", token=TOKEN, record_passed=0.0
    )
    server = LiveServer(settings).start()
    try:
        import httpx

        parts = _images(demo_root / "test" / "good", 3) + _images(demo_root / "test" / "scratch", 2)
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in parts]
        scored = httpx.post(f"{server.url}/v1/score", files=files, headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert sum(r["verdict"] == "anomalous" for r in scored["results"]) >= 3
        server.app.state.review.recorder.drain()

        # 2. a reviewer signs in and marks three parts, two by keyboard as good and one as a scratch
        driver = browser
        driver.get(f"{server.url}/review")  # type: ignore[attr-defined]
        _wait(driver, lambda d: d.find_element(By.ID, "login").is_displayed())
        driver.find_element(By.ID, "login-name").send_keys("Quality Eng")  # type: ignore[attr-defined]
        driver.find_element(By.ID, "login-token").send_keys("wrong", Keys.ENTER)  # type: ignore[attr-defined]
        _wait(driver, lambda d: "wrong reviewer token" in d.find_element(By.ID, "login-error").text)
        token = driver.find_element(By.ID, "login-token")  # type: ignore[attr-defined]
        token.clear()
        token.send_keys(TOKEN, Keys.ENTER)
        cards = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "article.part"))
        flagged = [p for p in scored["results"] if p["verdict"] == "anomalous"]
        assert len(cards) == len(flagged)
        first = cards[0]
        assert "against threshold 0.500" in first.find_element(By.CLASS_NAME, "score").text
        loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
        for img in ("photo", "heatmap"):
            _wait(driver, lambda d: d.execute_script(loaded, first.find_element(By.CLASS_NAME, img)))
        assert driver.find_elements(By.CSS_SELECTOR, "#plot-hist rect.bin")  # type: ignore[attr-defined]
        body = driver.find_element(By.TAG_NAME, "body")  # type: ignore[attr-defined]

        def decision(i: int) -> str:  # read in one script: a decided card is replaced under Selenium's feet
            script = "return [...document.querySelectorAll('article.part .decision')].map(e => e.textContent.trim())"
            return str(driver.execute_script(script)[i])  # type: ignore[attr-defined]

        body.send_keys("g")
        _wait(driver, lambda d: decision(0) == "good (false reject)")
        body.send_keys("g")  # the selection moved on by itself
        _wait(driver, lambda d: decision(1) == "good (false reject)")
        body.send_keys("d")  # focuses the defect type of the selected part
        driver.switch_to.active_element.send_keys("scratch", Keys.ENTER)  # type: ignore[attr-defined]
        _wait(driver, lambda d: decision(2) == "defect: scratch")
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#plot-fr circle.point"))
        # the filters: reviewed parts only
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "f-reviewed")).select_by_value("true")  # type: ignore[attr-defined]
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.part")) == 3)

        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'inspector_review_reviewed_parts{decision="good"} 2.0' in metrics
        assert f"inspector_review_confirmed_false_reject_share {2 / 3}" in metrics
    finally:
        server.stop()

    # 3. the export: two golden references, a labelled defect, a re-referenced challenger, the gate
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    recal = [str(p) for p in _images(demo_root / "train" / "good", 16)]
    loop = functools.partial(
        review_loop_flow,
        settings.database_url(),
        str(settings.recording_dir()),
        "line",
        str(gate.path),
        work_dir=str(tmp_path / "loop"),
        experiment="review-loop",
        tracking_uri=uri,
        rules={"min_auroc": 0.0, "max_false_reject_rate": 1.0, "max_escape_rate": 1.0, "auroc_tolerance": 1.0},
    )
    with prefect_test_harness(server_startup_timeout=120):
        outcome = loop(recalibrate_good=recal)
        again = loop()
    print(f"review -> gated challenger: {outcome['seconds']} s")
    assert outcome["export"]["false_rejects"] == 2 and outcome["export"]["defects"] == 1
    assert outcome["challenger"] == "2" and outcome["decision"]["challenger"]["version"] == "2"
    aliases = {k: str(v) for k, v in MlflowClient().get_registered_model("line").aliases.items()}
    assert aliases["challenger"] == "2" and aliases["champion"] == ("2" if outcome["decision"]["moved"] else "1")
    manifest = read_manifest(outcome["export"]["manifest"])
    assert sorted((e.label, e.defect_type) for e in manifest.entries) == [(0, "good"), (0, "good"), (1, "scratch")]
    export_dir = Path(outcome["export"]["manifest"]).parent
    audit = json.loads((export_dir / "reviews.json").read_text())
    assert {a["reviewer"] for a in audit} == {"Quality Eng"} and len(audit) == 3
    challenger = load_bundle(next((tmp_path / "loop").glob("*/bundle")))
    change = challenger.spec.provenance["reference_change"]
    assert len(change["added"]) == 2 and change["recalibrated"]
    assert challenger.spec.threshold.details["scored_against"] == "new reference bank"
    assert again["export"]["false_rejects"] == 0 and again["challenger"] is None  # nothing is exported twice
