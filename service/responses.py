"""Response bodies of the service: plain dicts built from model outputs and the bundle's listings.

No model, no HTTP: each function takes what the engine computed and returns the JSON the API
documents (service/service.py docstrings, README "Similarity index and the service").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd


def json_scalar(value: Any) -> Any:
    """JSON-safe scalar: NaN/NA -> None, numpy scalars -> Python."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):
        return value.item()
    return value


def prediction(
    classes: Sequence[str], probs: np.ndarray, model: Mapping[str, str],
    price: float | None = None, price_model: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """{"category", "probabilities", "model"} (+ "price_estimate", "price_model" when a price model answered)."""
    best = int(np.argmax(probs))
    response: dict[str, Any] = {
        "category": classes[best],
        "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
        "model": dict(model),
    }
    if price_model is not None:
        response["price_estimate"] = None if price is None else round(float(price), 2)
        response["price_model"] = dict(price_model)
    return response


def embedding(vector: np.ndarray, model: Mapping[str, str]) -> dict[str, Any]:
    return {"embedding": [float(x) for x in vector], "dim": int(len(vector)), "model": dict(model)}


def listing(hit: Mapping[str, Any], products: Mapping[str, Mapping[str, Any]],
            thumbnail_url: Callable[[str | None], str | None]) -> dict[str, Any]:
    """One search result: the ranker's scores plus the listing's name, price, location, category, thumbnail."""
    pid = str(hit["product_id"])
    product = products.get(pid, {"product_id": pid})
    image_id = hit.get("image_id") or product.get("image_id")
    return {
        **hit,
        "product_id": pid,
        "image_id": image_id,
        "product_name": product.get("product_name"),
        "price": product.get("price"),
        "location": product.get("location"),
        "category": product.get("category"),
        "thumbnail_url": thumbnail_url(image_id),
    }


def search(results: list[dict[str, Any]], model: Mapping[str, str], index: Mapping[str, Any],
           ranking: Mapping[str, Any], category: str | None, k: int) -> dict[str, Any]:
    return {
        "results": results,
        "model": dict(model),
        "index": dict(index),
        "ranking": dict(ranking),
        "category": category,
        "k": k,
    }


def index_info(kind: str, index: Any) -> dict[str, Any]:
    meta = index.metadata
    return {
        "kind": kind,
        "size": int(index.size),
        "factory": meta.factory,
        "model_name": meta.model_name,
        "model_version": meta.model_version,
        "built_at": meta.built_at,
    }


def text_truncated(result: dict[str, Any], cut: Mapping[str, Any] | None) -> dict[str, Any]:
    """The response with its `text_truncated` note when the text was cut (service.request_validation.fit_text)."""
    if cut is not None:
        result["text_truncated"] = dict(cut)
    return result
