"""One Prefect API per pipeline run (flows/prefect_server.py), bad server URLs and clean stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from flows import prefect_server

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:port (a closed server's TIME_WAIT sockets do not count)."""
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _env_without_api(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_API_URL")}
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # conftest quiets Prefect; these tests wait for "Beginning flow run"
    # These commands are not flows.<stage> modules: a stage runner (tests/test_stage_runner.py)
    # would only add its start-up to every wrapper here.
    env["MARKETPLACE_STAGE_RUNNER"] = "off"
    env.update(extra)
    return env


def test_dead_api_url_is_named_within_seconds() -> None:
    url = f"http://127.0.0.1:{_free_port()}/api"
    started = time.monotonic()
    with pytest.raises(prefect_server.PrefectApiError) as error:
        prefect_server.require_api(url)
    assert time.monotonic() - started < 5
    assert "PREFECT_API_URL" in str(error.value) and url in str(error.value)
    assert "unset PREFECT_API_URL" in str(error.value)


@pytest.mark.integration
def test_stage_cli_with_dead_api_url_fails_fast_naming_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/api"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.validate", "--raw-dir", str(tmp_path)],
        cwd=ROOT, env=_env_without_api(PREFECT_API_URL=url), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "PREFECT_API_URL" in proc.stderr and url in proc.stderr
    assert "Traceback" not in proc.stderr
    # process start + imports + a 3 s probe; Prefect's own client would retry for minutes
    assert time.monotonic() - started < 60


@pytest.mark.integration
def test_wrapper_with_dead_api_url_exits_with_its_code() -> None:
    url = f"http://127.0.0.1:{_free_port()}/api"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.prefect_server", "--", "true"],
        cwd=ROOT, env=_env_without_api(PREFECT_API_URL=url), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == prefect_server.EXIT_API_UNAVAILABLE
    assert "PREFECT_API_URL" in proc.stderr


def test_taken_port_moves_to_the_next_free_one(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        chosen = prefect_server.choose_port(taken)
    assert chosen != taken
    assert f"port {taken} is taken" in capsys.readouterr().err


@pytest.mark.integration
def test_wrapper_needs_a_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "flows.prefect_server"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "after --" in proc.stderr


FLOW_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import flows  # the project's environment, before Prefect is imported
    from prefect import flow

    @flow(name=sys.argv[1])
    def probe(seconds: float) -> None:
        print("flow-started", flush=True)
        time.sleep(seconds)

    probe(float(sys.argv[2]))
    """
)


def _children_alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie waiting for a parent that never reaps it is not)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


WATCHED_SCRIPT = "from flows.process_tree import watched_ancestor; print(watched_ancestor())"


@pytest.mark.integration
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_a_stage_under_a_shell_wrapper_watches_the_process_that_ran_the_shell(shell: str) -> None:
    """dvc runs `$SHELL -c cmd`; dash stays in between (no exec), so the stage must look past it."""
    if not Path(shell).exists():
        pytest.skip(f"{shell} is not installed")
    command = f"{sys.executable} -c '{WATCHED_SCRIPT}'; true"  # `; true`: no shell may exec the command
    out = subprocess.run([shell, "-c", command], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert int(out.stdout.split()[-1]) == os.getpid()


@pytest.mark.integration
def test_a_stage_started_directly_watches_its_parent() -> None:
    out = subprocess.run([sys.executable, "-c", WATCHED_SCRIPT], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert int(out.stdout.split()[-1]) == os.getpid()


@pytest.mark.integration
def test_one_server_for_every_command_and_runs_visible_in_its_api(tmp_path: Path) -> None:
    """Two flow processes under one wrapper report to the same server; it is stopped after."""
    script = tmp_path / "probe_flow.py"
    script.write_text(FLOW_SCRIPT)
    port = _free_port()
    report = tmp_path / "runs.json"
    # The command: two flow processes, then a query of the server's API for their runs.
    command = (
        f"{sys.executable} {script} probe-one 0 && {sys.executable} {script} probe-two 0 && "
        f"{sys.executable} -c \"import json, os, urllib.request; "
        f"req = urllib.request.Request(os.environ['PREFECT_API_URL'] + '/flow_runs/filter', data=b'{{}}', headers={{'Content-Type': 'application/json'}}); "
        f"runs = json.loads(urllib.request.urlopen(req).read()); "
        f"open('{report}', 'w').write(json.dumps([[r['state']['type'], r['flow_id']] for r in runs] + [os.environ['PREFECT_API_URL']]))\""
    )
    env = _env_without_api(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.prefect_server", "--port", str(port), "--", "bash", "-c", command],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *runs, api_url = json.loads(report.read_text())
    assert api_url == f"http://127.0.0.1:{port}/api"
    assert [state for state, _ in runs] == ["COMPLETED", "COMPLETED"]
    assert len({flow_id for _, flow_id in runs}) == 2  # two flows, one server
    assert "Starting temporary server" not in proc.stdout + proc.stderr
    assert not _listening(port), "the server the wrapper started is still listening"


@pytest.mark.integration
def test_sigterm_to_the_wrapper_stops_command_and_server_within_10_s(tmp_path: Path) -> None:
    script = tmp_path / "probe_flow.py"
    script.write_text(FLOW_SCRIPT)
    port = _free_port()
    env = _env_without_api(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "flows.prefect_server", "--port", str(port), "--", sys.executable, str(script), "long-run", "600"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert wrapper.stdout is not None
    deadline = time.monotonic() + 400
    for line in wrapper.stdout:
        if "flow-started" in line or time.monotonic() > deadline:
            break
    flow_pids = [int(p) for p in subprocess.run(["pgrep", "-f", "long-run 600"], capture_output=True, text=True).stdout.split()]
    assert flow_pids, "the flow process did not start"
    stopped_at = time.monotonic()
    wrapper.send_signal(signal.SIGTERM)
    code = wrapper.wait(timeout=30)
    assert time.monotonic() - stopped_at < 10
    assert code == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert _children_alive(flow_pids) == []
    assert not _listening(port)
    # the run is not left "Running" in the server's database: Prefect marked it crashed
    # (checked through a fresh server would cost another start; the log says it)


@pytest.mark.integration
def test_sigterm_while_the_server_starts_leaves_no_server_or_runner(tmp_path: Path) -> None:
    """Ctrl-C/SIGTERM in the first seconds, before the server answers: its session must not outlive the wrapper."""
    port = _free_port()
    env = _env_without_api(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    env.pop("MARKETPLACE_STAGE_RUNNER")  # the runner starts beside the server: it must go too
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "flows.prefect_server", "--port", str(port), "--", sys.executable, "-c", "pass"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    children: list[int] = []
    deadline = time.monotonic() + 60
    while len(children) < 2 and time.monotonic() < deadline:  # the server and the runner
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(wrapper.pid)], capture_output=True, text=True).stdout.split()]
        time.sleep(0.05)
    assert len(children) == 2, f"expected the server and the runner as the wrapper's children, found {children}"
    assert not _listening(port), "the server answered before the signal: this test needs it still starting"
    stopped_at = time.monotonic()
    wrapper.send_signal(signal.SIGTERM)
    _, stderr = wrapper.communicate(timeout=30)
    assert time.monotonic() - stopped_at < 10
    assert wrapper.returncode == 130, stderr
    time.sleep(0.5)
    assert _children_alive(children) == []
    assert not _listening(port)


@pytest.mark.integration
def test_sigterm_to_a_stage_without_server_leaves_no_temporary_api(tmp_path: Path) -> None:
    """A serverless stage starts Prefect's temporary API; SIGTERM must take it down too."""
    env = _env_without_api(PREFECT_HOME=str(tmp_path / "prefect-home"))
    out = tmp_path / "raw"
    stage = subprocess.Popen(
        [sys.executable, "-m", "flows.generate_sample", "--set", f"sample.n_products=3000", "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    assert stage.stdout is not None
    lines = []
    deadline = time.monotonic() + 400
    for line in stage.stdout:
        lines.append(line)
        if "Beginning flow run" in line or time.monotonic() > deadline:
            break
    assert "Beginning flow run" in lines[-1], "".join(lines)[-3000:]
    time.sleep(1.0)
    server_pids = [int(p) for p in subprocess.run(["pgrep", "-g", str(stage.pid), "-f", "uvicorn"], capture_output=True, text=True).stdout.split()]
    stopped_at = time.monotonic()
    stage.send_signal(signal.SIGTERM)  # to the stage process alone, as `kill <pid>` does
    code = stage.wait(timeout=30)
    elapsed = time.monotonic() - stopped_at
    rest = stage.stdout.read()
    assert elapsed < 10, rest[-2000:]
    assert code != 0, rest[-3000:]
    time.sleep(1.0)
    assert _children_alive(server_pids) == [], "Prefect's temporary API outlived the stopped stage"
    # nothing half-written: either no output or a complete one
    assert not out.exists() or (out / "Products.csv").is_file()
    # and running it again finishes the work
    again = subprocess.run(
        [sys.executable, "-m", "flows.generate_sample", "--set", "sample.n_products=60", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "Products.csv").is_file()


DVC_STAGE_YAML = """
stages:
  sample:
    cmd: {python} -m flows.generate_sample --set sample.n_products={n} --out out
    outs:
      - out
"""


@pytest.mark.integration
def test_sigterm_to_dvc_repro_stops_its_stage_and_the_next_repro_finishes(tmp_path: Path) -> None:
    """`dvc repro` dies on SIGTERM without passing it on; the stage must not go on alone."""
    dvc = Path(sys.executable).parent / "dvc"
    if not dvc.is_file():
        pytest.skip("dvc is not installed in this interpreter's environment")
    project = tmp_path / "project"
    project.mkdir()
    # SHELL=/bin/sh: dvc then runs the stage under dash, which stays between dvc and the stage
    # (what CI, with no SHELL set, does; bash would exec the command and hide the problem).
    env = _env_without_api(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1",
                           SHELL="/bin/sh")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=project, env=env, check=True)
    (project / "dvc.yaml").write_text(DVC_STAGE_YAML.format(python=sys.executable, n=3000))
    repro = subprocess.Popen([str(dvc), "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert repro.stdout is not None
    deadline = time.monotonic() + 400
    for line in repro.stdout:
        if "Beginning flow run" in line or time.monotonic() > deadline:
            break
    stage_pids = [int(p) for p in subprocess.run(["pgrep", "-f", "generate_sample --set sample.n_products=3000"], capture_output=True, text=True).stdout.split()]
    assert stage_pids, "the stage did not start"
    server_pids = [int(p) for pid in stage_pids for p in subprocess.run(["pgrep", "-P", str(pid), "-f", "uvicorn"], capture_output=True, text=True).stdout.split()]
    stopped_at = time.monotonic()
    repro.send_signal(signal.SIGTERM)
    repro.wait(timeout=30)
    while _children_alive(stage_pids) and time.monotonic() - stopped_at < 15:
        time.sleep(0.2)
    assert _children_alive(stage_pids) == [], "the stage outlived the dvc that started it"
    assert time.monotonic() - stopped_at < 10
    time.sleep(1.0)
    assert _children_alive(server_pids) == [], "the stage's temporary Prefect API was left running"
    # a smaller sample this time, so the re-run is quick; dvc sees a changed command and runs it
    (project / "dvc.yaml").write_text(DVC_STAGE_YAML.format(python=sys.executable, n=60))
    again = subprocess.run([str(dvc), "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (project / "out" / "Products.csv").is_file()


def test_a_port_whose_server_just_stopped_is_free_again() -> None:
    """Its closed connections (TIME_WAIT) do not keep the next run off the port, as they don't keep uvicorn off it."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    time.sleep(0.1)
    assert prefect_server.port_is_free(port)
    assert prefect_server.choose_port(port) == port


@pytest.mark.integration
def test_a_port_held_by_another_session_is_not_taken_for_our_server() -> None:
    """The health probe can be answered by someone else's server on the same port: ownership is checked."""
    port = _free_port()
    listener = subprocess.Popen(
        [sys.executable, "-c", f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "up"
        assert prefect_server.session_listens_on(listener.pid, port)
        assert not prefect_server.session_listens_on(os.getsid(0), port)
    finally:
        listener.kill()
        listener.wait()


@pytest.mark.integration
def test_two_wrappers_asking_for_one_port_each_get_their_own_server(tmp_path: Path) -> None:
    """Two `make demo`s at once: both find the port free, one binds it; the other must not use
    the first one's server (its runs would land in the wrong database) but move to the next port."""
    port = _free_port()
    # Each command waits until both are running, so both servers are up at the same time (a
    # wrapper finishing first would free the port, and the other could then use it legitimately).
    command = (
        f"echo API $PREFECT_API_URL; touch {tmp_path}/up-$PREFECT_HOME_TAG; "
        f"for i in $(seq 300); do [ -e {tmp_path}/up-0 ] && [ -e {tmp_path}/up-1 ] && break; sleep 1; done"
    )
    wrappers = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.prefect_server", "--port", str(port), "--", "bash", "-c", command],
            cwd=ROOT, env=_env_without_api(PREFECT_HOME=str(tmp_path / f"home-{i}"), PYTHONPATH=str(ROOT), PREFECT_HOME_TAG=str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in wrappers]
    for wrapper, (out, err) in zip(wrappers, outputs, strict=True):
        assert wrapper.returncode == 0, err[-3000:]
    urls = [line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("API ")]
    assert len(urls) == 2 and len(set(urls)) == 2, (urls, [err[-1500:] for _, err in outputs])


def test_flow_runs_under_the_per_run_server_send_no_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing on that server reads them, and joining their thread cost every run ~0.7 s; a user's own server keeps them."""
    from prefect.settings import get_current_settings

    from flows.common import flow_run_settings

    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    monkeypatch.setenv(prefect_server.SERVER_PID_ENV, "12345")
    with flow_run_settings():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == default
    monkeypatch.delenv(prefect_server.SERVER_PID_ENV)
    with flow_run_settings():
        assert get_current_settings().flows.heartbeat_frequency == default
