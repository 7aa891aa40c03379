"""Flow: photo embedding and index building over shards of the listings, on Dask.

    python -m flows.distributed_index [--set distributed.n_workers=4] [--set distributed.dask_address=tcp://host:8786]

The tasks run on a Dask cluster through prefect-dask's DaskTaskRunner: a LocalCluster of
``distributed.n_workers`` processes by default, or the existing cluster at
``distributed.dask_address`` (every worker must see the project code and the photos, e.g. a shared
volume). Each shard (``distributed.shard_size`` photos of ``data.clean_dir/images.parquet``) is
embedded by one task with the frozen image backbone of ``train.image`` and written to
``distributed.work_dir``; one empty index of ``index.factory`` is trained once, each shard fills a
copy, and the copies are merged in shard order (pipeline_steps/sharding.py). The result — vectors,
ids, index contents — equals the single-process run (tests/test_distributed.py).

Outputs in ``distributed.work_dir``: ``shards/`` (per-shard vectors and ids), ``index.faiss``,
``ids.parquet``, ``summary.json`` (shards, rows, seconds, photos/s).
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from prefect import flow, task

from flows.common import base_parser, load_params, path_of, run_cli
from flows.dask_runner import api_for_workers, fill_index_shard_task, task_runner
from pipeline_steps import sharding
from pipeline_steps.io_utils import write_json


@task(name="embed-shard")
def embed_shard_task(rows: pd.DataFrame, shard: sharding.Shard, settings: dict[str, Any], out_dir: str) -> dict[str, Any]:
    return sharding.embed_shard(rows, shard, settings, out_dir)


def photo_rows(settings: dict[str, Any]) -> pd.DataFrame:
    clean_dir = path_of(settings, "data.clean_dir")
    images = pd.read_parquet(clean_dir / "images.parquet", columns=["image_id", "product_id", "path"])
    images["path"] = [str(clean_dir / p) for p in images["path"]]
    return images.reset_index(drop=True)


@flow(name="distributed-embed-index", log_prints=True)
def distributed_index_flow(params: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    return _run(settings, photo_rows(settings))


def _run(settings: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    import faiss

    dist = settings["distributed"]
    work_dir = path_of(settings, "distributed.work_dir")
    shards = sharding.plan_shards(len(rows), int(dist["shard_size"]), int(settings["index"]["batch_size"]))
    started = time.perf_counter()
    futures = [embed_shard_task.submit(rows.iloc[s.start:s.stop], s, settings, str(work_dir / "shards")) for s in shards]
    results = [future.result() for future in futures]
    embed_s = time.perf_counter() - started
    vectors, ids = sharding.merge_shards(results)

    trained = sharding.empty_index(vectors, str(settings["index"]["factory"]), dist["index_train_points"],
                                   ef_construction=int(settings["index"]["ef_construction"]))
    blob = faiss.serialize_index(trained)
    index_futures = [fill_index_shard_task.submit(blob, str(r["vectors"])) for r in sorted(results, key=lambda r: r["shard"])]
    merged = sharding.merge_indexes([faiss.deserialize_index(f.result()) for f in index_futures])
    index_path = work_dir / "index.faiss"
    faiss.write_index(merged, str(index_path))
    ids.to_parquet(work_dir / "ids.parquet")
    summary = {
        "shards": len(shards),
        "rows": int(len(rows)),
        "dim": int(vectors.shape[1]) if vectors.size else 0,
        "index_size": int(merged.ntotal),
        "embed_seconds": embed_s,
        "photos_per_second": len(rows) / embed_s if embed_s > 0 else None,
        "total_seconds": time.perf_counter() - started,
        "dask_address": dist["dask_address"],
        "n_workers": dist["n_workers"],
    }
    write_json(work_dir / "summary.json", summary)
    print(f"{len(rows)} photos in {len(shards)} shards: {summary['photos_per_second']:.1f} photos/s; index at {index_path}")
    return summary


def run_on_dask(settings: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    """`_run` as a flow on the settings' Dask task runner (what the CLI does, for given rows)."""

    @flow(name="distributed-embed-index", task_runner=task_runner(settings))
    def _flow() -> dict[str, Any]:
        return _run(settings, rows)

    with api_for_workers():
        return _flow()


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Embed the cleaned photos and build the index over shards on Dask.")
    args = vars(parser.parse_args(argv))
    settings = load_params(args.get("params"), args.get("overrides") or [])
    chosen = distributed_index_flow.with_options(task_runner=task_runner(settings))
    with api_for_workers():
        run_cli(chosen, parser, argv)


if __name__ == "__main__":
    main()
