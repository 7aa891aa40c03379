"""Flow: embed every listing with the champion models and build the FAISS similarity indexes.

One index per embedding kind (image: one vector per photo; text and multimodal:
one per product), each recording the registered model version it was built
from. Retrieval quality on the test split goes to metrics/retrieval.json and to
an MLflow run whose id is tagged on the champion model version, so the service
can find "the index that belongs to the champion".

With ``distributed.index_on_dask: true`` the champion models' pass (embeddings + class
probabilities of every listing) runs over shards of ``distributed.shard_size`` rows as Dask tasks
through prefect-dask's DaskTaskRunner (a LocalCluster of ``distributed.n_workers`` processes, or the
cluster at ``distributed.dask_address``, whose workers must see the clean data and the champion
model dirs); the shards are merged in order into the same embedding and probability stores, and
the index is built from them as without Dask: the same vectors, probabilities, ids and index
(tests/test_index_dask.py).
"""

from __future__ import annotations

import time
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from prefect import flow, task

from flows import dask_runner, ranking_step, tracking
from flows.champions import fetch_champion_task
from flows.common import base_parser, fingerprint_paths, load_params, path_of, run_cli
from pipeline_steps import inference, registry, sharding
from pipeline_steps.config import existing_dir, require_choice
from pipeline_steps.embeddings import CacheKey, EmbeddingStore
from pipeline_steps.evaluation import write_metrics_json
from pipeline_steps.index import IndexSettings, SimilarityIndex
from pipeline_steps.index_quality import index_quality_metrics
from pipeline_steps.model_kinds import INDEX_KINDS, PRICE_KIND, SERVED_KINDS
from pipeline_steps.text_embedding_cache import embedding_cache_dir
from pipeline_steps.visualise import neighbour_figure

KINDS = SERVED_KINDS


def _cache_key(model: tuple[str, str, str], settings: dict[str, Any]) -> CacheKey:
    """What a kind's stored embeddings and probabilities belong to: the model version and the clean data."""
    clean_dir = existing_dir(settings, "data.clean_dir")
    return CacheKey(model[1], model[2], fingerprint_paths([clean_dir / "products.parquet", clean_dir / "images.parquet"]))


def _stores(kind: str, settings: dict[str, Any]) -> tuple[EmbeddingStore, EmbeddingStore]:
    """(embeddings, class probabilities) of a kind's listings: same rows, same cache key."""
    return EmbeddingStore(path_of(settings, "index.embeddings_dir") / f"{kind}.parquet"), EmbeddingStore(ranking_step.probs_path(settings, kind))


@task(name="build-index")
def index_task(kind: str, model: tuple[str, str, str], settings: dict[str, Any], filled: bytes | None = None,
               stored_on_dask: bool = False) -> dict[str, Any]:
    """Embed (or reuse the stored embeddings), build the index — or take the one `filled` on Dask — save it,
    score it, log it to MLflow and tag the model version with the run."""
    model_dir, name, version = model
    clean_dir = existing_dir(settings, "data.clean_dir")
    index_dir = path_of(settings, "index.dir") / kind
    classifier = inference.load_classifier(model_dir, batch_size=int(settings["index"]["batch_size"]))
    key = _cache_key(model, settings)
    store, probs_store = _stores(kind, settings)

    computed: dict[str, tuple[np.ndarray, pd.DataFrame]] = {}  # the class probabilities of the same pass (ranking)

    def compute() -> tuple[np.ndarray, pd.DataFrame]:
        # photos' backbone features from the image model's frozen-feature cache when it holds them
        # (keyed by backbone weights + preprocessing + photo bytes, so a fine-tuned backbone never matches),
        # texts' encoder vectors from the training's text-vector cache (keyed by the encoder's weights)
        with sharding.torch_threads(sharding.pass_threads(settings["train"]["num_threads"])):
            prediction = inference.predict_split(
                classifier, clean_dir, None, feature_cache_dir=path_of(settings, "train.image.features_dir"),
                text_cache_dir=embedding_cache_dir(settings["train"]),
            )
        computed["probs"] = (prediction.proba, prediction.ids)
        return prediction.embeddings, prediction.ids

    stored, reused = store.get_or_compute(key, compute)
    probs_store.get_or_compute(key, lambda: computed.get("probs") or (compute(), computed["probs"])[1])
    how = "computed on Dask" if stored_on_dask else ("reused" if reused else "computed")
    print(f"{kind}: {how} {len(stored.ids)} embeddings from {name} v{version}")
    index_settings = IndexSettings.from_params(settings["index"])
    if filled is not None:  # filled shard by shard on Dask from these same stored vectors
        import faiss

        built = SimilarityIndex.from_filled(faiss.deserialize_index(np.frombuffer(filled, dtype=np.uint8)), stored.ids,
                                            index_settings, kind=kind, model_name=name, model_version=version)
    else:
        built = SimilarityIndex.from_settings(stored.vectors, stored.ids, index_settings, kind=kind, model_name=name, model_version=version)
    built.save(index_dir)
    metrics = index_quality_metrics(built, stored.vectors, stored.ids, settings["index"]["eval_k"])
    figure = neighbour_figure(built, stored.vectors, stored.ids, clean_dir, path_of(settings, "evaluate.plots_dir") / f"{kind}_neighbours.png")

    tracking.setup(settings)
    with mlflow.start_run(run_name=f"{kind}-index") as run:
        mlflow.set_tags({"model_kind": kind, "index_for_model": name, "index_for_version": version, "stage": "index"})
        mlflow.log_params({"factory": built.metadata.factory, "size": built.size, "dim": built.dim})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(index_dir), artifact_path="index")
        if figure is not None:
            tracking.log_figure_file(figure, "plots")
    # the registry says which index belongs to which version (the service checks it)
    registry.tag_version(name, version, {"index_run_id": run.info.run_id})
    return {"model": name, "version": version, "size": built.size, "factory": built.metadata.factory, **metrics}


@task(name="predict-shard")
def predict_shard_task(model_dir: str, shard: sharding.Shard, paths: dict[str, str], batch_size: int, num_threads: int) -> dict[str, Any]:
    return sharding.predict_shard(
        model_dir, shard, paths["clean_dir"], paths["out_dir"], batch_size=batch_size,
        feature_cache_dir=paths["features_dir"], num_threads=num_threads, text_cache_dir=paths["text_cache_dir"],
    )


def _predict_shards(model_dirs: dict[str, str], settings: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]]:
    """(embeddings, probabilities, ids) of every listing per kind: one task per shard, every kind's at once."""
    clean_dir = existing_dir(settings, "data.clean_dir")
    batch_size, dist = int(settings["index"]["batch_size"]), settings["distributed"]
    threads = sharding.pass_threads(settings["train"]["num_threads"])  # as many torch threads as the single-process pass
    started = time.perf_counter()
    submitted: dict[str, list[Any]] = {}
    for kind, model_dir in model_dirs.items():
        paths = {
            "clean_dir": str(clean_dir), "features_dir": str(path_of(settings, "train.image.features_dir")),
            "text_cache_dir": str(embedding_cache_dir(settings["train"])),
            "out_dir": str(path_of(settings, "distributed.work_dir") / "index" / kind),
        }
        shards = sharding.plan_shards(sharding.listing_count(clean_dir, kind), int(dist["shard_size"]), batch_size)
        submitted[kind] = [predict_shard_task.submit(str(model_dir), shard, paths, batch_size, threads) for shard in shards]
    merged = {}
    for kind, futures in submitted.items():
        results = [future.result() for future in futures]
        merged[kind] = sharding.merge_predictions(results)
        seconds, n = time.perf_counter() - started, len(merged[kind][2])
        shard_s = sum(r["seconds"] for r in results)
        print(f"{kind}: {n} rows in {len(results)} shards on Dask ({n / shard_s if shard_s else 0:.1f} rows/s per task), "
              f"all in {seconds:.1f} s since the first shard was submitted")
    return merged


def _fill_stores(models: dict[str, tuple[str, str, str]], settings: dict[str, Any]) -> list[str]:
    """Compute the kinds whose stored embeddings or probabilities are stale on Dask and store them
    under the key `index_task` looks for (it then reuses them); return the kinds computed."""
    stale = {
        kind: model for kind, model in models.items()
        if any(store.load_if_fresh(_cache_key(model, settings)) is None for store in _stores(kind, settings))
    }
    if not stale:
        return []
    for kind, (vectors, proba, ids) in _predict_shards({k: m[0] for k, m in stale.items()}, settings).items():
        key = _cache_key(stale[kind], settings)
        store, probs_store = _stores(kind, settings)
        store.save(vectors, ids, key)
        probs_store.save(proba, ids, key)
    return list(stale)


def _fill_indexes(models: dict[str, tuple[str, str, str]], settings: dict[str, Any]) -> dict[str, bytes]:
    """Each kind's index filled over shards of its stored vectors as Dask tasks and merged in shard order
    (`index.factory` of a type whose copies merge into one: Flat, IVF); other types are built in
    `index_task` as without Dask. Trained on every row, like the single-process build: the same index."""
    import faiss

    shard_size, batch_size = int(settings["distributed"]["shard_size"]), int(settings["index"]["batch_size"])
    filled: dict[str, bytes] = {}
    for kind, model in models.items():
        stored = _stores(kind, settings)[0].load_if_fresh(_cache_key(model, settings))
        if stored is None:
            continue
        trained = sharding.empty_index(stored.vectors, str(settings["index"]["factory"]), None,
                                       ef_construction=int(settings["index"]["ef_construction"]))
        if not sharding.merges_into_one(trained):
            print(f"{kind}: index.factory {settings['index']['factory']!r} does not merge from shards; built in one process")
            continue
        started = time.perf_counter()
        blob = faiss.serialize_index(trained)
        shards = sharding.plan_shards(len(stored.vectors), shard_size, batch_size)
        futures = [dask_runner.fill_index_shard_task.submit(blob, stored.vectors[s.start:s.stop]) for s in shards]
        merged = sharding.merge_indexes([faiss.deserialize_index(f.result()) for f in futures])
        filled[kind] = faiss.serialize_index(merged).tobytes()
        print(f"{kind}: index filled over {len(shards)} shards on Dask in {time.perf_counter() - started:.1f} s")
    return filled


@flow(name="index-on-dask", log_prints=True)
def index_on_dask_flow(models: dict[str, tuple[str, str, str]], settings: dict[str, Any]) -> dict[str, Any]:
    """The index stage's heavy work on one Dask cluster: the champion models' pass for the kinds whose stored
    embeddings are stale, then each index filled over shards. Returns {"computed": kinds, "filled": {kind: index}}."""
    computed = _fill_stores(models, settings)
    print(f"champion models' pass on Dask: {', '.join(computed) or 'nothing to compute (stored embeddings are fresh)'}")
    return {"computed": computed, "filled": _fill_indexes(models, settings)}


def run_on_dask(models: dict[str, tuple[str, str, str]], settings: dict[str, Any]) -> dict[str, Any]:
    """`index_on_dask_flow` on the settings' Dask task runner (its workers report to this run's Prefect API)."""
    on_dask = index_on_dask_flow.with_options(task_runner=dask_runner.task_runner(settings))
    with dask_runner.api_for_workers():
        return on_dask(models, settings)


@flow(name="index", log_prints=True)
def index_flow(params: str | None = None, overrides: list[str] | None = None, kind: str = "all") -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    require_choice(kind, "--kind", ("all", *INDEX_KINDS))
    configured = [k for k in settings["index"]["kinds"] if kind in ("all", k)]
    champions = {k: fetch_champion_task(k, settings) for k in KINDS if k in configured or k == PRICE_KIND}
    on_dask: dict[str, Any] = {"computed": [], "filled": {}}
    if settings["distributed"]["index_on_dask"]:
        on_dask = run_on_dask({k: champions[k] for k in configured}, settings)
    results = {k: index_task(k, champions[k], settings, on_dask["filled"].get(k), k in on_dask["computed"]) for k in configured}
    results.update(ranking_step.ranking_task({k: champions[k] for k in configured}, settings, results))
    write_metrics_json(path_of(settings, "evaluate.metrics_dir") / "retrieval.json", results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Embed listings with the champion models and build the FAISS indexes.")
    parser.add_argument("--kind", default="all", choices=("all", *INDEX_KINDS))
    run_cli(index_flow, parser, argv)


if __name__ == "__main__":
    main()
