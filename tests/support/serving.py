"""`bentoml serve` of the marketplace service in a subprocess, for tests and benchmarks.

`ServiceProcess(bundle_dir, bentoml_home, log_path)` starts `bentoml serve <target>` (default
service.service:MarketplaceSearch) on a free loopback port with MARKETPLACE_BUNDLE_DIR and
BENTOML_HOME set, waits for /readyz and stops it (terminate the process group, wait, kill).
`served(bundle_dir, workdir)` is the tests' module fixture body: serve, yield, stop, and fail when
the server answered any request with a 500.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline_steps.config import PROJECT_ROOT
from pipeline_steps.runtime_env import OFFLINE_ENV

SERVICE_TARGET = "service.service:MarketplaceSearch"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """`bentoml serve` of the marketplace service in a subprocess (its own process group)."""

    def __init__(
        self,
        bundle_dir: str | Path,
        bentoml_home: str | Path,
        log_path: str | Path,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        target: str = SERVICE_TARGET,
        cwd: str | Path = PROJECT_ROOT,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.bentoml_home = Path(bentoml_home)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(extra_env or {})
        self.target = target
        self.cwd = Path(cwd)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "MARKETPLACE_BUNDLE_DIR": str(self.bundle_dir),
            "BENTOML_HOME": str(self.bentoml_home),
            **OFFLINE_ENV,  # telemetry off, hubs offline (pipeline_steps/runtime_env.py)
        }
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 180.0) -> ServiceProcess:
        import requests

        self.bentoml_home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "bentoml", "serve", self.target, "--port", str(self.port), "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=self.env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`bentoml serve` exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"service not ready within {timeout:.0f}s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the server to exit on its own (e.g. refusing a bad bundle); its return code or None."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, n_chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, wait, then SIGKILL what is left."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:  # workers left behind in the group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextmanager
def served(bundle_dir: str | Path, workdir: str | Path, timeout: float = 240.0) -> Iterator[ServiceProcess]:
    """Serve `bundle_dir` for the block; afterwards assert that no request was answered with a 500."""
    workdir = Path(workdir)
    proc = ServiceProcess(bundle_dir, workdir / "bentoml_home", workdir / "serve.log")
    proc.start(timeout=timeout)
    try:
        yield proc
    finally:
        proc.stop()
        log = proc.log_tail(200_000)
        assert "status=500" not in log, "the service answered a request with a 500:\n" + log[-5000:]
