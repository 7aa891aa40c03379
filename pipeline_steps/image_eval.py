"""Per-product scores of a per-photo image classifier.

The image model predicts one photo at a time; a listing (product) often has several photos. Its
per-product prediction pools the photos' predictions:

* ``mean_log`` (default, `train.image.product_pooling`): the mean of the photos' log-probabilities,
  i.e. the normalised geometric mean of their probabilities — the product-of-experts rule for
  photos treated as independent views of one item: a class that one confident photo rules out
  is ruled out for the product;
* ``mean``: the mean of the probabilities (an average vote: one confident photo dominates less).

On the real listings' val split the two were compared by `benchmarks/real_data_report.py --split val`
(benchmarks/results/image_real_data.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline_steps.errors import ConfigError

PRODUCT_POOLING = ("mean_log", "mean")
DEFAULT_PRODUCT_POOLING = "mean_log"
_EPS = 1e-12


def check_pooling(value: str | None) -> str:
    pooling = DEFAULT_PRODUCT_POOLING if value is None else value
    if pooling not in PRODUCT_POOLING:
        raise ConfigError(f"params.yaml key 'train.image.product_pooling' must be one of {', '.join(PRODUCT_POOLING)}, got {value!r}")
    return pooling


def pool_by_product(
    proba: np.ndarray, product_ids: Sequence[str], labels: Sequence[int], pooling: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(product ids, labels, pooled probabilities) with one row per product, in first-seen order.

    `proba` is (n photos, n classes); rows of a product share its label (the first is kept).
    Pooled rows are probabilities (they sum to 1) for both poolings.
    """
    pooling = check_pooling(pooling)
    proba = np.asarray(proba, dtype=np.float64)
    ids = pd.Series([str(p) for p in product_ids])
    codes, uniques = pd.factorize(ids, sort=False)
    n_products, n_classes = len(uniques), proba.shape[1] if proba.ndim == 2 else 0
    values = np.log(np.clip(proba, _EPS, 1.0)) if pooling == "mean_log" else proba
    sums = np.zeros((n_products, n_classes), dtype=np.float64)
    np.add.at(sums, codes, values)
    counts = np.bincount(codes, minlength=n_products).reshape(-1, 1).astype(np.float64)
    pooled = sums / np.maximum(counts, 1.0)
    if pooling == "mean_log":
        pooled = np.exp(pooled - pooled.max(axis=1, keepdims=True))
        pooled /= pooled.sum(axis=1, keepdims=True)
    first = np.zeros(n_products, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]
    product_labels = np.asarray(labels)[first] if len(codes) else np.asarray(labels)[:0]
    return np.asarray(uniques, dtype=object), product_labels, pooled.astype(np.float32)


def per_product_metrics(
    proba: np.ndarray, product_ids: Sequence[str], labels: Sequence[int], classes: Sequence[str], pooling: str | None = None
) -> dict[str, float | int | str]:
    """Accuracy, macro-F1 and top-3 of the pooled per-product predictions (metrics/image.json's `per_product`)."""
    from pipeline_steps import evaluation

    pooling = check_pooling(pooling)
    _, product_labels, pooled = pool_by_product(proba, product_ids, labels, pooling)
    metrics = evaluation.classification_metrics(product_labels, pooled, list(classes))
    out: dict[str, float | int | str] = {k: float(metrics[k]) for k in ("accuracy", "macro_f1", "top3_accuracy") if k in metrics}
    return out | {"n": int(len(product_labels)), "pooling": pooling}
