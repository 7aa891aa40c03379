"""Services that go away: the register stage with the MLflow tracking server stopped.

It retries what is idempotent (the health check), and otherwise fails within seconds with one
message naming the URI, instead of MLflow's minutes of retries ending in a connection traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from flows.cli_errors import EXIT_OTHER
from pipeline_steps import registry

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_stopped_server_is_one_message_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    slept: list[float] = []
    with pytest.raises(registry.TrackingUnavailable) as info:
        registry.require_tracking_server(uri, attempts=3, timeout_s=1, sleep=slept.append)
    message = str(info.value)
    assert f"MLflow tracking server at {uri} does not answer after 3 tries" in message
    assert "MLFLOW_TRACKING_URI" in message and "run the stage again" in message
    assert slept == [1.0, 2.0]  # retried with backoff: the check is idempotent


def test_local_stores_need_no_server() -> None:
    registry.require_tracking_server("sqlite:////tmp/x/mlflow.db")
    registry.require_tracking_server("file:///tmp/mlruns")


@pytest.mark.integration
def test_a_server_that_comes_back_is_retried_not_failed() -> None:
    answers = iter([503, 200])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(next(answers, 200))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        registry.require_tracking_server(f"http://127.0.0.1:{server.server_port}", attempts=3, sleep=lambda _: None)
    finally:
        server.shutdown()


def test_configure_tracking_fails_fast_on_a_dead_server(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for key in registry.HTTP_RETRY_ENV:
        monkeypatch.delenv(key, raising=False)
    started = time.monotonic()
    with pytest.raises(registry.TrackingUnavailable, match=uri):
        registry.configure_tracking({"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "x"}, ROOT)
    assert time.monotonic() - started < 30
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # MLflow's own retries are bounded too


@pytest.mark.integration
def test_register_stage_with_the_server_stopped_exits_with_the_uri(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MARKETPLACE_DEBUG", None)
    command = [sys.executable, "-m", "flows.register", "--set", f"registry.summary_file={tmp_path / 'registry.json'}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_OTHER, output[-3000:]
    assert f"error: the MLflow tracking server at {uri} does not answer" in done.stderr
    assert "Traceback" not in output
    assert not (tmp_path / "registry.json").exists()


def test_a_server_lost_mid_stage_is_named_not_a_connection_traceback() -> None:
    from mlflow.exceptions import MlflowException

    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(registry.TrackingUnavailable, match=uri):
        with registry.tracking_guard(uri):
            raise MlflowException("API request to endpoint /api/2.0/mlflow/registered-models/alias failed")
    # a local store that answers: the original error, unchanged
    with pytest.raises(MlflowException, match="real problem"):
        with registry.tracking_guard("sqlite:////tmp/x.db"):
            raise MlflowException("real problem")
