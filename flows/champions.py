"""Shared task: the champion model directories the index and package stages work from.

Both stages need the registry's current champions as local folders; this module is the
one place that fetches them (it is a task module, not a flow, so neither flow imports
the other). It imports MLflow only: the package stage must not pay for torch or faiss.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import task

from flows import tracking
from flows.common import path_of
from pipeline_steps import registry
from pipeline_steps.io_utils import atomic_dir, write_text


def champions_dir(settings: dict[str, Any]) -> Path:
    return path_of(settings, "index.champions_dir")


@task(name="fetch-champion", retries=2, retry_delay_seconds=5)
def fetch_champion_task(kind: str, settings: dict[str, Any]) -> tuple[str, str, str]:
    """Download the champion's model directory once per version (retried: store I/O).

    Returns:
        (local model dir, registered model name, version).
    """
    tracking.setup(settings)
    client = MlflowClient()  # one client for this fetch, for the store just configured
    registry_params = settings["registry"]
    name = registry.model_name(registry_params["model_prefix"], kind)
    found = registry.champion_version(name, registry_params["champion_alias"], client=client)
    if found is None:
        raise LookupError(f"{name} has no '{registry_params['champion_alias']}' version: run the register stage first")
    version = str(found[0])
    target = champions_dir(settings) / kind
    marker = target / "registered_version.txt"
    if marker.is_file() and marker.read_text().strip() == f"{name}:{version}":
        return str(target / "model"), name, version
    # Only a new champion needs this (it imports torch, through the pyfunc wrappers).
    from pipeline_steps.mlflow_models import find_model_dir

    with atomic_dir(target) as tmp:
        downloaded = registry.download_champion(name, registry_params["champion_alias"], tmp / "download", client=client)
        shutil.move(find_model_dir(downloaded), tmp / "model")  # a rename: the download is ours
        shutil.rmtree(tmp / "download", ignore_errors=True)
        write_text(tmp / "registered_version.txt", f"{name}:{version}\n")
    return str(target / "model"), name, version
