"""One Prefect API for a whole run of the pipeline: start it, point every stage at it, stop it.

Without a server, every process that runs a flow starts a temporary Prefect API of its
own (10–20 s, far more on a busy machine): a `dvc repro` of eleven short stages pays
that eleven times and none of the runs is left for the UI. This wrapper runs a command
(``dvc repro``, ``python -m flows.pipeline``, …) against one Prefect server:

* ``PREFECT_API_URL`` already set (a team server, ``make prefect-server``): it is checked
  within a few seconds and used as it is; nothing is started or stopped;
* otherwise a local ``prefect server start`` is launched on 127.0.0.1 (port
  ``PREFECT_PORT`` or 4200, the next free one when that is taken), with its database in
  the project's ``PREFECT_HOME`` so the runs stay visible in the UI afterwards; the
  command runs with ``PREFECT_API_URL`` pointing at it; the server is stopped when the
  command ends, fails or is interrupted.

SIGINT/SIGTERM to the wrapper are passed to the command's whole process group (so a
stage started by ``dvc repro`` stops too) and the server is stopped after it.

This is orchestration tooling, not a flow: it imports neither Prefect nor any step,
so it costs a bare Python start-up. Usage::

    python -m flows.prefect_server -- dvc repro
    python -m flows.prefect_server --keep -- python -m flows.pipeline   # leave the UI up
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pipeline_steps import runtime_env
from pipeline_steps.errors import PipelineError

API_ENV = "PREFECT_API_URL"
#: Set in the commands' environment when this wrapper started the server (its process id).
SERVER_PID_ENV = "MARKETPLACE_PREFECT_SERVER_PID"
#: ... and the stage runner's (flows/stage_runner.py), when one serves the command's stages.
RUNNER_PID_ENV = "MARKETPLACE_STAGE_RUNNER_PID"
DEFAULT_PORT = 4200
#: Exit code when the API cannot be reached or started (distinct from a stage's own failure).
EXIT_API_UNAVAILABLE = 3
STOP_GRACE_S = 8.0
#: Seconds to wait for the server to answer (environment override: START_TIMEOUT_ENV).
DEFAULT_START_TIMEOUT_S = 900.0
START_TIMEOUT_ENV = "MARKETPLACE_PREFECT_START_TIMEOUT"


class PrefectApiError(PipelineError):
    """The Prefect API named by PREFECT_API_URL does not answer, or a server could not start."""


class PortTaken(PrefectApiError):
    """Another process took the chosen port while our server was starting (it then moves on)."""


def api_is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when ``<api_url>/health`` answers 200 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def require_api(api_url: str, timeout: float = 3.0) -> None:
    """Fail fast, naming PREFECT_API_URL, when the configured Prefect API does not answer.

    Prefect's client would otherwise retry for minutes before the first task runs.
    """
    if not api_is_healthy(api_url, timeout=timeout):
        raise PrefectApiError(
            f"{API_ENV}={api_url} does not answer (no Prefect server there). Start it "
            f"(`make prefect-server`), point {API_ENV} at a running one, or unset it "
            f"(`unset {API_ENV}`) to let the run start its own."
        )


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now.

    With SO_REUSEADDR, as uvicorn binds: the connections of a server stopped a moment ago
    (TIME_WAIT) do not count, a socket listening there does. Without it, a `make repro` right
    after `make demo` moved to the next port although 4200 was free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(preferred: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """`preferred` when free, else the next free port above it (said on stderr)."""
    for port in range(preferred, preferred + tries):
        if port_is_free(port, host):
            if port != preferred:
                print(f"prefect-server: port {preferred} is taken; using {port} (set PREFECT_PORT to choose)", file=sys.stderr)
            return port
    raise PrefectApiError(f"ports {preferred}-{preferred + tries - 1} on {host} are all taken; set PREFECT_PORT to a free port")


def listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP `port` (from /proc/net/tcp*); None where /proc cannot tell."""
    inodes: set[str] = set()
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if found_table else None


def session_listens_on(session: int, port: int) -> bool:
    """True when a process of `session` (a server started with start_new_session) holds the
    socket listening on `port`. True where /proc cannot tell (not Linux): the old behaviour."""
    inodes = listening_inodes(port)
    if inodes is None:
        return True
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    return True
        except OSError:
            continue
    return False


#: Background services a server started for one pipeline run does not need (schedules, late-run
#: and heartbeat bookkeeping, automations): off, so the server leaves the 2 cores to the stages.
#: The event persister and task-run recorder stay on: the UI's run and task views need them.
IDLE_SERVICES_OFF = {
    f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
    for name in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "CANCELLATION_CLEANUP", "TRIGGERS")
}


def server_env(port: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the server and of the commands that use it."""
    env = dict(os.environ if environ is None else environ)
    runtime_env.apply(env)
    for key, value in IDLE_SERVICES_OFF.items():
        env.setdefault(key, value)
    api_url = f"http://127.0.0.1:{port}/api"
    env[API_ENV] = api_url
    env["PREFECT_UI_API_URL"] = api_url  # else the UI of a server off port 4200 calls :4200
    return env


def start_server(port: int, env: Mapping[str, str], log_path: Path, startup_timeout: float | None = None) -> subprocess.Popen:
    """Launch ``prefect server start`` in its own process group and wait until it is healthy.

    Args:
        port: a free port on 127.0.0.1.
        env: the server's environment (see :func:`server_env`).
        log_path: where its output goes (read back when it fails to start).
        startup_timeout: seconds to wait (default: START_TIMEOUT_ENV, else 900). An idle 2-core
            machine needs ~15 s; a first start creates the database (migrations), which on a
            machine kept busy by other jobs has taken more than 5 minutes.

    Returns:
        The running server process.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(cmd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    if startup_timeout is None:
        startup_timeout = float(env.get(START_TIMEOUT_ENV) or DEFAULT_START_TIMEOUT_S)
    try:
        return _wait_healthy(process, port, env, log_path, startup_timeout)
    except BaseException:  # an interrupt while it starts too: the server is in a session of its own
        stop_process_group(process)
        raise


def _wait_healthy(process: subprocess.Popen, port: int, env: Mapping[str, str], log_path: Path, startup_timeout: float) -> subprocess.Popen:
    """Return `process` once our server answers on `port`; raise when it exits or times out."""
    started = time.monotonic()
    deadline = started + startup_timeout
    next_note = started + 30
    api_url = env[API_ENV]
    while time.monotonic() < deadline:
        if time.monotonic() >= next_note:
            print(f"prefect-server: still starting after {time.monotonic() - started:.0f} s (first start migrates its database; log: {log_path})", file=sys.stderr)
            next_note += 30
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            if not port_is_free(port):
                raise PortTaken(f"port {port} was taken by another process while our server started")
            raise PrefectApiError(f"`prefect server start` on port {port} exited with code {process.returncode}:\n{tail}")
        # A loaded server can take seconds to answer. The answer must come from *our* server:
        # another wrapper that found the same port free at the same moment may own it, and ours
        # then fails to bind (seen with two `make demo`s on one machine).
        if api_is_healthy(api_url, timeout=5.0) and session_listens_on(process.pid, port):
            return process
        time.sleep(0.2)  # every stage waits for this: look often (a refused connection costs nothing)
    raise PrefectApiError(
        f"the Prefect server on port {port} was not healthy after {startup_timeout:.0f} s (log: {log_path}); "
        f"on a very busy machine allow it longer with {START_TIMEOUT_ENV}=<seconds>"
    )


def stop_process_group(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> int | None:
    """SIGTERM the process's group, SIGKILL it after `grace` seconds; returns the exit code."""
    if process.poll() is not None:
        return process.returncode
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


@contextlib.contextmanager
def prefect_api(port: int | None = None, log_path: Path | None = None, keep: bool = False) -> Iterator[dict[str, str]]:
    """Yield the environment of commands that use one Prefect API (started here if needed).

    With PREFECT_API_URL set, that API is checked and used; otherwise a local server is
    started and, unless `keep`, stopped on exit (also on an exception or interrupt). A stage
    runner (flows/stage_runner.py) imports the stages meanwhile; the commands' stages hand
    themselves over to it (MARKETPLACE_STAGE_RUNNER=off in the environment: no runner).
    """
    configured = os.environ.get(API_ENV)
    if configured:
        require_api(configured)
        env = dict(os.environ)
        runtime_env.apply(env)
        # Nested (`make demo` runs `make repro`, itself wrapped): the outer runner serves on.
        runner = StageRunner(None, None, None) if StageRunner.serving(env) else StageRunner.start(env)
        try:
            runner.wait_ready(env)
            yield env
        finally:
            runner.stop()
        return
    env_port = os.environ.get("PREFECT_PORT")
    port = choose_port(port or (int(env_port) if env_port else DEFAULT_PORT))
    env = server_env(port)
    log_path = log_path or Path(env["PREFECT_HOME"]) / "server.log"
    started = time.monotonic()
    server: subprocess.Popen | None = None
    runner: StageRunner | None = None
    try:
        for _attempt in range(5):
            # The runner imports the stages while the server starts (both take seconds): it
            # gets the commands' environment, so a port change means a new runner.
            runner = StageRunner.start(env)
            try:
                server = start_server(port, env, log_path)
                break
            except PortTaken as taken:
                runner.stop()
                runner = None
                print(f"prefect-server: {taken}; trying the next free port", file=sys.stderr)
                port = choose_port(port + 1)
                env = server_env(port)
        else:
            raise PrefectApiError("could not start a Prefect server: the free ports kept being taken")
        assert runner is not None and server is not None
        print(f"prefect-server: Prefect UI at http://127.0.0.1:{port} (up in {time.monotonic() - started:.0f} s)", file=sys.stderr)
        env[SERVER_PID_ENV] = str(server.pid)
        runner.wait_ready(env)
        yield env
    finally:
        if runner is not None:
            runner.stop()
        if server is not None:
            if keep:
                print(f"prefect-server: left running (pid {server.pid}); stop it with `kill -- -{server.pid}`", file=sys.stderr)
            else:
                stop_process_group(server)


class StageRunner:
    """The stage runner process for one wrapped command (none when MARKETPLACE_STAGE_RUNNER=off)."""

    READY_TIMEOUT_S = 180.0

    def __init__(self, process: subprocess.Popen | None, socket_path: Path | None, log_path: Path | None) -> None:
        self.process, self.socket_path, self.log_path = process, socket_path, log_path

    @staticmethod
    def serving(env: Mapping[str, str]) -> bool:
        """True when `env` already names a runner's socket that exists (an outer wrapper's)."""
        from flows.stage_client import RUNNER_ENV

        path = env.get(RUNNER_ENV, "")
        return bool(path) and path != "off" and Path(path).exists()

    @classmethod
    def start(cls, env: Mapping[str, str]) -> StageRunner:
        """Launch `python -m flows.stage_runner` with the commands' environment (not yet waited for)."""
        from flows.stage_client import RUNNER_ENV

        if os.environ.get(RUNNER_ENV) == "off":
            return cls(None, None, None)
        folder = Path(tempfile.mkdtemp(prefix="marketplace-runner-"))  # short: a socket path has a length limit
        socket_path, log_path = folder / "runner.sock", folder / "runner.log"
        runner_env = {k: v for k, v in env.items() if k != RUNNER_ENV}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.stage_runner", "--socket", str(socket_path)],
                env=runner_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return cls(process, socket_path, log_path)

    def wait_ready(self, env: dict[str, str]) -> None:
        """Wait until the runner serves, then point the commands at it; without it they run as before."""
        from flows.stage_client import RUNNER_ENV
        from flows.stage_runner import READY_LINE

        if self.process is None or self.socket_path is None or self.log_path is None:
            return
        deadline = time.monotonic() + self.READY_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            if READY_LINE in self.log_path.read_text(errors="replace"):
                env[RUNNER_ENV] = str(self.socket_path)
                env[RUNNER_PID_ENV] = str(self.process.pid)
                print(f"prefect-server: stage runner ready ({self.log_path})", file=sys.stderr)
                return
            time.sleep(0.2)
        tail = self.log_path.read_text(errors="replace")[-1500:]
        print(f"prefect-server: no stage runner (each stage imports its own libraries):\n{tail}", file=sys.stderr)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
        if self.socket_path is not None:
            shutil.rmtree(self.socket_path.parent, ignore_errors=True)


def run_command(cmd: Sequence[str], env: Mapping[str, str], grace: float = STOP_GRACE_S) -> int:
    """Run `cmd` in its own process group, passing SIGINT/SIGTERM to the whole group.

    `dvc repro` starts each stage as a child; signalling the group stops the stage too,
    instead of leaving it orphaned. A group still alive `grace` seconds after the first
    signal is killed.

    Returns:
        The command's exit code (128 + signal number when it was stopped by a signal).
    """
    process = subprocess.Popen(list(cmd), env=dict(env), start_new_session=True)
    received: list[tuple[int, float]] = []

    def forward(signum: int, _frame: object) -> None:
        received.append((signum, time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = process.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > grace:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # Anything the command left in its group (a stage's own children) goes with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if received and code != 0:
        return 128 + received[0][0]
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.prefect_server",
        description="Run a command (e.g. `dvc repro`) against one Prefect API, starting a local server if none is configured.",
    )
    parser.add_argument("--port", type=int, default=None, help="port of the local server (default: PREFECT_PORT or 4200, next free one if taken)")
    parser.add_argument("--keep", action="store_true", help="leave the local server running after the command (for the UI)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. `python -m flows.prefect_server -- dvc repro`")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # while the server starts: stop it on the way out
    try:
        with prefect_api(port=args.port, keep=args.keep) as env:
            return run_command(command, env)
    except PrefectApiError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_API_UNAVAILABLE
    except KeyboardInterrupt:
        print("prefect-server: stopped", file=sys.stderr)
        return 130


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
