"""The index stage's report on one built index: retrieval quality on the test split, and how fast.

`pipeline_steps/retrieval.py` holds the measures (precision@k, recall against exact search,
latency); this module applies them the way the index stage reports them, so the flow only
logs the numbers (`metrics/retrieval.json`, the index's MLflow run).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline_steps import retrieval
from pipeline_steps.index import SimilarityIndex


def index_quality_metrics(
    built: SimilarityIndex, vectors: np.ndarray, ids: pd.DataFrame, eval_k: Iterable[int]
) -> dict[str, float]:
    """Same-category precision@k of the test queries (own product excluded), plus recall/latency.

    Args:
        built: the index just built from `vectors`.
        vectors: the indexed vectors (row i = index row i), test rows used as queries.
        ids: the rows' ids with `split`, `product_id` and `label` (root category code).
        eval_k: the k of precision@k (params.yaml `index.eval_k`).

    Returns:
        MLflow-safe names (`precision_at_10`, ...): precision@k for each k; for an approximate
        index (not Flat) `recall_at_10_vs_exact`, how much it loses against exhaustive search;
        `latency_*`, one query at a time and in batches. Empty when there is no test row.
    """
    test = (ids["split"] == "test").to_numpy()
    if not test.any():
        return {}
    ks = tuple(int(k) for k in eval_k)
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
