"""Flow: embed every listing with the champion models and build the FAISS similarity indexes.

One index per embedding kind (image: one vector per photo; text and multimodal:
one per product), each recording the registered model version it was built
from. Retrieval quality on the test split goes to metrics/retrieval.json and to
an MLflow run whose id is tagged on the champion model version, so the service
can find "the index that belongs to the champion".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from prefect import flow, task

from flows import ranking_step, tracking
from flows.champions import fetch_champion_task
from flows.common import base_parser, fingerprint_paths, load_params, path_of, run_cli
from pipeline_steps import inference, registry, retrieval
from pipeline_steps.config import existing_dir, require_choice
from pipeline_steps.embeddings import CacheKey, EmbeddingStore
from pipeline_steps.evaluation import write_metrics_json
from pipeline_steps.index import IndexSettings, SimilarityIndex
from pipeline_steps.io_utils import read_json
from pipeline_steps.visualise import save_neighbour_grid

KINDS = ("image", "text", "multimodal", "price")
INDEX_KINDS = ("image", "text", "multimodal")


def _retrieval_metrics(built: SimilarityIndex, vectors: np.ndarray, ids: pd.DataFrame, settings: dict[str, Any]) -> dict[str, float]:
    """Same-category precision@k of test queries (own product excluded), plus recall/latency for ANN."""
    test = (ids["split"] == "test").to_numpy()
    if not test.any():
        return {}
    ks = tuple(int(k) for k in settings["index"]["eval_k"])
    metrics = retrieval.precision_at_k(
        built, vectors[test], ids.loc[test, "product_id"].tolist(), ids.loc[test, "label"].to_numpy(), "label",
        ks=ks, unique_products=built.metadata.kind == "image",
    )
    if built.metadata.factory.replace(",", "").lower() != "flat":
        exact = SimilarityIndex.build(vectors, ids, kind=built.metadata.kind, factory="Flat", use_gpu=False)
        metrics["recall@10_vs_exact"] = retrieval.recall_at_k_vs_exact(built, exact, vectors[test], k=10)
    latency = retrieval.query_latency(built, vectors[test][:200], k=max(ks))
    metrics.update({f"latency_{key}": float(value) for key, value in latency.items()})
    return {key.replace("@", "_at_"): float(value) for key, value in metrics.items()}


def _neighbour_figure(built: SimilarityIndex, vectors: np.ndarray, ids: pd.DataFrame, clean_dir: Path, out: Path) -> Path | None:
    """Thumbnails of a few test listings and their nearest neighbours: how search looks to a user."""
    images = pd.read_parquet(clean_dir / "images.parquet", columns=["image_id", "product_id", "path"])
    first_photo = images.drop_duplicates("product_id").set_index("product_id")["path"]
    classes = read_json(clean_dir / "labels.json")["classes"]
    test_rows = [i for i in np.flatnonzero((ids["split"] == "test").to_numpy()) if ids.at[i, "product_id"] in first_photo.index][:6]
    if not test_rows:
        return None
    hits = built.search(vectors[test_rows], k=5, exclude_product_ids=[ids.at[i, "product_id"] for i in test_rows])
    rows = []
    for row, row_hits in zip(test_rows, hits):
        query = (clean_dir / first_photo[ids.at[row, "product_id"]], classes[int(ids.at[row, "label"])])
        found = [
            (clean_dir / first_photo[h.product_id], f"{h.score:.2f}") for h in row_hits if h.product_id in first_photo.index
        ]
        rows.append((query, found))
    return save_neighbour_grid(rows, out, title=f"{built.metadata.kind} index: test queries and nearest listings")


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
    metrics = _retrieval_metrics(built, stored.vectors, stored.ids, settings)
    figure = _neighbour_figure(built, stored.vectors, stored.ids, clean_dir, path_of(settings, "evaluate.plots_dir") / f"{kind}_neighbours.png")

    tracking.setup(settings)
    with mlflow.start_run(run_name=f"{kind}-index") as run:
        mlflow.set_tags({"model_kind": kind, "index_for_model": name, "index_for_version": version, "stage": "index"})
        mlflow.log_params({"factory": built.metadata.factory, "size": built.size, "dim": built.dim})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(index_dir), artifact_path="index")
        if figure is not None:
            mlflow.log_artifact(str(figure), artifact_path="plots")
    MlflowClient().set_model_version_tag(name, version, "index_run_id", run.info.run_id)
    return {"model": name, "version": version, "size": built.size, "factory": built.metadata.factory, **metrics}


@flow(name="index", log_prints=True)
def index_flow(params: str | None = None, overrides: list[str] | None = None, kind: str = "all") -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    require_choice(kind, "--kind", ("all", *INDEX_KINDS))
    configured = [k for k in settings["index"]["kinds"] if kind in ("all", k)]
    champions = {k: fetch_champion_task(k, settings) for k in KINDS if k in configured or k == "price"}
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
