"""The README's first command on a fresh clone, on a machine whose cores are busy.

`make demo` once failed in its first flow on a busy fresh machine: each stage started a
temporary Prefect API with a 20 s start-up limit (the setting meant to raise it was
applied after `import prefect`). This clones the repository, runs the demo's first
stages exactly as the README's command does (`make demo`, stopped after the clean stage
with TARGETS=clean), with no Prefect server running, none of the project's variables
exported and two CPU-bound processes keeping both cores busy beside it.

The only shortcut: the clone reuses this checkout's virtualenv (the install is what
`make test` just did; installing again would download nothing new and take minutes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_steps import runtime_env

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


def _busy_cores(n: int) -> list[subprocess.Popen]:
    """CPU-bound work on `n` cores, the way another job would load the machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _processes_in(folder: Path) -> list[str]:
    """Command lines of live processes whose working directory is inside `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None, reason="needs git and make")
@pytest.mark.skipif(not (VENV / ".installed").is_file(), reason="needs the project's .venv (make install)")
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_demo_first_stages_pass_on_a_fresh_clone_with_busy_cores(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=300)
    (clone / ".venv").symlink_to(VENV)
    (VENV / ".installed").touch()  # newer than the clone's pyproject.toml: make does not reinstall

    managed = set(runtime_env.runtime_env()) | {"BENTOML_HOME", "MLFLOW_TRACKING_URI", "PYTHONPATH", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in managed and not k.startswith(("PREFECT_", "MLFLOW_", "BENTOML_", "DVC_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(VENV)))

    hogs = _busy_cores(2)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            ["make", "demo", "TARGETS=clean"], cwd=clone, env=env, capture_output=True, text=True, timeout=1500,
        )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert (clone / "data" / "clean" / "manifest.json").is_file()
    # every flow of the run reported to the one server the demo started: no temporary APIs
    assert "Prefect UI at http://127.0.0.1:" in output
    assert "Starting temporary server" not in output
    assert "Timed out while attempting to connect" not in output
    time.sleep(1.0)
    assert _processes_in(clone) == [], "the demo left processes behind (its Prefect server?)"
    print(f"fresh-clone demo (sample + validate + clean, both cores busy): {time.monotonic() - started:.0f} s")
