"""`deploy/` cannot run here (no Docker engine, no systemd boot), so check it against the real tools instead:

- every command in compose.yaml, the systemd units and deploy/README.md is parsed by the real CLI it calls
  (`inspector` and `pipelines` argparse, `mlflow server` click, `prefect` help), so a renamed flag fails here;
- the inspector's environment files and compose environment build a valid ``ServiceSettings`` (no unknown
  ``INSPECTOR_*`` names);
- compose services have healthchecks, declared volumes, existing Dockerfile targets, and every ``${VAR}`` is in
  the example env file; units are hardened, non-root, restarting, and pass ``systemd-analyze verify``;
- ``postgres/init-databases.sh`` creates both databases on a real throwaway PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
VENV_BIN = Path(sys.executable).parent
SERVICES = {"postgres", "mlflow", "prefect-server", "worker", "inspector"}
#: the batch-scoring services, in compose profile "batch" (started with --profile batch)
BATCH_SERVICES = {"dask-scheduler", "dask-worker", "ray-head", "scoring-worker"}


# --------------------------------------------------------------------------------------------------- helpers


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path}: bad line {line!r}"
            values[key] = value
    return values


def unit_directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """[section] -> key -> values (systemd allows repeated keys; no line continuations are used in ours)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path}: keep directives on one line"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path}: directive outside a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@cache
def cli_flags(*command: str) -> frozenset[str]:
    """Long options the real CLI lists in ``command --help``."""
    out = subprocess.run(
        [str(VENV_BIN / command[0]), *command[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    assert out.returncode == 0, out.stderr
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


def check_argparse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {' '.join(argv)!r} is rejected by the real CLI (see the usage error above)")


def check_command(argv: list[str], where: str) -> None:
    """Parse ``argv`` with the CLI it names: argparse/click for ours and MLflow, the help text for Prefect."""
    program = Path(argv[0]).name
    if program == "inspector":
        from inspector.cli import _parser

        check_argparse(_parser(), argv[1:], where)
    elif program == "pipelines":
        from pipelines.cli import _parser as pipelines_parser

        check_argparse(pipelines_parser(), argv[1:], where)
    elif program == "mlflow":
        from mlflow.cli import cli

        assert argv[1] == "server", f"{where}: unexpected mlflow command {argv}"
        import click

        try:
            cli.commands["server"].make_context("server", list(argv[2:]))
        except click.UsageError as exc:
            pytest.fail(f"{where}: {' '.join(argv)!r} is rejected by mlflow server: {exc}")
    elif program in ("dask", "ray"):
        words = [a for a in argv[1:] if not a.startswith("-")][:1]
        assert words and words[0] in {"dask": {"scheduler", "worker"}, "ray": {"start"}}[program], (where, argv)
        flags = cli_flags(program, words[0])
        used = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")}
        assert used <= flags, f"{where}: {program} {words[0]} has no {sorted(used - flags)}"
    elif program == "prefect":
        args = [a for a in argv[1:] if a != "--no-prompt"]
        words = [a for a in args if not a.startswith("-")]
        sub = {"server": 2, "worker": 2, "work-pool": 2, "deploy": 1, "deployment": 2}[words[0]]
        flags = cli_flags("prefect", *words[:sub])
        used = {a.split("=", 1)[0] for a in args if a.startswith("--")}
        assert used <= flags, f"{where}: prefect {' '.join(words[:sub])} has no {sorted(used - flags)}"
    else:
        pytest.fail(f"{where}: unknown program {program!r}")


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


# --------------------------------------------------------------------------------------------------- compose


def test_compose_services_health_volumes_and_images() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == SERVICES | BATCH_SERVICES
    assert all(services[name].get("profiles") == ["batch"] for name in BATCH_SERVICES)  # a plain `up` leaves them out
    assert not any(services[name].get("profiles") for name in SERVICES)
    declared_volumes = set(spec.get("volumes") or {})
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M))
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", f"{name}: no healthcheck"
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/", "$")):
                if source.startswith("./"):
                    assert (DEPLOY / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services and cond == {"condition": "service_healthy"}, (name, dep)
        if name in BATCH_SERVICES:  # the batch image: scoring without torch, the same code as the flow
            assert svc["build"]["target"] == "scorer" and svc["image"] == "siamese-inspector/scorer:latest", name
        if "build" in svc:
            assert svc["build"]["target"] in targets, f"{name}: Dockerfile has no target {svc['build']['target']}"
            assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and svc["build"]["context"] == ".."
    # every COPY source of the Dockerfile exists in the repository (build context = repository root)
    for line in re.findall(r"^COPY (.+)$", (DEPLOY / "Dockerfile").read_text(), re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    # the registry-backed inspector keeps its verified bundles on a volume, and its port matches its healthcheck
    inspector = services["inspector"]
    assert "inspector-cache:/var/cache/inspector" in inspector["volumes"]
    assert "/var/cache/inspector" in inspector["command"] and "8000/readyz" in inspector["healthcheck"]["test"][-1]


def test_compose_variables_are_in_the_example_env_and_no_secrets_are_inline() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    example = read_env_file(DEPLOY / "stack.env.example")
    for name, _default in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)(:?[-?][^}]*)?\}", text):
        assert name in example, f"compose.yaml uses ${{{name}}} but stack.env.example does not set it"
    inline = re.findall(r"^\s*\w*(?:PASSWORD|TOKEN)\w*:\s*(?!\$\{)\S.*$", text, re.M)
    assert inline == [], f"secrets written into compose.yaml: {inline}"
    assert "INSPECTOR_TOKEN: ${INSPECTOR_TOKEN:?" in text


def test_compose_commands_parse_with_the_real_clis() -> None:
    pytest.importorskip("mlflow")
    services = compose()["services"]
    checked = []
    for name, svc in services.items():
        if "command" not in svc:
            continue
        argv = list(svc["command"])
        if name == "inspector":
            argv = ["inspector", *argv]  # the line image's ENTRYPOINT
        check_command(argv, f"compose.yaml service {name}")
        checked.append(argv[0])
    assert sorted(checked) == ["dask", "dask", "inspector", "mlflow", "prefect", "prefect", "prefect", "ray"]


def test_batch_services_share_results_and_point_at_the_cluster() -> None:
    """Workers read the sources and write results at the same paths as the flow; the scoring worker's default cluster
    is the compose scheduler; every worker reports to the Prefect API and reads the registry."""
    services = compose()["services"]
    for name in ("dask-worker", "ray-head", "scoring-worker"):
        assert "batch-results:/batch" in services[name]["volumes"], name
        assert services[name]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
    scheduler = services["dask-scheduler"]["command"]
    port = scheduler[scheduler.index("--port") + 1]
    assert (
        services["scoring-worker"]["environment"]["INSPECTOR_PIPELINE_DASK_ADDRESS"] == f"tcp://dask-scheduler:{port}"
    )
    assert services["dask-worker"]["command"][2] == f"tcp://dask-scheduler:{port}"
    assert services["scoring-worker"]["command"][3:5] == ["--pool", "inspector-scoring"]


def test_scoring_deployment_names_the_flow_with_its_parameters() -> None:
    import importlib.util
    import inspect

    from prefect import Flow

    config = yaml.safe_load((DEPLOY / "prefect-scoring.yaml").read_text())
    (deployment,) = config["deployments"]
    path, name = deployment["entrypoint"].rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("_scoring_entry", ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    flow = getattr(module, name)
    assert isinstance(flow, Flow)
    parameters = inspect.signature(flow.fn).parameters
    assert set(deployment["parameters"]) <= set(parameters)
    assert deployment["work_pool"]["name"] == "inspector-scoring"
    assert deployment["parameters"]["engine"] in ("dask", "ray")
    assert config["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == (
        "{{ $INSPECTOR_PIPELINE_CODE_DIR }}"
    )


def test_compose_inspector_environment_is_a_valid_registry_service() -> None:
    from inspector.cli import _parser
    from inspector.service import ServiceSettings

    svc = compose()["services"]["inspector"]
    example = read_env_file(DEPLOY / "stack.env.example")
    env = {
        k: re.sub(r"\$\{([A-Z0-9_]+)[^}]*\}", lambda m: example[m.group(1)], str(v))
        for k, v in svc["environment"].items()
    }
    args = check_argparse(_parser(), list(svc["command"]), "compose inspector")
    settings = _settings_from(env, args)
    assert settings.model_uri == "models:/parts-inspector@champion" and settings.tracking_uri == "http://mlflow:5000"
    assert settings.cache_dir == Path("/var/cache/inspector") and settings.host == "0.0.0.0"
    settings.check_source()
    assert isinstance(settings, ServiceSettings)


def _settings_from(env: dict[str, str], args: argparse.Namespace):
    """What ``inspector serve`` would build from this environment and these flags (the CLI's own code path)."""
    from inspector.cli import serve_settings
    from inspector.service import ServiceSettings

    unknown = [
        k
        for k in env
        if k.startswith("INSPECTOR_") and k[len("INSPECTOR_") :].lower() not in ServiceSettings.model_fields
    ]
    assert not unknown, f"not inspector settings: {unknown}"
    saved = {k: os.environ.get(k) for k in (*env, "MLFLOW_TRACKING_URI")}
    try:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.update(env)
        return serve_settings(args)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# --------------------------------------------------------------------------------------------------- systemd


def test_units_are_hardened_non_root_restarting_and_use_example_env_files() -> None:
    # each runs as its own non-root account; the servers restart when they fail, the line and the worker also
    # after a clean exit (they must always run)
    expected = {
        "mlflow.service": ("mlflow", "on-failure"),
        "prefect-server.service": ("prefect", "on-failure"),
        "prefect-worker.service": ("inspector", "always"),
        "inspector.service": ("inspector", "always"),
    }
    assert {u.name for u in UNITS} == set(expected)
    for unit in UNITS:
        d = unit_directives(unit)
        service = d["Service"]
        user, restart = expected[unit.name]
        assert service["User"] == service["Group"] == [user], unit.name
        assert service["Restart"] == [restart], unit.name
        for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules", "RestrictSUIDSGID"):
            assert service[key] == ["yes"], f"{unit.name}: {key}"
        assert service["ProtectSystem"] == ["strict"] and service["CapabilityBoundingSet"] == [""], unit.name
        assert d["Install"]["WantedBy"] == ["multi-user.target"] and "network-online.target" in d["Unit"]["After"][0]
        (env_file,) = service["EnvironmentFile"]
        name = re.fullmatch(r"/etc/inspector/([a-z-]+)\.env", env_file)
        assert name and (DEPLOY / f"{name.group(1)}.env.example").is_file(), f"{unit.name}: no example for {env_file}"
        read_env_file(DEPLOY / f"{name.group(1)}.env.example")
    inspector = unit_directives(DEPLOY / "systemd" / "inspector.service")["Service"]
    assert (
        inspector["CacheDirectory"] == ["inspector"] and "--cache-dir /var/cache/inspector" in inspector["ExecStart"][0]
    )
    assert int(inspector["TimeoutStopSec"][0]) > 30  # longer than uvicorn's graceful drain
    assert "PrivateDevices" not in unit_directives(DEPLOY / "systemd" / "prefect-worker.service")["Service"]  # GPU


def test_unit_commands_parse_with_the_real_clis() -> None:
    pytest.importorskip("mlflow")
    for unit in UNITS:
        (exec_start,) = unit_directives(unit)["Service"]["ExecStart"]
        argv = shlex.split(exec_start.replace("%H", "host"))
        assert argv[0].startswith("/opt/inspector/venv/bin/"), unit.name
        check_command(argv, unit.name)


def test_line_unit_with_its_env_file_is_a_valid_registry_service() -> None:
    from inspector.cli import _parser

    (exec_start,) = unit_directives(DEPLOY / "systemd" / "inspector.service")["Service"]["ExecStart"]
    args = check_argparse(_parser(), shlex.split(exec_start)[1:], "inspector.service")
    settings = _settings_from(read_env_file(DEPLOY / "inspector.env.example"), args)
    settings.check_source()
    assert settings.model_uri == "models:/parts-inspector@champion" and settings.poll_seconds == 30
    assert (
        settings.token is not None and settings.host == "0.0.0.0" and settings.cache_dir == Path("/var/cache/inspector")
    )
    assert settings.tracking_uri == "http://mlflow.plant.local:5000" and settings.threads == 2
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        assert read_env_file(DEPLOY / f"{name}.env.example")
    assert read_env_file(DEPLOY / "mlflow.env.example")["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert read_env_file(DEPLOY / "prefect-server.env.example")["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    for unit in UNITS:  # the venv path is this machine's, so verify can check that the programs exist
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/inspector/venv/bin/", f"{VENV_BIN}/"))
        out = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (out.stdout + out.stderr).splitlines() if unit.name in line]
        assert problems == [], f"{unit.name}:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------------- README


def readme_commands() -> list[list[str]]:
    """``inspector …`` and ``pipelines …`` commands in deploy/README.md's bash blocks (continuations joined)."""
    text = (DEPLOY / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().rstrip("&").strip()
            line = re.sub(r"^(\S+=\S+\s+)+", "", line)  # VAR=value prefixes
            if line.split(" ", 1)[0] in {
                f"{prefix}{program}"
                for prefix in ("", ".venv/bin/", "/opt/inspector/venv/bin/")
                for program in ("inspector", "pipelines", "prefect", "mlflow")
            }:
                commands.append(shlex.split(line))
    return commands


def test_readme_commands_parse_with_the_real_clis() -> None:
    pytest.importorskip("mlflow")
    commands = readme_commands()
    programs = {Path(c[0]).name for c in commands}
    assert {"inspector", "pipelines", "prefect", "mlflow"} <= programs
    subcommands = {(Path(c[0]).name, c[1]) for c in commands}
    assert {
        ("pipelines", "promote"),
        ("pipelines", "rollback"),
        ("pipelines", "serve-deployments"),
        ("inspector", "serve"),
    } <= subcommands
    for argv in commands:
        check_command(argv, "deploy/README.md")


# --------------------------------------------------------------------------------------------------- PostgreSQL


def test_postgres_init_script_creates_both_databases(tmp_path: Path) -> None:
    from tests.servers import _pg_binary, postgres_cluster, postgres_missing

    reason = postgres_missing() or (None if _pg_binary("psql") else "psql not found")
    if reason:
        pytest.skip(reason)
    import psycopg2

    with postgres_cluster(tmp_path, database="scratch") as url:
        port = int(re.search(r":(\d+)/", url).group(1))  # type: ignore[union-attr]
        env = {
            **os.environ,
            "POSTGRES_USER": "app",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(port),
            "MLFLOW_DB_PASSWORD": "pw-m'l",
            "PREFECT_DB_PASSWORD": "pw-p",
            "PATH": f"{_pg_binary('psql').parent}:{os.environ['PATH']}",
        }
        out = subprocess.run(
            ["bash", str(DEPLOY / "postgres" / "init-databases.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="app", dbname="postgres")
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                    "WHERE datname IN ('mlflow', 'prefect') ORDER BY 1"
                )
                assert cur.fetchall() == [("mlflow", "mlflow"), ("prefect", "prefect")]
                cur.execute(
                    "SELECT rolname FROM pg_authid WHERE rolcanlogin AND rolpassword IS NOT NULL "
                    "AND rolname IN ('mlflow', 'prefect') ORDER BY 1"
                )
                assert cur.fetchall() == [("mlflow",), ("prefect",)]
        finally:
            conn.close()
