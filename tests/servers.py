"""Real servers on 127.0.0.1 for tests: ``mlflow server``, a throwaway PostgreSQL cluster, ``prefect server``.

Each helper starts a real process on a free loopback port with its state in a temp dir, waits until it answers,
and always tears it down (context managers; ``stop()`` is idempotent and safe after a crash). No mocks: tests
that need a registry or an orchestrator that can go down use these.

- :func:`mlflow_server` / :func:`start_mlflow_server`: ``mlflow server`` with a SQLite (or given) backend and an
  artifact root in the temp dir, artifacts served through the server (``--serve-artifacts``).
- :func:`postgres_cluster`: ``initdb`` + ``pg_ctl start`` as the ``postgres`` user (``initdb`` refuses root),
  unix socket in the temp dir; yields a SQLAlchemy URL. :func:`postgres_missing` says why it cannot run here.
- :func:`prefect_server`: ``prefect server start`` with its own ``PREFECT_HOME`` and SQLite database.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
PG_BIN_DIRS = (Path("/usr/local/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log tail) when ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s ({last}):\n{_tail(log)}")


def _tail(log: Path | None, n: int = 4000) -> str:
    if log is None or not log.is_file():
        return ""
    return log.read_text(errors="replace")[-n:]


def _stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group (servers fork workers), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# --------------------------------------------------------------------------------------------------- MLflow


def start_mlflow_server(
    tmp_path: Path, backend_uri: str | None = None, *, port: int | None = None, timeout: float = 120
) -> tuple[str, Callable[[], None]]:
    """Start ``mlflow server`` on 127.0.0.1; returns ``(url, stop)``. ``stop`` is idempotent.

    Backend: ``backend_uri`` or SQLite ``tmp_path/mlflow.db``; artifacts under ``tmp_path/artifacts``, served by the
    server (clients use ``mlflow-artifacts:/`` URIs, as on a real multi-host setup). Pass ``port`` to restart a
    stopped server on the same address with the same state.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    backend_uri = backend_uri or f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    artifacts = (tmp_path / "artifacts").resolve()
    artifacts.mkdir(exist_ok=True)
    port = port or free_port()
    log = tmp_path / f"mlflow-server-{port}.log"
    cmd = [
        str(VENV_BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--serve-artifacts",
        "--workers",
        "1",
    ]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True, cwd=tmp_path
        )
    url = f"http://127.0.0.1:{port}"

    def stop() -> None:
        _stop_process(proc)

    try:
        wait_http(f"{url}/health", timeout, proc, log)
    except BaseException:
        stop()
        raise
    return url, stop


@contextlib.contextmanager
def mlflow_server(tmp_path: Path, backend_uri: str | None = None, **kwargs: object) -> Iterator[str]:
    """``with mlflow_server(tmp) as url:`` — a real tracking + registry + artifact server, always stopped."""
    url, stop = start_mlflow_server(tmp_path, backend_uri, **kwargs)  # type: ignore[arg-type]
    try:
        yield url
    finally:
        stop()


# --------------------------------------------------------------------------------------------------- PostgreSQL


def _pg_binary(name: str) -> Path | None:
    for folder in PG_BIN_DIRS:
        if (folder / name).is_file():
            return folder / name
    found = shutil.which(name)
    return Path(found) if found else None


def postgres_missing() -> str | None:
    """Why a throwaway PostgreSQL cluster cannot be started here, or None when it can."""
    for name in ("initdb", "pg_ctl", "postgres"):
        if _pg_binary(name) is None:
            return (
                f"PostgreSQL server binary {name!r} not found (looked in {', '.join(map(str, PG_BIN_DIRS))} and PATH)"
            )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary)"
    return None


@contextlib.contextmanager
def postgres_cluster(tmp_path: Path, database: str = "mlflow", *, timeout: float = 60) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (socket dir in ``tmp_path``); yields ``postgresql+psycopg2://app@…/database``."""
    reason = postgres_missing()
    if reason:
        raise RuntimeError(reason)
    root = Path(tmp_path) / "pg"
    root.mkdir(parents=True)
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        shutil.chown(root, user="postgres")
        os.chmod(root, 0o700)
        as_user = ["runuser", "-u", "postgres", "--"]
        for parent in list(root.parents)[:-1]:  # the postgres user must be able to traverse to its data dir
            if parent.stat().st_mode & 0o001 == 0:
                os.chmod(parent, parent.stat().st_mode | 0o001)
    data, log, port = root / "db", root / "postgres.log", free_port()
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True, text=True, timeout=timeout)  # noqa: E731
    run(str(_pg_binary("initdb")), "-D", str(data), "-A", "trust", "-U", "app", "--no-sync")
    pg_ctl = str(_pg_binary("pg_ctl"))
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        run(pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", str(int(timeout)), "start")
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="app", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        yield f"postgresql+psycopg2://app@127.0.0.1:{port}/{database}"  # SQLAlchemy 2.1 defaults to psycopg 3
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")


# --------------------------------------------------------------------------------------------------- Prefect


@contextlib.contextmanager
def prefect_server(tmp_path: Path, *, timeout: float = 180) -> Iterator[tuple[str, dict[str, str]]]:
    """``prefect server start`` on 127.0.0.1 with its own ``PREFECT_HOME`` (SQLite); yields ``(api_url, env)``.

    ``env`` is the environment for clients and workers of this server (``PREFECT_API_URL``, ``PREFECT_HOME``).
    """
    home = (Path(tmp_path) / "prefect_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    log = home / "server.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=home,
        )
    try:
        wait_http(f"{api}/health", timeout, proc, log)
        yield api, env
    finally:
        _stop_process(proc)
