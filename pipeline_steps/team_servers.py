"""Team servers on one machine: PostgreSQL, an MLflow server and a Prefect server on top of it.

    PostgreSQL (initdb'd cluster, 127.0.0.1:<port>)
      ├── database `mlflow`  ← mlflow server  --backend-store-uri postgresql://…/mlflow
      │                                      --artifacts-destination <folder | s3://… | gs://…>
      └── database `prefect` ← prefect server (PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://…/prefect)

The pipeline reaches them only through ``MLFLOW_TRACKING_URI=http://…`` and
``PREFECT_API_URL=http://…/api`` (no code change); model artifacts go through the MLflow
server (proxied artifact storage), so clients need no access to the artifact store.

``python -m pipeline_steps.team_servers up`` starts the three in the background (state, logs and
the cluster under ``team.dir``, knobs in ``params.yaml: team``) and writes ``<team.dir>/env``
(``source`` it); ``down`` stops them; ``env`` prints the variables. The tests use the same
functions on free ports in a temporary folder.

Debian's PostgreSQL refuses to run as root: when this process is root, ``initdb``/``pg_ctl``
run as ``team.postgres.os_user`` (default ``postgres``) through ``runuser``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline_steps.config import PROJECT_ROOT, load_params, resolve_path
from pipeline_steps.errors import ConfigError, PipelineError
from pipeline_steps.runtime_env import runtime_env

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")
DB_USER = "mlops"


class ServerError(PipelineError):
    """A team server could not be started or does not answer."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pg_bin(tool: str) -> str | None:
    """Path of a PostgreSQL server tool (initdb, pg_ctl): PATH first, then Debian's folders."""
    found = shutil.which(tool)
    if found:
        return found
    for folder in PG_BIN_CANDIDATES:
        candidate = Path(folder) / tool
        if candidate.is_file():
            return str(candidate)
    return None


def _as_os_user(cmd: Sequence[str], os_user: str | None) -> list[str]:
    if os_user and os.geteuid() == 0:
        return ["runuser", "-u", os_user, "--", *cmd]
    return list(cmd)


def _wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise ServerError(f"server for {url} exited with code {process.returncode}:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise ServerError(f"{url} did not answer within {timeout_s:.0f}s:\n{tail}")


def stop_pid(pid: int | None, grace_s: float = 15.0) -> None:
    """SIGTERM the process group of `pid` (started with start_new_session), SIGKILL after `grace_s`."""
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished:
                return
        except ChildProcessError:  # not our child: poll for its existence
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    data_dir: str
    port: int
    host: str = "127.0.0.1"
    user: str = DB_USER
    os_user: str | None = None

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname="postgres")
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    def stop(self) -> None:
        pg_ctl = pg_bin("pg_ctl")
        if pg_ctl and Path(self.data_dir, "postmaster.pid").exists():
            subprocess.run(_as_os_user([pg_ctl, "-D", self.data_dir, "-m", "fast", "-w", "stop"], self.os_user),
                           capture_output=True, timeout=60, check=False)


def start_postgres(base_dir: str | Path, port: int | None = None, os_user: str | None = "postgres",
                   databases: Sequence[str] = ()) -> Postgres:
    """initdb a cluster in `base_dir/pgdata` (once), start it on 127.0.0.1:`port`, create `databases`.

    Trust authentication for the `mlops` role on loopback only (a throw-away, local cluster; use
    a managed PostgreSQL with passwords or certificates in production).
    """
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise ServerError("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql package")
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        os_user = None
    data_dir = base / "pgdata"
    sock_dir = base / "pgsock"
    port = int(port or free_port())
    if os_user:
        # the unprivileged server must reach its folders: open the path to it, hand it the folders
        for folder in (base, *base.parents):
            if folder == Path("/"):
                break
            mode = folder.stat().st_mode
            if not mode & 0o001:
                os.chmod(folder, mode | 0o011)
        for folder in (data_dir, sock_dir):
            folder.mkdir(exist_ok=True)
            shutil.chown(folder, user=os_user)
    else:
        sock_dir.mkdir(exist_ok=True)
    if not (data_dir / "PG_VERSION").exists():
        result = subprocess.run(
            _as_os_user([initdb, "-D", str(data_dir), "-U", DB_USER, "--auth=trust", "-E", "UTF8",
                         "--no-instructions"], os_user),
            capture_output=True, text=True, timeout=300, check=False,
        )
        if result.returncode != 0:
            raise ServerError(f"initdb failed: {result.stderr.strip()[-2000:]}")
    pg = Postgres(str(data_dir), port, os_user=os_user)
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {sock_dir} -c max_connections=200"
    result = subprocess.run(
        _as_os_user([pg_ctl, "-D", str(data_dir), "-o", options, "-l", str(data_dir / "server.log"), "-w",
                     "-t", "120", "start"], os_user),
        capture_output=True, text=True, timeout=180, check=False,
    )
    if result.returncode != 0:
        log = (data_dir / "server.log")
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise ServerError(f"pg_ctl start failed: {result.stderr.strip()[-1000:]}\n{tail}")
    for name in databases:
        pg.create_database(name)
    return pg


# --------------------------------------------------------------------------- MLflow and Prefect


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in runtime_env().items():
        env.setdefault(key, value)
    env.update(extra or {})
    return env


def start_mlflow(backend_uri: str, artifacts_destination: str, port: int | None, log_path: str | Path,
                 workers: int = 1, startup_timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1:`port` with `backend_uri` and proxied artifacts; returns (process, url)."""
    port = int(port or free_port())
    if "://" not in artifacts_destination:
        Path(artifacts_destination).mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow_bin, "server", "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_destination,
           "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                                   start_new_session=True, cwd=str(log_path.parent))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", startup_timeout_s, process, log_path)
    except ServerError:
        stop_pid(process.pid)
        raise
    return process, url


def prefect_server_env(database_url: str, port: int, home: str | Path) -> dict[str, str]:
    api = f"http://127.0.0.1:{port}/api"
    return server_env({
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_HOME": str(home),
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    })


def start_prefect(database_url: str, port: int | None, home: str | Path, log_path: str | Path,
                  startup_timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1:`port` with its database at `database_url`; returns (process, api url)."""
    port = int(port or free_port())
    Path(home).mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path)
    env = prefect_server_env(database_url, port, home)
    env.pop("PREFECT_API_URL", None)
    prefect_bin = str(Path(sys.executable).with_name("prefect"))
    with log_path.open("ab") as log:
        process = subprocess.Popen([prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(api + "/health", startup_timeout_s, process, log_path)
    except ServerError:
        stop_pid(process.pid)
        raise
    return process, api


# --------------------------------------------------------------------------- the team stack (CLI)


@dataclass
class TeamState:
    dir: str
    postgres: dict[str, Any] = field(default_factory=dict)
    mlflow_pid: int | None = None
    mlflow_url: str | None = None
    prefect_pid: int | None = None
    prefect_api_url: str | None = None

    def env(self) -> dict[str, str]:
        out = {}
        if self.mlflow_url:
            out["MLFLOW_TRACKING_URI"] = self.mlflow_url
        if self.prefect_api_url:
            out["PREFECT_API_URL"] = self.prefect_api_url
            out["PREFECT_UI_API_URL"] = self.prefect_api_url
        return out


def team_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    team = params.get("team")
    if not isinstance(team, Mapping):
        raise ConfigError("params.yaml has no 'team:' section (team servers' folder, ports, databases)")
    return dict(team)


def _state_path(team_dir: Path) -> Path:
    return team_dir / "state.json"


def load_state(team_dir: Path) -> TeamState | None:
    path = _state_path(team_dir)
    if not path.exists():
        return None
    return TeamState(**json.loads(path.read_text()))


def save_state(state: TeamState) -> None:
    team_dir = Path(state.dir)
    _state_path(team_dir).write_text(json.dumps(asdict(state), indent=2))
    lines = [f"export {key}={value}" for key, value in state.env().items()]
    (team_dir / "env").write_text("\n".join(lines) + "\n")


def up(params: Mapping[str, Any], root: Path = PROJECT_ROOT, log: Any = print) -> TeamState:
    team = team_settings(params)
    team_dir = resolve_path(str(team["dir"]), root)
    team_dir.mkdir(parents=True, exist_ok=True)
    existing = load_state(team_dir)
    if existing and existing.mlflow_url and existing.prefect_api_url:
        import requests

        try:
            if (requests.get(existing.mlflow_url + "/health", timeout=2).ok
                    and requests.get(existing.prefect_api_url + "/health", timeout=2).ok):
                log(f"team servers already running (state in {_state_path(team_dir)})")
                return existing
        except requests.RequestException:
            pass
        down(params, root, log=lambda *_: None)
    pg_params = team["postgres"]
    databases = [str(pg_params["mlflow_database"]), str(pg_params["prefect_database"])]
    pg = start_postgres(team_dir / "postgres", int(pg_params["port"]) or None,
                        os_user=pg_params["os_user"], databases=databases)
    state = TeamState(dir=str(team_dir), postgres=asdict(pg))
    save_state(state)
    log(f"PostgreSQL: {pg.url('')} (data {pg.data_dir})")
    ml = team["mlflow"]
    artifacts = str(ml["artifacts_destination"])
    if "://" not in artifacts:
        artifacts = str(resolve_path(artifacts, team_dir))
    process, url = start_mlflow(pg.url(databases[0], "psycopg2"), artifacts, int(ml["port"]) or None,
                                team_dir / "mlflow.log", workers=int(ml["workers"]))
    state.mlflow_pid, state.mlflow_url = process.pid, url
    save_state(state)
    log(f"MLflow server: {url} (backend {pg.url(databases[0])}, artifacts {artifacts})")
    pf = team["prefect"]
    process, api = start_prefect(pg.url(databases[1], "asyncpg"), int(pf["port"]) or None,
                                 team_dir / "prefect_home", team_dir / "prefect.log")
    state.prefect_pid, state.prefect_api_url = process.pid, api
    save_state(state)
    log(f"Prefect server: {api} (UI {api[:-4]}, database {pg.url(databases[1])})")
    log(f"environment for the pipeline and workers: source {team_dir / 'env'}")
    return state


def down(params: Mapping[str, Any], root: Path = PROJECT_ROOT, log: Any = print) -> None:
    team_dir = resolve_path(str(team_settings(params)["dir"]), root)
    state = load_state(team_dir)
    if state is None:
        log("no team servers recorded")
        return
    stop_pid(state.prefect_pid)
    stop_pid(state.mlflow_pid)
    if state.postgres:
        Postgres(**state.postgres).stop()
    _state_path(team_dir).unlink(missing_ok=True)
    (team_dir / "env").unlink(missing_ok=True)
    log("team servers stopped (the PostgreSQL cluster and artifacts stay in " f"{team_dir})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "env", "status"])
    parser.add_argument("--params", default=None)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.action == "up":
        up(params)
    elif args.action == "down":
        down(params)
    else:
        team_dir = resolve_path(str(team_settings(params)["dir"]), PROJECT_ROOT)
        state = load_state(team_dir)
        if state is None:
            print("no team servers running (make services)", file=sys.stderr)
            return 1
        if args.action == "env":
            for key, value in state.env().items():
                print(f"export {key}={value}")
        else:
            print(json.dumps(asdict(state), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
