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

from pipeline_steps import evaluation
from pipeline_steps.image_features import (  # noqa: F401  (the pooling lives beside the features: every stage imports that module)
    DEFAULT_PRODUCT_POOLING,
    PRODUCT_POOLING,
    check_pooling,
    pool_by_product,
)


def per_product_metrics(
    proba: np.ndarray, product_ids: Sequence[str], labels: Sequence[int], classes: Sequence[str], pooling: str | None = None
) -> dict[str, float | int | str]:
    """Accuracy, macro-F1 and top-3 of the pooled per-product predictions (metrics/image.json's `per_product`)."""
    pooling = check_pooling(pooling)
    _, product_labels, pooled = pool_by_product(proba, product_ids, labels, pooling)
    metrics = evaluation.classification_metrics(product_labels, pooled, list(classes))
    out: dict[str, float | int | str] = {k: float(metrics[k]) for k in ("accuracy", "macro_f1", "top3_accuracy") if k in metrics}
    return out | {"n": int(len(product_labels)), "pooling": pooling}
