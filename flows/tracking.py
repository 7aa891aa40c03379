"""MLflow run bookkeeping for flows: pipeline_steps/tracking.py bound to a stage's settings.

The work (which store, which run, what it records) lives in `pipeline_steps/tracking.py`;
these adapters only pick the params.yaml sections and the project root out of the settings
every flow holds, so a flow writes `tracking.reopen_run(settings, model_dir)`.
No flow is defined here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from flows.common import ROOT, path_of
from pipeline_steps import tracking
from pipeline_steps.tracking import (  # noqa: F401  (what the flows use)
    RUN_ID_FILE,
    log_epoch,
    log_figure_file,
    remember_run,
    run_id_of,
)


def setup(settings: dict[str, Any]) -> str:
    """Point MLflow at the configured store (env MLFLOW_TRACKING_URI wins) and return the experiment id."""
    return tracking.configure_tracking(settings["registry"], ROOT)


@contextmanager
def training_run(
    settings: dict[str, Any], kind: str, params_section: dict[str, Any], resume_run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Open (or re-open, when resuming) the MLflow run of one model's training."""
    with tracking.training_run(
        settings["registry"], ROOT, path_of(settings, "data.raw_dir"), kind, params_section, resume_run_id
    ) as run:
        yield run


@contextmanager
def reopen_run(settings: dict[str, Any], model_dir: Path) -> Iterator[mlflow.ActiveRun]:
    """Re-open the run that trained `model_dir` so later stages log into it."""
    with tracking.reopen_run(settings["registry"], ROOT, model_dir) as run:
        yield run
