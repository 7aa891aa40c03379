"""The Dask task runner of the sharded stages (flows/index.py with ``distributed.index_on_dask``,
flows/distributed_index.py): prefect-dask's DaskTaskRunner on a LocalCluster of
``distributed.n_workers`` processes, or on the existing cluster at ``distributed.dask_address``.
Defines no flow (flows/ modules may import it: tests/test_flow_imports.py); the one task both use to fill
a shard's copy of an index is here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from prefect import task

from pipeline_steps import sharding


@task(name="fill-index-shard")
def fill_index_shard_task(trained_empty: np.ndarray, vectors: np.ndarray | str) -> np.ndarray:
    """One shard's copy of the trained empty index, filled with its (normalised) vectors — an array, or the
    path of a .npy file a worker can read — serialised."""
    import faiss

    rows = np.load(vectors) if isinstance(vectors, str) else vectors
    return faiss.serialize_index(sharding.fill_shard_index(faiss.deserialize_index(trained_empty), rows))


def task_runner(settings: dict[str, Any]) -> Any:
    """A DaskTaskRunner: the cluster at `distributed.dask_address`, else a LocalCluster."""
    from prefect_dask import DaskTaskRunner

    dist = settings["distributed"]
    if dist["dask_address"]:
        return DaskTaskRunner(address=str(dist["dask_address"]))
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": int(dist["n_workers"]),
            "threads_per_worker": int(dist["threads_per_worker"]),
            "processes": True,
            "dashboard_address": dist["dashboard_address"],
        },
    )


@contextlib.contextmanager
def api_for_workers() -> Iterator[None]:
    """Give the Dask worker processes the flow's Prefect API.

    With PREFECT_API_URL set they inherit it. Without it, each worker would start a temporary API of
    its own (tens of seconds each): start Prefect's temporary server here first and export its URL,
    so the workers (started afterwards, with this environment) report to it.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
