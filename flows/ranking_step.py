"""The index stage's ranking task: BM25 beside each text-bearing index, ranking weights fitted on val,
graded metrics on test beside the dense-only baseline (pipeline_steps/ranking_eval.py).

Runs after the indexes are built (flows/index.py) and reads only what they wrote: each kind's
index directory, its stored embeddings and class probabilities (index.embeddings_dir) and the
clean products. Writes ``<index.dir>/<kind>/ranking/`` (packaged with the index), returns the
metrics for metrics/retrieval.json and logs them to one MLflow run ("ranking").
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from prefect import task

from flows import tracking
from flows.common import path_of
from pipeline_steps.config import existing_dir
from pipeline_steps.embeddings import load_embeddings
from pipeline_steps.index import SimilarityIndex
from pipeline_steps.io_utils import read_json
from pipeline_steps.ranking import RankingSettings
from pipeline_steps.ranking_eval import KindData, fit_and_report, headline


def probs_path(settings: dict[str, Any], kind: str) -> Path:
    """Where the index stage keeps a kind's class probabilities (same rows and cache key as its embeddings)."""
    return path_of(settings, "index.embeddings_dir") / f"{kind}-probs.parquet"


def _flat(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)


def _mlflow_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "._-/ " else "_" for c in key.replace("@", "_at_"))[:250]


@task(name="fit-ranking")
def ranking_task(models: dict[str, tuple[str, str, str]], settings: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    index_root = path_of(settings, "index.dir")
    ranking_settings = RankingSettings.from_params(settings["index"])
    kinds: dict[str, KindData] = {}
    for kind, (model_dir, _name, _version) in models.items():
        stored = load_embeddings(path_of(settings, "index.embeddings_dir") / f"{kind}.parquet")
        probs = load_embeddings(probs_path(settings, kind))
        if not stored.ids["product_id"].astype(str).equals(probs.ids["product_id"].astype(str)):
            raise ValueError(f"{kind}: stored probabilities and embeddings have different rows; re-run the index stage")
        index = SimilarityIndex.load(index_root / kind, use_gpu=False)
        classes = [str(c) for c in read_json(Path(model_dir) / "config.json")["classes"]]
        kinds[kind] = KindData(index, stored.vectors, stored.ids, probs.vectors, classes)
    products = pd.read_parquet(existing_dir(settings, "data.clean_dir") / "products.parquet")
    report = fit_and_report(kinds, products, ranking_settings, ks=settings["index"]["eval_k"],
                            index_dirs={kind: index_root / kind for kind in kinds})
    flat_headline = headline(report)
    for query_type, numbers in flat_headline.items():
        print(f"ranking {query_type}: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(numbers.items())))

    tracking.setup(settings)
    with mlflow.start_run(run_name="ranking"):
        mlflow.set_tags({"stage": "index", "step": "ranking",
                         **{f"ranking_rule_{q}": e["chosen"]["rule"] for q, e in report.items() if "chosen" in e}})
        metrics: dict[str, float] = {}
        _flat("", flat_headline, metrics)
        mlflow.log_metrics({_mlflow_name(k): v for k, v in metrics.items()})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ranking_report.json"
            path.write_text(json.dumps(report, indent=2, default=float))
            mlflow.log_artifact(str(path))
    return {"ranking": {"headline": flat_headline, "report": report}}
