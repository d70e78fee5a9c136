"""The deployments for real: ``deploy/prefect.yaml`` checked against the flows, then deployed with ``prefect deploy``
to a real ``prefect server`` on 127.0.0.1 and run once through a real process worker (retrain → challenger →
gate), and ``pipelines serve-deployments`` registering its scheduled deployments on the same server.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.deployments import PROMOTE_DEPLOYMENT, RETRAIN_DEPLOYMENT, WORK_POOL
from tests.servers import VENV_BIN, _stop_process, prefect_server

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deploy" / "prefect.yaml"
LOOSE_RULES = {"min_auroc": 0.5, "max_false_reject_rate": 1.0, "max_escape_rate": 1.0}


def _flow_at(entrypoint: str) -> Any:
    """Import ``path/to/file.py:flow_name`` the way a worker does (by file path from the repository root)."""
    path, name = entrypoint.rsplit(":", 1)
    spec = importlib.util.spec_from_file_location(f"_entry_{Path(path).stem}", ROOT / path)
    assert spec is not None and spec.loader is not None, entrypoint
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return getattr(module, name)


def test_prefect_yaml_names_real_flows_with_matching_parameters() -> None:
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    config = yaml.safe_load(PREFECT_YAML.read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {RETRAIN_DEPLOYMENT, PROMOTE_DEPLOYMENT}
    for name, d in deployments.items():
        flow = _flow_at(d["entrypoint"])
        assert isinstance(flow, Flow), f"{name}: {d['entrypoint']} is not a Prefect flow"
        signature = inspect.signature(flow.fn)
        unknown = set(d.get("parameters", {})) - set(signature.parameters)
        assert not unknown, f"{name}: parameters {unknown} are not parameters of {flow.name}"
        required = {p for p, v in signature.parameters.items() if v.default is inspect.Parameter.empty}
        assert required <= set(d["parameters"]), (
            f"{name}: required parameters {required - set(d['parameters'])} missing"
        )
        assert d["work_pool"]["name"] == WORK_POOL
        for schedule in d.get("schedules") or []:
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # raises on a bad cron or zone
    assert deployments[RETRAIN_DEPLOYMENT]["schedules"][0]["cron"] == "0 2 * * *"
    from pipelines.promotion import GateRules

    GateRules(**deployments[RETRAIN_DEPLOYMENT]["parameters"]["rules"])  # the rules in the file are valid rules


def _api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"{url}{path}",
        data=data,
        method="POST" if body is not None else "GET",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> str:
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, (
        f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with prefect_server(tmp_path_factory.mktemp("prefect_server")) as (api, env):
        yield api, env


@pytest.mark.slow
def test_retraining_deployment_runs_through_a_real_worker(
    server: tuple[str, dict[str, str]], demo_root: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from pipelines.promotion import gate_set_from_folder

    api, base_env = server
    gate = gate_set_from_folder(demo_root, tmp_path / "gate.json")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **base_env,
        "INSPECTOR_PIPELINE_RETRAIN_DATA": str(demo_root),
        "INSPECTOR_PIPELINE_GATE_MANIFEST": str(gate.path),
        "INSPECTOR_PIPELINE_WORK_DIR": str(tmp_path / "work"),
        "INSPECTOR_PIPELINE_CODE_DIR": str(ROOT),
        "MLFLOW_TRACKING_URI": uri,
    }
    prefect = str(VENV_BIN / "prefect")
    _run([prefect, "work-pool", "create", WORK_POOL, "--type", "process"], env)
    _run([prefect, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--all"], env)

    deployment = _api(api, f"/deployments/name/retrain-inspector/{RETRAIN_DEPLOYMENT}")
    assert deployment["work_pool_name"] == WORK_POOL
    assert deployment["parameters"]["data"] == str(demo_root) and deployment["parameters"]["gate_manifest"] == str(
        gate.path
    )
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ], "the worker is told where the code is, explicitly"

    # one run now, on the tiny recipe, through the pool's real worker
    params = {
        "recipe": "tiny",
        "warm_start": False,
        "rules": LOOSE_RULES,
        "tracking_uri": uri,
        "model_name": "deployed",
        "experiment": "deployed",
        "recipe_overrides": {
            "preprocess.height": 64,
            "preprocess.width": 64,
            "train.epochs": 1,
            "epoch_size": 16,
            "train.progress": False,
            "line_precision": "fp32",  # the deployment is the point here; the INT8 candidate is tested in test_flows
        },
    }
    out = _run(
        [prefect, "deployment", "run", f"retrain-inspector/{RETRAIN_DEPLOYMENT}", "--params", json.dumps(params)], env
    )
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)  # type: ignore[union-attr]
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as fh:
        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", WORK_POOL, "--run-once", "--limit", "1"],
            env=env,
            cwd=tmp_path,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 420
        while True:
            state = _api(api, f"/flow_runs/{flow_run_id}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        _stop_process(worker, timeout=30)
    assert state == "COMPLETED", f"flow run {flow_run_id} ended {state}:\n{worker_log.read_text()[-4000:]}"

    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("deployed", "challenger")
    tags = version.tags
    assert tags["gate.decision"] == "promoted", tags  # no champion yet: the (loose) absolute rules decided
    assert str(client.get_model_version_by_alias("deployed", "champion").version) == str(version.version) == "1"
    gate_run = client.get_run(tags["gate.run_id"])
    assert gate_run.data.params["min_auroc"] == "0.5" and "challenger_image_auroc" in gate_run.data.metrics
    runs = _api(api, "/flow_runs/filter", {})
    flows = {_api(api, f"/flows/{r['flow_id']}")["name"]: r["state"]["type"] for r in runs if r["parent_task_run_id"]}
    assert flows == {"train-inspector": "COMPLETED", "promote-inspector": "COMPLETED"}  # subflows of the retraining run


@pytest.mark.slow
def test_serve_deployments_registers_scheduled_deployments(server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    api, base_env = server
    config = tmp_path / "deploy.json"
    config.write_text(
        json.dumps(
            {
                "retrain_cron": "30 3 * * 1-5",
                "timezone": "Europe/Berlin",
                "retrain_parameters": {"gate_manifest": "/srv/gate.json", "data": "/srv/images"},
            }
        )
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(VENV_BIN / "pipelines"), "serve-deployments", "--config", str(config)],
            env=base_env,
            cwd=tmp_path,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        found: dict[str, Any] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                found = _api(api, f"/deployments/name/retrain-inspector/{RETRAIN_DEPLOYMENT}")
                if [x["schedule"]["cron"] for x in found.get("schedules", [])] == ["30 3 * * 1-5"]:
                    break  # (the worker test deployed the same names from prefect.yaml first: wait for serve's update)
            except urllib.error.HTTPError:
                pass
            time.sleep(1)
        assert proc.poll() is None, log.read_text()[-3000:]  # still serving
    finally:
        _stop_process(proc)
    assert found.get("schedules"), log.read_text()[-3000:]
    schedule = found["schedules"][0]["schedule"]
    assert (schedule["cron"], schedule["timezone"]) == ("30 3 * * 1-5", "Europe/Berlin")
    assert found["parameters"] == {"gate_manifest": "/srv/gate.json", "data": "/srv/images"}
    assert _api(api, f"/deployments/name/promote-inspector/{PROMOTE_DEPLOYMENT}")["name"] == PROMOTE_DEPLOYMENT


def test_serve_deployments_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    os.environ.pop("INSPECTOR_PIPELINE_DEPLOY_RETRAIN_CRON", None)
    assert main(["serve-deployments", "--dry-run", "--retrain-cron", "15 1 * * *"]) == 0
    out = capsys.readouterr().out
    assert (
        "retrain-inspector/retrain-nightly: schedules ['15 1 * * *']" in out
        and "promote-inspector/promote-on-demand" in out
    )
