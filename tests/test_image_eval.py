"""Per-product pooling of an image model's photo predictions (pipeline_steps/image_eval.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_steps import image_eval
from pipeline_steps.errors import ConfigError

PROBA = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
PRODUCTS = ["a", "a", "b", "a"]
LABELS = [0, 0, 1, 0]


def test_mean_log_is_the_normalised_geometric_mean_per_product() -> None:
    ids, labels, pooled = image_eval.pool_by_product(PROBA, PRODUCTS, LABELS, "mean_log")
    assert ids.tolist() == ["a", "b"] and labels.tolist() == [0, 1]
    geometric = np.array([0.9 * 0.2 * 0.5, 0.1 * 0.8 * 0.5]) ** (1 / 3)
    np.testing.assert_allclose(pooled[0], geometric / geometric.sum(), rtol=1e-5)
    np.testing.assert_allclose(pooled[1], PROBA[2], rtol=1e-6)  # one photo: its own prediction
    np.testing.assert_allclose(pooled.sum(axis=1), 1.0, rtol=1e-6)


def test_mean_averages_probabilities_and_a_zero_probability_does_not_break_mean_log() -> None:
    _, _, pooled = image_eval.pool_by_product(PROBA, PRODUCTS, LABELS, "mean")
    np.testing.assert_allclose(pooled[0], PROBA[[0, 1, 3]].mean(axis=0), rtol=1e-6)
    _, _, pooled = image_eval.pool_by_product(np.array([[1.0, 0.0], [0.0, 1.0]]), ["x", "x"], [0, 0], "mean_log")
    assert np.isfinite(pooled).all()
    np.testing.assert_allclose(pooled[0], [0.5, 0.5], rtol=1e-6)


def test_per_product_metrics_and_pooling_choice() -> None:
    metrics = image_eval.per_product_metrics(PROBA, PRODUCTS, LABELS, ["c0", "c1"])
    assert metrics["pooling"] == image_eval.DEFAULT_PRODUCT_POOLING == "mean_log"
    assert metrics["n"] == 2 and metrics["accuracy"] == pytest.approx(0.5)  # a -> c0 (right), b -> c0 (wrong)
    with pytest.raises(ConfigError, match="product_pooling.*mean_log, mean"):
        image_eval.check_pooling("max")


def test_evaluate_writes_the_per_product_scores_of_the_image_model() -> None:
    from pipeline_steps import evaluation

    scores = evaluation.per_product_scores(PROBA, PRODUCTS, LABELS, ["c0", "c1"], None)
    assert scores["pooling"] == "mean_log" and scores["n"] == 2 and scores["accuracy"] == pytest.approx(0.5)
    assert evaluation.per_product_scores(PROBA, PRODUCTS, LABELS, ["c0", "c1"], "mean")["pooling"] == "mean"
