"""Flow: embed every listing with the champion models and build the FAISS similarity indexes.

One index per embedding kind (image: one vector per photo; text and multimodal:
one per product), each recording the registered model version it was built
from. Retrieval quality on the test split goes to metrics/retrieval.json and to
an MLflow run whose id is tagged on the champion model version, so the service
can find "the index that belongs to the champion".
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from prefect import flow, task

from flows import ranking_step, tracking
from flows.champions import fetch_champion_task
from flows.common import base_parser, fingerprint_paths, load_params, path_of, run_cli
from pipeline_steps import inference, registry
from pipeline_steps.config import existing_dir, require_choice
from pipeline_steps.embeddings import CacheKey, EmbeddingStore
from pipeline_steps.evaluation import write_metrics_json
from pipeline_steps.index import IndexSettings, SimilarityIndex
from pipeline_steps.index_quality import index_quality_metrics
from pipeline_steps.model_kinds import INDEX_KINDS, PRICE_KIND, SERVED_KINDS
from pipeline_steps.visualise import neighbour_figure

KINDS = SERVED_KINDS


@task(name="build-index")
def index_task(kind: str, model: tuple[str, str, str], settings: dict[str, Any]) -> dict[str, Any]:
    model_dir, name, version = model
    clean_dir = existing_dir(settings, "data.clean_dir")
    index_dir = path_of(settings, "index.dir") / kind
    classifier = inference.load_classifier(model_dir, batch_size=int(settings["index"]["batch_size"]))
    data_key = fingerprint_paths([clean_dir / "products.parquet", clean_dir / "images.parquet"])
    store = EmbeddingStore(path_of(settings, "index.embeddings_dir") / f"{kind}.parquet")

    computed: dict[str, tuple[np.ndarray, pd.DataFrame]] = {}  # the class probabilities of the same pass (ranking)

    def compute() -> tuple[np.ndarray, pd.DataFrame]:
        # photos' backbone features from the image model's frozen-feature cache when it holds them
        # (keyed by backbone weights + preprocessing + photo bytes, so a fine-tuned backbone never matches)
        prediction = inference.predict_split(classifier, clean_dir, None, feature_cache_dir=path_of(settings, "train.image.features_dir"))
        computed["probs"] = (prediction.proba, prediction.ids)
        return prediction.embeddings, prediction.ids

    stored, reused = store.get_or_compute(CacheKey(name, version, data_key), compute)
    probs_store = EmbeddingStore(ranking_step.probs_path(settings, kind))
    probs_store.get_or_compute(CacheKey(name, version, data_key), lambda: computed.get("probs") or (compute(), computed["probs"])[1])
    print(f"{kind}: {'reused' if reused else 'computed'} {len(stored.ids)} embeddings from {name} v{version}")
    built = SimilarityIndex.from_settings(
        stored.vectors, stored.ids, IndexSettings.from_params(settings["index"]), kind=kind, model_name=name, model_version=version
    )
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


@flow(name="index", log_prints=True)
def index_flow(params: str | None = None, overrides: list[str] | None = None, kind: str = "all") -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    require_choice(kind, "--kind", ("all", *INDEX_KINDS))
    configured = [k for k in settings["index"]["kinds"] if kind in ("all", k)]
    champions = {k: fetch_champion_task(k, settings) for k in KINDS if k in configured or k == PRICE_KIND}
    results = {k: index_task(k, champions[k], settings) for k in configured}
    results.update(ranking_step.ranking_task({k: champions[k] for k in configured}, settings, results))
    write_metrics_json(path_of(settings, "evaluate.metrics_dir") / "retrieval.json", results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Embed listings with the champion models and build the FAISS indexes.")
    parser.add_argument("--kind", default="all", choices=("all", *INDEX_KINDS))
    run_cli(index_flow, parser, argv)


if __name__ == "__main__":
    main()
