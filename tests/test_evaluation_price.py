"""The price estimator is scored the way it is served, on real (small) scikit-learn models.

The service asks the price model with the category its classifier PREDICTED for the request
(service/engine.py: predict_batch), not the seller's category. The evaluate stage used to score
it with the true category, so the promoted median error was one no user ever got. Here the
category classifier is a real text model trained to be wrong (on rotated labels), so the served
error and the true-category error differ and the test can tell which one is the headline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_steps.baselines import evaluate_baseline, load_sklearn_model, train_price_estimator, train_text_baseline
from pipeline_steps.config import load_params
from pipeline_steps.evaluation import predict_categories, regression_metrics, score_model, score_price

# three categories with very different prices, named by words only their listings use
CATEGORIES = {
    "Appliances": (["fridge freezer", "washing machine", "tumble dryer"], 300.0),
    "Home & Garden": (["garden bench", "flower pots", "lawn mower"], 40.0),
    "Phones, Mobile Phones & Telecoms": (["iphone unlocked", "samsung galaxy", "pixel phone"], 900.0),
}
TOWNS = [("Leeds", "West Yorkshire"), ("Bath", "Somerset"), ("Norwich", "Norfolk")]


def _clean_dir(root: Path, rotate: int = 0) -> Path:
    """A clean layer (products.parquet + labels.json); `rotate` shifts every label (a classifier trained on it is wrong)."""
    classes = sorted(CATEGORIES)
    rng = np.random.default_rng(0)
    rows = []
    for label, category in enumerate(classes):
        words, price = CATEGORIES[category]
        for i in range(12):
            split = "test" if i >= 9 else "train"
            town, county = TOWNS[i % len(TOWNS)]
            shown = (label + rotate) % len(classes)
            rows.append({
                "product_id": f"p{label}-{i}",
                "text": f"{words[i % 3].title()} {i}. Used {words[i % 3]}, collection only.",
                "category": classes[shown],
                "label": shown,
                "price": float(price * (1 + 0.2 * rng.standard_normal()) if i % 4 else price),
                "price_is_outlier": False,
                "town": town,
                "county": county,
                "split": split,
            })
    root.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "products.parquet", index=False)
    (root / "labels.json").write_text(json.dumps({"classes": classes, "label_to_index": {c: i for i, c in enumerate(classes)}}))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("price")
    params = load_params()
    clean = _clean_dir(root / "clean")
    train_price_estimator(clean, params, root / "price")
    train_text_baseline(clean, params, root / "right")  # predicts the seller's category
    train_text_baseline(_clean_dir(root / "rotated", rotate=1), params, root / "wrong")  # predicts another one
    return {"clean": clean, "price": root / "price", "right": root / "right", "wrong": root / "wrong"}


def test_price_is_scored_with_the_predicted_category_and_the_given_location(models: dict[str, Path]) -> None:
    scored = score_price(models["price"], models["clean"], models["wrong"])
    metrics = scored.metrics

    # what the service would answer for each test listing: the predicted category, the listing's town/county
    products = pd.read_parquet(models["clean"] / "products.parquet").set_index("product_id").loc[scored.ids]
    served_category = predict_categories(models["wrong"], products["text"].tolist())
    assert all(got != true for got, true in zip(served_category, products["category"]))  # the classifier is wrong
    served = pd.DataFrame({"text": products["text"].tolist(), "category": served_category,
                           "town": products["town"].tolist(), "county": products["county"].tolist()})
    estimator = load_sklearn_model(models["price"])
    expected = np.asarray(estimator.predict_price(served))
    truth = products["price"].to_numpy(dtype=float)
    np.testing.assert_allclose(scored.y_pred, expected)
    np.testing.assert_allclose(scored.y_true, truth)
    assert metrics["median_abs_error"] == pytest.approx(float(np.median(np.abs(truth - expected))))
    assert metrics == {**metrics, **{k: pytest.approx(v) for k, v in regression_metrics(truth, expected, estimator.median_price).items()}}
    assert metrics["category_accuracy"] == 0.0

    # the old number (seller's category) is kept beside it, and it is not the headline
    old = evaluate_baseline(models["price"], models["clean"], "test")["metrics"]
    assert metrics["median_abs_error_true_category"] == pytest.approx(old["median_abs_error"])
    assert metrics["r2_log_true_category"] == pytest.approx(old["r2_log"])
    assert metrics["median_abs_error"] > 2 * metrics["median_abs_error_true_category"]

    # a request without a location
    blank = np.asarray(estimator.predict_price(served.assign(town="", county="")))
    assert metrics["median_abs_error_no_location"] == pytest.approx(float(np.median(np.abs(truth - blank))))


def test_a_right_classifier_gives_the_true_category_numbers(models: dict[str, Path]) -> None:
    metrics = score_model("price", models["price"], models["clean"], category_model_dir=models["right"]).metrics
    assert metrics["category_accuracy"] == 1.0
    assert metrics["median_abs_error"] == pytest.approx(metrics["median_abs_error_true_category"])


def test_the_price_model_is_not_scored_without_its_category_classifier(models: dict[str, Path]) -> None:
    with pytest.raises(Exception, match="category"):
        score_model("price", models["price"], models["clean"])
