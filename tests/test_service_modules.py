"""Unit tests of the service's small modules (no server, no bundle): responses, location checks, queries."""

from __future__ import annotations

import numpy as np
import pytest

from service import responses
from service.engine import Query, _queries
from service.request_validation import RequestError, check_location

CLASSES = ["Appliances", "Home & Garden", "Music, Films, Books & Games"]
MODEL = {"kind": "text", "name": "marketplace-text-classifier", "version": "3"}
PRICE_MODEL = {"kind": "price", "name": "marketplace-price-estimator", "version": "2"}


def test_prediction_names_the_best_class_and_rounds() -> None:
    body = responses.prediction(CLASSES, np.array([0.2, 0.7000004, 0.0999996]), MODEL)
    assert body == {"category": "Home & Garden",
                    "probabilities": {"Appliances": 0.2, "Home & Garden": 0.7, "Music, Films, Books & Games": 0.1},
                    "model": MODEL}


def test_prediction_carries_the_price_only_with_a_price_model() -> None:
    probs = np.array([0.5, 0.3, 0.2])
    assert "price_estimate" not in responses.prediction(CLASSES, probs, MODEL, price=12.345)
    body = responses.prediction(CLASSES, probs, MODEL, price=12.345, price_model=PRICE_MODEL)
    assert body["price_estimate"] == 12.35 and body["price_model"] == PRICE_MODEL
    assert responses.prediction(CLASSES, probs, MODEL, price=None, price_model=PRICE_MODEL)["price_estimate"] is None


def test_listing_fills_the_result_from_the_bundle_listings() -> None:
    products = {"p1": {"product_id": "p1", "image_id": "i1", "product_name": "Oak table", "price": 40.0,
                       "location": "Leeds, West Yorkshire", "category": "Home & Garden"}}
    row = responses.listing({"product_id": "p1", "score": 0.9}, products, lambda image: f"/ui/thumbnails/{image}.jpg")
    assert row == {"product_id": "p1", "score": 0.9, "image_id": "i1", "product_name": "Oak table", "price": 40.0,
                   "location": "Leeds, West Yorkshire", "category": "Home & Garden",
                   "thumbnail_url": "/ui/thumbnails/i1.jpg"}
    unknown = responses.listing({"product_id": "p9"}, products, lambda image: None)
    assert unknown["product_name"] is None and unknown["thumbnail_url"] is None


def test_json_scalar() -> None:
    assert responses.json_scalar(float("nan")) is None
    assert responses.json_scalar(np.int64(3)) == 3 and type(responses.json_scalar(np.int64(3))) is int
    assert responses.json_scalar("x") == "x" and responses.json_scalar(None) is None


def test_text_truncated_note_only_when_cut() -> None:
    assert responses.text_truncated({"a": 1}, None) == {"a": 1}
    assert responses.text_truncated({"a": 1}, {"limit": 5})["text_truncated"] == {"limit": 5}


def test_check_location() -> None:
    assert check_location(None, "town", 200) is None
    assert check_location("   ", "town", 200) is None
    assert check_location(" Leeds ", "town", 200) == "Leeds"
    with pytest.raises(RequestError, match="'town' must be a string"):
        check_location(42, "town", 200)
    with pytest.raises(RequestError, match="'county' is 201 characters long"):
        check_location("x" * 201, "county", 200)


def test_queries_accept_pairs_and_full_queries() -> None:
    assert _queries([(None, "oak")]) == [Query(None, "oak", None, None)]
    full = Query(None, "oak", "Leeds", "West Yorkshire")
    assert _queries([full]) == [full]
