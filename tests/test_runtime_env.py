"""The project's process settings take effect in every entry point, before the libraries read them.

Prefect (like MLflow and BentoML) reads its settings when it is imported, so a variable
set afterwards is silently ignored. These tests start fresh interpreters the way dvc.yaml
starts a stage and the way `bentoml serve` loads the service, with none of the variables
exported, and read back each library's *effective* setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_steps import runtime_env

ROOT = Path(__file__).resolve().parent.parent
# Every stage module is imported through the flows package; these cover the lightest one, the
# one with great-expectations and the one that imports every flow (a fresh interpreter each).
STAGE_MODULES = ["flows.generate_sample", "flows.validate", "flows.pipeline"]


def _bare_env() -> dict[str, str]:
    """The environment of a user who exported nothing: none of the project's variables."""
    managed = set(runtime_env.runtime_env())
    return {k: v for k, v in os.environ.items() if k not in managed and not k.startswith(("PREFECT_", "MLFLOW_", "BENTOML_"))}


def _python(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env or _bare_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_stage_modules_apply_prefect_settings_before_prefect_reads_them(module: str) -> None:
    out = _python(
        f"import {module}, os\n"
        "from prefect.settings import get_current_settings\n"
        "s = get_current_settings()\n"
        "print(s.server.ephemeral.startup_timeout_seconds, s.home, s.server.analytics_enabled, os.environ['HF_HUB_OFFLINE'])"
    )
    timeout, home, analytics, offline = out.splitlines()[-1].split()
    assert int(timeout) == 300  # Prefect's own default is 20: it would mean the setting came too late
    assert Path(home) == ROOT / ".prefect"
    assert analytics == "False"
    assert offline == "1"


def test_a_setting_applied_after_import_prefect_is_ignored() -> None:
    """The trap this module exists for: proves the check above can fail."""
    out = _python(
        "import prefect, os\n"
        "os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS'] = '300'\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)"
    )
    assert int(out.splitlines()[-1]) != 300


def test_user_exported_values_win() -> None:
    env = {**_bare_env(), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "45"}
    out = _python(
        "import flows.clean\nfrom prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)",
        env,
    )
    assert int(out.splitlines()[-1]) == 45


def test_service_package_switches_bentoml_tracking_off_before_bentoml_is_imported() -> None:
    out = _python(
        "import service, bentoml, os\n"
        "from bentoml._internal.utils.analytics.usage_stats import do_not_track\n"
        "print(do_not_track(), os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    )
    assert out.splitlines()[-1].split() == ["True", "true"]


@pytest.mark.integration
def test_runtime_env_launcher_gives_other_programs_the_settings() -> None:
    out = _python(
        "import subprocess, sys\n"
        "print(subprocess.run([sys.executable, '-m', 'pipeline_steps.runtime_env', '--', sys.executable, '-c',"
        " 'import os; print(os.environ[\"PREFECT_HOME\"], os.environ[\"GX_ANALYTICS_ENABLED\"])'],"
        " capture_output=True, text=True, check=True).stdout)"
    )
    home, gx = out.splitlines()[-1].split()
    assert Path(home) == ROOT / ".prefect"
    assert gx == "false"


def test_importing_pipeline_steps_changes_no_environment() -> None:
    out = _python(
        "import os\nbefore = dict(os.environ)\n"
        "import pipeline_steps.runtime_env, pipeline_steps.config, pipeline_steps.io_utils\n"
        "print(sorted(set(os.environ) - set(before)))"
    )
    assert out.splitlines()[-1] == "[]"


def test_a_stage_run_by_hand_builds_into_the_store_make_serve_reads() -> None:
    """`dvc repro` typed by hand (no Makefile around it) uses the project's BentoML store too."""
    out = _python(
        "import flows.package\n"
        "from bentoml._internal.configuration.containers import BentoMLContainer\n"
        "print(BentoMLContainer.bentoml_home.get())"
    )
    assert Path(out.splitlines()[-1]) == ROOT / "bentoml_home"


def test_test_session_runs_with_the_settings() -> None:
    """conftest.py applies them before any test module imports Prefect."""
    from prefect.settings import get_current_settings

    expected = int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    assert get_current_settings().server.ephemeral.startup_timeout_seconds == expected


def test_apply_sets_only_what_is_missing() -> None:
    env = {"PREFECT_HOME": "/elsewhere"}
    applied = runtime_env.apply(env)
    assert env["PREFECT_HOME"] == "/elsewhere"
    assert "PREFECT_HOME" not in applied
    assert env["HF_HUB_OFFLINE"] == "1"
