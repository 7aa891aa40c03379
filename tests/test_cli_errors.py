"""Expected errors are messages, not crashes (flows/common.py run_cli, flows/cli_errors.py).

Before: every stop of a stage printed a Python traceback after its message, through Prefect's
flow-failure logging ("Encountered exception during execution"), and exited with 1 whatever
the cause.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import common
from flows.cli_errors import EXIT_CONFIG, EXIT_DATA, EXIT_OTHER, project_error, quiet_project_tracebacks
from pipeline_steps.errors import ConfigError, DataValidationError, PipelineError, RejectThresholdExceeded

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_cli installs SIGTERM/SIGINT handlers for a stage process; not in the test process."""
    monkeypatch.setattr(common, "install_stop_handlers", lambda *a, **k: None)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("MARKETPLACE_DEBUG", raising=False)


def _raiser(error: BaseException):
    def flow(**_: object) -> None:
        raise error

    return flow


@pytest.mark.parametrize(
    "error, code",
    [
        (DataValidationError("Products.csv is missing column 'price'"), EXIT_DATA),
        (RejectThresholdExceeded("40% rejected"), EXIT_DATA),
        (ConfigError("params.yaml key 'x' is bad"), EXIT_CONFIG),
        (PipelineError("the MLflow server at http://127.0.0.1:1 does not answer"), EXIT_OTHER),
    ],
)
def test_project_errors_exit_with_one_message_and_their_code(error, code, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        common.run_cli(_raiser(error), argparse.ArgumentParser(), [])
    assert info.value.code == code
    err = capsys.readouterr().err
    assert err.strip() == f"error: {error}"
    assert "Traceback" not in err


def test_unexpected_errors_keep_their_traceback() -> None:
    with pytest.raises(ZeroDivisionError):
        common.run_cli(_raiser(ZeroDivisionError("bug")), argparse.ArgumentParser(), [])


def test_debug_variable_re_raises_the_project_error(monkeypatch) -> None:
    monkeypatch.setenv("MARKETPLACE_DEBUG", "1")
    with pytest.raises(DataValidationError):
        common.run_cli(_raiser(DataValidationError("bad")), argparse.ArgumentParser(), [])


def test_log_records_of_project_errors_lose_only_the_traceback(caplog) -> None:
    logger = logging.getLogger("prefect.flow_runs.test")
    with caplog.at_level(logging.ERROR), quiet_project_tracebacks():
        for error in (DataValidationError("bad data"), ValueError("a bug")):
            try:
                raise error
            except Exception as exc:  # noqa: BLE001
                logger.exception("Encountered exception during execution: %r", exc)
    project, bug = caplog.records
    assert project.exc_info is None and "bad data" in project.getMessage()
    assert bug.exc_info is not None
    # outside run_cli the records keep their tracebacks
    try:
        raise DataValidationError("later")
    except DataValidationError:
        record = logger.makeRecord("x", logging.ERROR, "f", 1, "m", (), sys.exc_info())
    assert record.exc_info is not None


def test_project_error_is_found_through_the_cause_chain() -> None:
    try:
        try:
            raise ConfigError("root cause")
        except ConfigError as inner:
            raise RuntimeError("wrapped by a library") from inner
    except RuntimeError as outer:
        assert isinstance(project_error(outer), ConfigError)
    assert project_error(ValueError("x")) is None


@pytest.mark.integration
def test_a_stopping_stage_prints_no_traceback_and_marks_the_run_failed(tmp_path: Path) -> None:
    """The real thing: `python -m flows.validate` on an export missing columns, through Prefect."""
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "Products.csv").write_text(",id,product_name\n0,p1,Sofa\n", encoding="utf-8")
    (raw / "Images.csv").write_text(",id,product_id\n0,i1,p1\n", encoding="utf-8")
    command = [
        sys.executable, "-m", "flows.validate", "--raw-dir", str(raw),
        "--set", f"data.validated_dir={tmp_path / 'validated'}",
        "--set", f"validation.data_docs_dir={tmp_path / 'docs'}",
        "--set", f"evaluate.metrics_dir={tmp_path / 'metrics'}",
    ]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("MARKETPLACE_DEBUG", None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_DATA, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "error: Products.csv at" in done.stderr and "missing required columns" in done.stderr
    assert "Finished in state Failed" in output  # Prefect still records the failure, with the message
    assert not (tmp_path / "validated" / "products.parquet").exists()
    # (MARKETPLACE_DEBUG=1 keeping the traceback: test_debug_variable_re_raises_the_project_error,
    # in-process, spares a second Prefect start here)
