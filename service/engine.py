"""The serving engine: a loaded bundle answering predict / embed / search / similar, with no HTTP in sight.

`MarketplaceEngine(bundle_dir)` loads the bundle (service/bundle.py) and runs the models on
batches of queries; service/responses.py shapes the answers. The BentoML service
(service/service.py) puts a `service.batching.MicroBatcher` in front of the batch functions;
benchmarks/load_test.py uses the engine directly for the in-process comparison.

The price estimate (`predict_batch`) is the price model's answer for the query's text, the
**predicted** category and the location the caller gave (town, county; '' when not given):
the evaluate stage scores the price model the same way.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from service import responses
from service.bundle import (  # noqa: F401  (re-exported: tests and benchmarks import them from here)
    CLASSIFIER_KINDS,
    PRICE_KIND,
    BundleLoadError,
    ModelRef,
    load_bundle,
    preflight_bundle,
)
from service.request_validation import (
    UNPROCESSABLE,
    Limits,
    RequestError,
    check_category,
    check_k,
    choose_kind,
)


class Query(NamedTuple):
    """One request's inputs to a model call; a plain (image, text) pair is read as one too."""

    image: Image.Image | None = None
    text: str | None = None
    town: str | None = None
    county: str | None = None


def _queries(items: Sequence[Any]) -> list[Query]:
    return [item if isinstance(item, Query) else Query(*item) for item in items]


class MarketplaceEngine:
    """One service replica's models, indexes and listings, and what it answers with them."""

    def __init__(
        self,
        bundle_dir: str | Path,
        limits: Limits | None = None,
        *,
        thumbnail_prefix: str = "/ui/thumbnails/",
        use_gpu_index: bool | str = False,
    ) -> None:
        self.limits = limits or Limits()
        self.thumbnail_prefix = thumbnail_prefix
        self.bundle = bundle = load_bundle(bundle_dir, use_gpu_index)
        self.bundle_dir = bundle.directory
        self.info = bundle.info
        self.models = bundle.models
        self.classifiers = bundle.classifiers
        self.price_model = bundle.price_model
        self.classes = bundle.classes
        self.indexes = bundle.indexes
        self.rankings = bundle.rankings
        self.products = bundle.products
        self.categories = bundle.categories
        self._category_masks: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, limits: Limits | None = None, **kwargs: Any) -> MarketplaceEngine:
        return cls(bundle_dir, limits, **kwargs)

    # ----------------------------------------------------------------- request-level helpers

    def kind_for(self, has_image: bool, has_text: bool) -> str:
        kind = choose_kind(has_image, has_text)
        if kind not in self.classifiers:
            have = ", ".join(sorted(self.classifiers))
            raise RequestError(
                f"this deployment has no {kind} model (it serves: {have}); "
                + ("send text instead" if kind == "image" else "send a photo instead" if kind == "text" else
                   "send only a photo or only text"),
                UNPROCESSABLE,
            )
        return kind

    def check_search(self, kind: str, k: Any, category: Any) -> tuple[int, str | None]:
        k = check_k(k, self.limits)
        category = check_category(category, self.categories)
        if kind not in self.indexes:
            raise RequestError(f"this deployment has no {kind} index (it has: {', '.join(sorted(self.indexes)) or 'none'})",
                               UNPROCESSABLE)
        return k, category

    def model_info(self, kind: str) -> dict[str, str]:
        return self.models[kind].to_dict()

    def index_info(self, kind: str) -> dict[str, Any]:
        return responses.index_info(kind, self.indexes[kind])

    # ----------------------------------------------------------------- batch functions (run by the batcher)

    def predict_batch(self, kind: str, items: Sequence[Query | tuple[Any, ...]]) -> list[dict[str, Any]]:
        """Class probabilities (+ price estimate where a text is given) for a batch of one kind."""
        queries = _queries(items)
        probs = np.asarray(self.classifiers[kind].predict_proba([q.image for q in queries], [q.text for q in queries]),
                           dtype=np.float64)
        if probs.shape != (len(queries), len(self.classes)):
            raise RuntimeError(f"{kind} classifier returned shape {probs.shape} for {len(queries)} items")
        prices: list[float | None] = [None] * len(queries)
        with_text = [i for i, q in enumerate(queries) if q.text]
        if self.price_model is not None and with_text:
            frame = pd.DataFrame(
                {
                    "text": [queries[i].text for i in with_text],
                    "category": [self.classes[int(probs[i].argmax())] for i in with_text],
                    "town": [queries[i].town or "" for i in with_text],
                    "county": [queries[i].county or "" for i in with_text],
                }
            )
            estimates = np.asarray(self.price_model.predict_price(frame), dtype=np.float64)
            for i, value in zip(with_text, estimates, strict=True):
                prices[i] = float(value) if math.isfinite(value) else None
        return [{"probs": probs[i], "price": prices[i]} for i in range(len(queries))]

    def predict_embed_batch(self, kind: str, items: Sequence[Query | tuple[Any, ...]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(class probabilities, embedding) per item from one forward pass: what a ranked search needs."""
        queries = _queries(items)
        probs, vectors = self.classifiers[kind].predict_and_embed([q.image for q in queries], [q.text for q in queries])
        probs, vectors = np.asarray(probs, dtype=np.float64), np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(queries) or probs.shape[0] != len(queries):
            raise RuntimeError(f"{kind} classifier returned shapes {probs.shape}, {vectors.shape} for {len(queries)} items")
        return [(probs[i], vectors[i]) for i in range(len(queries))]

    def embed_batch(self, kind: str, items: Sequence[Query | tuple[Any, ...]]) -> list[np.ndarray]:
        queries = _queries(items)
        vectors = np.asarray(self.classifiers[kind].embed([q.image for q in queries], [q.text for q in queries]),
                             dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(queries):
            raise RuntimeError(f"{kind} classifier returned embeddings of shape {vectors.shape} for {len(queries)} items")
        return list(vectors)

    # ----------------------------------------------------------------- responses

    def format_prediction(self, kind: str, result: Mapping[str, Any], with_price: bool) -> dict[str, Any]:
        priced = with_price and self.price_model is not None
        return responses.prediction(
            self.classes, result["probs"], self.model_info(kind),
            price=result.get("price") if priced else None,
            price_model=self.model_info(PRICE_KIND) if priced else None,
        )

    def format_embedding(self, kind: str, vector: np.ndarray) -> dict[str, Any]:
        return responses.embedding(vector, self.model_info(kind))

    def thumbnail_url(self, image_id: str | None) -> str | None:
        if image_id is None or image_id not in self.bundle.thumbnails:
            return None
        return f"{self.thumbnail_prefix}{image_id}.jpg"

    def thumbnail_path(self, image_id: str) -> Path | None:
        """The thumbnail file for an image id, or None (ids outside the bundle never reach the disk)."""
        if image_id not in self.bundle.thumbnails or self.bundle.thumbnails_dir is None:
            return None
        return self.bundle.thumbnails_dir / f"{image_id}.jpg"

    def _result(self, hit: Mapping[str, Any]) -> dict[str, Any]:
        return responses.listing(hit, self.products, self.thumbnail_url)

    # ----------------------------------------------------------------- search

    def _category_mask(self, kind: str, category: str) -> np.ndarray:
        key = (kind, category)
        mask = self._category_masks.get(key)
        if mask is None:
            index = self.indexes[kind]
            pids = index.ids["product_id"].astype(str)
            mask = pids.map(lambda p: (self.products.get(p) or {}).get("category") == category).to_numpy(dtype=bool)
            with self._lock:
                self._category_masks[key] = mask
        return mask

    def search_vector(
        self, kind: str, vector: np.ndarray, k: int, category: str | None,
        proba: np.ndarray | None = None, text: str | None = None,
    ) -> dict[str, Any]:
        """Ranked search (hybrid + category re-ranking, service/ranking.py) when the index has its ranking
        files; the plain cosine order otherwise (and `proba` None: no category term)."""
        ranking = self.rankings.get(kind)
        if ranking is not None and ranking.ranker is not None:
            mask = None if category is None else self._category_mask(kind, category)
            hits = ranking.search(vector, proba, text, k, mask)
            described = ranking.describe() | ({} if proba is not None else {"category_weight": 0.0})
            return responses.search([self._result(h) for h in hits], self.model_info(kind), self.index_info(kind),
                                    described, category, k)
        filter_fn: Callable[[pd.DataFrame], Any] | None = None
        if category is not None:
            mask = self._category_mask(kind, category)
            filter_fn = lambda _ids: mask  # noqa: E731
        hits = self.indexes[kind].search(
            np.asarray(vector, dtype=np.float32).reshape(1, -1), k, filter_fn=filter_fn, unique_products=(kind == "image"),
        )[0]
        results = [
            self._result({"product_id": str(hit.product_id),
                          "image_id": None if hit.image_id is None else str(hit.image_id),
                          "score": round(float(hit.score), 6)})
            for hit in hits
        ]
        results.sort(key=lambda r: r["score"], reverse=True)
        described = self.rankings[kind].describe() if kind in self.rankings else {"mode": "dense-only"}
        return responses.search(results, self.model_info(kind), self.index_info(kind), described, category, k)

    def similar(self, product_id: Any, k: Any = 10, category: Any = None) -> dict[str, Any]:
        """The k listings most like an indexed listing (its text and photos together), same re-ranking."""
        from service import ranking as service_ranking

        pid = service_ranking.check_product_id(product_id)
        kind = service_ranking.similar_kind(self.rankings)
        if kind is None:
            raise RequestError("this deployment has no text or multimodal index to find similar listings in", UNPROCESSABLE)
        k, category = self.check_search(kind, k, category)
        ranking = self.rankings[kind]
        row = ranking.row_of.get(pid)
        if row is None:
            raise service_ranking.not_found(pid)
        spec, why_not = service_ranking.fused_similar(self.rankings)
        if spec is not None and pid in self.rankings["text"].row_of:
            masks = {kind: None if category is None else self._category_mask(kind, category) for kind in ("text", kind)}
            hits = service_ranking.similar_fused(self.rankings["text"], ranking, spec, pid, k, masks)
            described = {"mode": "similar: text + multimodal", **spec.to_dict(), **spec.config.to_dict(),
                         "text_index": self.index_info("text")}
        else:
            proba = None if ranking.ranker is None else ranking.ranker.probs[row]
            mask = None if category is None else self._category_mask(kind, category)
            hits = ranking.search(ranking.vector_of(row), proba, None, k, mask, exclude=pid, query_row=row)
            described = ranking.describe() | ({"similar_fusion": why_not} if why_not else {})
        return {
            "product_id": pid,
            "query": self._result({"product_id": pid}),
            **responses.search([self._result(h) for h in hits], self.model_info(kind), self.index_info(kind),
                               described, category, k),
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "bundle": {
                "built_at": self.info.get("built_at"),
                "format_version": self.info.get("format_version"),
                "listings": self.info.get("listings"),
            },
            "built_at": self.info.get("built_at"),
            "models": {kind: ref.to_dict() for kind, ref in self.models.items()},
            "indexes": {kind: self.index_info(kind) for kind in self.indexes},
            "ranking": {kind: ranking.describe() for kind, ranking in self.rankings.items()},
            "categories": list(self.categories),
            "limits": {
                "max_k": self.limits.max_k,
                "max_image_bytes": self.limits.max_image_bytes,
                "max_image_pixels": self.limits.max_image_pixels,
                "max_text_chars": self.limits.max_text_chars,
            },
            "runtime": self.runtime_info(),
        }

    def runtime_info(self) -> dict[str, Any]:
        import torch

        devices = sorted({str(getattr(c, "device", "cpu")) for c in self.classifiers.values()})
        return {"torch_threads": int(torch.get_num_threads()), "devices": devices,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}

    # ----------------------------------------------------------------- synchronous API (no HTTP, no batching)

    def predict(self, image: Image.Image | None = None, text: str | None = None,
                town: str | None = None, county: str | None = None) -> dict[str, Any]:
        kind = self.kind_for(image is not None, bool(text))
        result = self.predict_batch(kind, [Query(image, text, town, county)])[0]
        return self.format_prediction(kind, result, with_price=bool(text))

    def embed(self, image: Image.Image | None = None, text: str | None = None) -> dict[str, Any]:
        kind = self.kind_for(image is not None, bool(text))
        return self.format_embedding(kind, self.embed_batch(kind, [Query(image, text)])[0])

    def search(
        self, image: Image.Image | None = None, text: str | None = None, k: int = 10, category: str | None = None
    ) -> dict[str, Any]:
        kind = self.kind_for(image is not None, bool(text))
        k, category = self.check_search(kind, k, category)
        proba, vector = self.predict_embed_batch(kind, [Query(image, text)])[0]
        return self.search_vector(kind, vector, k, category, proba=proba, text=text)

    def warm_up(self) -> None:
        """One tiny forward pass per model so the first real request does not pay lazy initialisation."""
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        text = "warm up"
        for kind in self.classifiers:
            item = {"image": Query(image), "text": Query(None, text), "multimodal": Query(image, text)}[kind]
            self.predict_batch(kind, [item])
            self.embed_batch(kind, [item])
