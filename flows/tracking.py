"""MLflow run bookkeeping shared by the training, evaluation and register flows.

A model directory remembers the MLflow run that trained it (run_id.txt), so the
evaluation and registration stages add their results to that same run and the
MLflow UI shows one run per trained model with its curves, test metrics and
registered version side by side.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from flows.common import ROOT, path_of
from pipeline_steps import registry
from pipeline_steps.io_utils import write_text

RUN_ID_FILE = "run_id.txt"


def setup(settings: dict[str, Any]) -> str:
    """Point MLflow at the configured store (env MLFLOW_TRACKING_URI wins) and return the experiment id."""
    return registry.configure_tracking(settings["registry"], ROOT)


def run_id_of(model_dir: Path) -> str | None:
    marker = Path(model_dir) / RUN_ID_FILE
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def remember_run(model_dir: Path, run_id: str) -> None:
    write_text(Path(model_dir) / RUN_ID_FILE, run_id + "\n")


@contextmanager
def training_run(
    settings: dict[str, Any], kind: str, params_section: dict[str, Any], resume_run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Open (or re-open, when resuming) the MLflow run of one model's training."""
    experiment_id = setup(settings)
    raw_dir = path_of(settings, "data.raw_dir")
    with mlflow.start_run(run_id=resume_run_id, experiment_id=experiment_id, run_name=f"{kind}") as run:
        mlflow.set_tags({**registry.run_tags(ROOT, raw_dir), "model_kind": kind})
        if resume_run_id is None:
            registry.log_params_section(params_section, prefix=kind)
        yield run


@contextmanager
def reopen_run(settings: dict[str, Any], model_dir: Path) -> Iterator[mlflow.ActiveRun]:
    """Re-open the run that trained `model_dir` so later stages log into it."""
    setup(settings)
    run_id = run_id_of(model_dir)
    if run_id is None:
        raise FileNotFoundError(f"{model_dir} has no {RUN_ID_FILE}: train it with the pipeline first")
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    """Per-epoch callback for the training loop: live curves in the MLflow UI."""
    numeric = {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}
    mlflow.log_metrics(numeric, step=epoch)
