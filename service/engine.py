"""The serving engine: a loaded bundle answering predict / embed / search, with no HTTP in sight.

`MarketplaceEngine.from_bundle(dir)` loads what `pipeline_steps.packaging.assemble_bundle`
wrote (docs/ARCHITECTURE.md, "Bundle"): the classifiers, the price estimator, the
indexes (each checked against the model version it was built from) and the listings.
Nothing is trained or built here.

The BentoML service (service/service.py) wraps it; benchmarks/load_test.py uses it
directly for the in-process comparison. `MicroBatcher` is the adaptive batching the
service puts in front of the models.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline_steps.errors import PipelineError
from pipeline_steps.io_utils import read_json
from service.request_validation import (
    UNPROCESSABLE,
    Limits,
    RequestError,
    check_category,
    check_k,
    choose_kind,
)

logger = logging.getLogger(__name__)

CLASSIFIER_KINDS = ("image", "text", "multimodal")
PRICE_KIND = "price"


class BundleLoadError(PipelineError):
    """The bundle cannot be served (missing files, or an index built from another model version)."""


@dataclass(frozen=True)
class ModelRef:
    kind: str
    name: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "version": self.version}


def _clean(value: Any) -> Any:
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


def preflight_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Cheap start-up check (JSON only, no model loaded): is this a bundle whose indexes match its models?

    Returns bundle.json. Raises BundleLoadError with what to fix. `MarketplaceEngine` runs
    the same checks (and more) while loading.
    """
    bundle_dir = Path(bundle_dir)
    info_path = bundle_dir / "bundle.json"
    if not bundle_dir.is_dir():
        raise BundleLoadError(f"bundle directory {bundle_dir} does not exist")
    if not info_path.is_file():
        raise BundleLoadError(
            f"{bundle_dir} is not a serving bundle (no bundle.json): point MARKETPLACE_BUNDLE_DIR at a "
            "directory written by pipeline_steps.packaging.assemble_bundle, or save one as the BentoML model"
        )
    info = read_json(info_path)
    models_meta = info.get("models") or {}
    for kind, meta in (info.get("indexes") or {}).items():
        model = models_meta.get(kind)
        if model is None:
            raise BundleLoadError(
                f"the bundle has a {kind!r} index but no {kind!r} model to embed queries with; "
                "an index is only served with the model version it was built from"
            )
        index_json = bundle_dir / str(meta.get("dir") or f"index/{kind}") / "index.json"
        if not index_json.is_file():
            raise BundleLoadError(f"bundle index {kind!r} has no index.json: {index_json}")
        on_disk = read_json(index_json)
        built_from = (str(on_disk.get("model_name")), str(on_disk.get("model_version")))
        expected = (str(model.get("name")), str(model.get("version")))
        if built_from != expected:
            raise BundleLoadError(
                f"refusing to serve the {kind!r} index: it was built from model {built_from[0]} version "
                f"{built_from[1]}, but the bundle's {kind} model is {expected[0]} version {expected[1]}. "
                "Rebuild the index for this model version (flows/index.py) and re-package the bundle."
            )
    return info


class MarketplaceEngine:
    """Everything one service replica holds in memory."""

    def __init__(
        self,
        bundle_dir: str | Path,
        limits: Limits | None = None,
        *,
        thumbnail_prefix: str = "/ui/thumbnails/",
        use_gpu_index: bool | str = False,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.limits = limits or Limits()
        self.thumbnail_prefix = thumbnail_prefix
        info_path = self.bundle_dir / "bundle.json"
        self.info: dict[str, Any] = preflight_bundle(self.bundle_dir)
        models_meta: Mapping[str, Mapping[str, Any]] = self.info.get("models") or {}

        self.models: dict[str, ModelRef] = {}
        self.classifiers: dict[str, Any] = {}
        for kind in CLASSIFIER_KINDS:
            if kind in models_meta:
                self.classifiers[kind] = self._load_classifier(kind, models_meta[kind])
        self.price_model = None
        if PRICE_KIND in models_meta:
            self.price_model = self._load_price(models_meta[PRICE_KIND])
        if not self.classifiers:
            raise BundleLoadError(f"{info_path} lists no classifier (image, text or multimodal)")

        self.classes = self._common_classes()
        self.indexes: dict[str, Any] = {}
        for kind, meta in (self.info.get("indexes") or {}).items():
            self.indexes[kind] = self._load_index(kind, meta, use_gpu_index)

        self._load_listings()
        self._category_masks: dict[tuple[str, str], np.ndarray] = {}
        from service import ranking as service_ranking

        self.rankings = service_ranking.load_rankings(
            self.indexes, lambda kind: self.bundle_dir / str((self.info.get("indexes") or {}).get(kind, {}).get("dir") or f"index/{kind}"),
            self.products, self.classes,
        )
        self._lock = threading.Lock()
        logger.info(
            "bundle %s loaded: classifiers %s, price %s, indexes %s, %d products",
            self.bundle_dir,
            {k: f"{m.name}@{m.version}" for k, m in self.models.items()},
            self.price_model is not None,
            {k: idx.size for k, idx in self.indexes.items()},
            len(self.products),
        )

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, limits: Limits | None = None, **kwargs: Any) -> MarketplaceEngine:
        return cls(bundle_dir, limits, **kwargs)

    # ----------------------------------------------------------------- loading

    def _ref(self, kind: str, meta: Mapping[str, Any]) -> ModelRef:
        name, version = meta.get("name"), meta.get("version")
        if name is None or version is None:
            raise BundleLoadError(f"bundle.json: models.{kind} needs 'name' and 'version'")
        return ModelRef(kind, str(name), str(version))

    def _model_dir(self, kind: str, meta: Mapping[str, Any]) -> Path:
        path = self.bundle_dir / str(meta.get("dir") or f"models/{kind}")
        if not path.is_dir():
            raise BundleLoadError(f"bundle model directory for {kind!r} is missing: {path}")
        return path

    def _load_classifier(self, kind: str, meta: Mapping[str, Any]) -> Any:
        from pipeline_steps.inference import load_classifier

        ref = self._ref(kind, meta)
        classifier = load_classifier(self._model_dir(kind, meta))
        loaded_kind = getattr(classifier, "kind", kind)
        if loaded_kind != kind:
            raise BundleLoadError(f"bundle models/{kind} holds a {loaded_kind!r} classifier, expected {kind!r}")
        self.models[kind] = ref
        return classifier

    def _load_price(self, meta: Mapping[str, Any]) -> Any:
        from pipeline_steps.baselines import load_sklearn_model

        ref = self._ref(PRICE_KIND, meta)
        model = load_sklearn_model(self._model_dir(PRICE_KIND, meta))
        if not hasattr(model, "predict_price"):
            raise BundleLoadError(f"bundle models/price is not a price estimator ({type(model).__name__})")
        self.models[PRICE_KIND] = ref
        return model

    def _common_classes(self) -> list[str]:
        classes: list[str] | None = None
        for kind, classifier in self.classifiers.items():
            these = [str(c) for c in classifier.classes]
            if classes is None:
                classes = these
            elif these != classes:
                raise BundleLoadError(
                    f"the {kind} classifier predicts classes {these}, the others {classes}: "
                    "package champions trained on the same labels.json"
                )
        return classes or []

    def _load_index(self, kind: str, meta: Mapping[str, Any], use_gpu: bool | str) -> Any:
        from pipeline_steps.index import SimilarityIndex

        model = self.models.get(kind)
        if model is None:
            raise BundleLoadError(
                f"the bundle has a {kind!r} index but no {kind!r} model to embed queries with; "
                "an index is only served with the model version it was built from"
            )
        directory = self.bundle_dir / str(meta.get("dir") or f"index/{kind}")
        index_json = directory / "index.json"
        if not index_json.is_file():
            raise BundleLoadError(f"bundle index {kind!r} has no index.json: {directory}")
        on_disk = read_json(index_json)
        built_from = (str(on_disk.get("model_name")), str(on_disk.get("model_version")))
        if built_from != (model.name, model.version):
            raise BundleLoadError(
                f"refusing to serve the {kind!r} index: it was built from model {built_from[0]} version "
                f"{built_from[1]}, but the bundle's {kind} model is {model.name} version {model.version}. "
                "Rebuild the index for this model version (flows/index.py) and re-package the bundle."
            )
        index = SimilarityIndex.load(directory, expected_model=(model.name, model.version), use_gpu=use_gpu)
        dim = getattr(self.classifiers[kind], "embedding_dim", None)
        if dim is not None and int(dim) != int(index.dim):
            raise BundleLoadError(
                f"the {kind!r} index holds {index.dim}-d vectors but the {kind} model embeds {dim}-d: "
                "rebuild the index for this model"
            )
        return index

    def _load_listings(self) -> None:
        path = self.bundle_dir / "listings.parquet"
        if not path.is_file():
            raise BundleLoadError(f"bundle has no listings.parquet: {path}")
        listings = pd.read_parquet(path)
        listings["product_id"] = listings["product_id"].astype(str)
        listings["image_id"] = listings["image_id"].astype("string")
        self.products: dict[str, dict[str, Any]] = {}
        for row in listings.itertuples(index=False):
            pid = row.product_id
            image_id = None if pd.isna(row.image_id) else str(row.image_id)
            entry = self.products.get(pid)
            if entry is None:
                self.products[pid] = {
                    "product_id": pid,
                    "image_id": image_id,
                    "product_name": _clean(row.product_name),
                    "price": None if _clean(row.price) is None else float(row.price),
                    "location": _clean(row.location),
                    "category": _clean(row.category),
                }
            elif entry["image_id"] is None and image_id is not None:
                entry["image_id"] = image_id
        self.thumbnails_dir = self.bundle_dir / "thumbnails"
        self._thumbnails = (
            {p.stem for p in self.thumbnails_dir.glob("*.jpg")} if self.thumbnails_dir.is_dir() else set()
        )
        categories = self.classes or list(self.info.get("categories") or [])
        if not categories:
            categories = sorted({p["category"] for p in self.products.values() if p["category"]})
        self.categories: list[str] = list(categories)

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
        meta = self.indexes[kind].metadata
        return {
            "kind": kind,
            "size": int(self.indexes[kind].size),
            "factory": meta.factory,
            "model_name": meta.model_name,
            "model_version": meta.model_version,
            "built_at": meta.built_at,
        }

    # ----------------------------------------------------------------- batch functions (run by the batcher)

    def predict_batch(self, kind: str, items: Sequence[tuple[Image.Image | None, str | None]]) -> list[dict[str, Any]]:
        """Class probabilities (+ price estimate where a text is given) for a batch of one kind."""
        images = [img for img, _ in items]
        texts = [txt for _, txt in items]
        probs = np.asarray(self.classifiers[kind].predict_proba(images, texts), dtype=np.float64)
        if probs.shape != (len(items), len(self.classes)):
            raise RuntimeError(f"{kind} classifier returned shape {probs.shape} for {len(items)} items")
        prices: list[float | None] = [None] * len(items)
        with_text = [i for i, txt in enumerate(texts) if txt]
        if self.price_model is not None and with_text:
            frame = pd.DataFrame(
                {
                    "text": [texts[i] for i in with_text],
                    "category": [self.classes[int(probs[i].argmax())] for i in with_text],
                    "town": [""] * len(with_text),
                    "county": [""] * len(with_text),
                }
            )
            estimates = np.asarray(self.price_model.predict_price(frame), dtype=np.float64)
            for i, value in zip(with_text, estimates, strict=True):
                prices[i] = float(value) if math.isfinite(value) else None
        return [{"probs": probs[i], "price": prices[i]} for i in range(len(items))]

    def predict_embed_batch(
        self, kind: str, items: Sequence[tuple[Image.Image | None, str | None]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(class probabilities, embedding) per item from one forward pass: what a ranked search needs."""
        images = [img for img, _ in items]
        texts = [txt for _, txt in items]
        probs, vectors = self.classifiers[kind].predict_and_embed(images, texts)
        probs, vectors = np.asarray(probs, dtype=np.float64), np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(items) or probs.shape[0] != len(items):
            raise RuntimeError(f"{kind} classifier returned shapes {probs.shape}, {vectors.shape} for {len(items)} items")
        return [(probs[i], vectors[i]) for i in range(len(items))]

    def embed_batch(self, kind: str, items: Sequence[tuple[Image.Image | None, str | None]]) -> list[np.ndarray]:
        images = [img for img, _ in items]
        texts = [txt for _, txt in items]
        vectors = np.asarray(self.classifiers[kind].embed(images, texts), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(items):
            raise RuntimeError(f"{kind} classifier returned embeddings of shape {vectors.shape} for {len(items)} items")
        return list(vectors)

    # ----------------------------------------------------------------- formatting

    def format_prediction(self, kind: str, result: Mapping[str, Any], with_price: bool) -> dict[str, Any]:
        probs = result["probs"]
        best = int(np.argmax(probs))
        response: dict[str, Any] = {
            "category": self.classes[best],
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs, strict=True)},
            "model": self.model_info(kind),
        }
        if with_price and self.price_model is not None:
            price = result.get("price")
            response["price_estimate"] = None if price is None else round(float(price), 2)
            response["price_model"] = self.model_info(PRICE_KIND)
        return response

    def format_embedding(self, kind: str, vector: np.ndarray) -> dict[str, Any]:
        return {"embedding": [float(x) for x in vector], "dim": int(len(vector)), "model": self.model_info(kind)}

    def thumbnail_url(self, image_id: str | None) -> str | None:
        if image_id is None or image_id not in self._thumbnails:
            return None
        return f"{self.thumbnail_prefix}{image_id}.jpg"

    def thumbnail_path(self, image_id: str) -> Path | None:
        """The thumbnail file for an image id, or None (ids outside the bundle never reach the disk)."""
        if image_id not in self._thumbnails:
            return None
        return self.thumbnails_dir / f"{image_id}.jpg"

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

    def _result(self, hit: Mapping[str, Any]) -> dict[str, Any]:
        pid = hit["product_id"]
        product = self.products.get(pid, {"product_id": pid})
        image_id = hit.get("image_id") or product.get("image_id")
        return {
            **hit,
            "product_id": pid,
            "image_id": image_id,
            "product_name": product.get("product_name"),
            "price": product.get("price"),
            "location": product.get("location"),
            "category": product.get("category"),
            "thumbnail_url": self.thumbnail_url(image_id),
        }

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
            return {
                "results": [self._result(h) for h in hits],
                "model": self.model_info(kind),
                "index": self.index_info(kind),
                "ranking": ranking.describe() | ({} if proba is not None else {"category_weight": 0.0}),
                "category": category,
                "k": k,
            }
        index = self.indexes[kind]
        filter_fn: Callable[[pd.DataFrame], Any] | None = None
        if category is not None:
            mask = self._category_mask(kind, category)
            filter_fn = lambda _ids: mask  # noqa: E731
        hits = index.search(
            np.asarray(vector, dtype=np.float32).reshape(1, -1),
            k,
            filter_fn=filter_fn,
            unique_products=(kind == "image"),
        )[0]
        results = []
        for hit in hits:
            pid = str(hit.product_id)
            product = self.products.get(pid, {"product_id": pid})
            image_id = None if hit.image_id is None else str(hit.image_id)
            image_id = image_id or product.get("image_id")
            results.append(
                {
                    "product_id": pid,
                    "image_id": image_id,
                    "score": round(float(hit.score), 6),
                    "product_name": product.get("product_name"),
                    "price": product.get("price"),
                    "location": product.get("location"),
                    "category": product.get("category"),
                    "thumbnail_url": self.thumbnail_url(image_id),
                }
            )
        results.sort(key=lambda r: r["score"], reverse=True)
        return {
            "results": results,
            "model": self.model_info(kind),
            "index": self.index_info(kind),
            "ranking": self.rankings[kind].describe() if kind in self.rankings else {"mode": "dense-only"},
            "category": category,
            "k": k,
        }

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
        proba = None if ranking.ranker is None else ranking.ranker.probs[row]
        mask = None if category is None else self._category_mask(kind, category)
        hits = ranking.search(ranking.vector_of(row), proba, None, k, mask, exclude=pid, query_row=row)
        return {
            "product_id": pid,
            "query": self._result({"product_id": pid}),
            "results": [self._result(h) for h in hits],
            "model": self.model_info(kind),
            "index": self.index_info(kind),
            "ranking": ranking.describe(),
            "category": category,
            "k": k,
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

    def predict(self, image: Image.Image | None = None, text: str | None = None) -> dict[str, Any]:
        kind = self.kind_for(image is not None, bool(text))
        result = self.predict_batch(kind, [(image, text)])[0]
        return self.format_prediction(kind, result, with_price=bool(text))

    def embed(self, image: Image.Image | None = None, text: str | None = None) -> dict[str, Any]:
        kind = self.kind_for(image is not None, bool(text))
        return self.format_embedding(kind, self.embed_batch(kind, [(image, text)])[0])

    def search(
        self, image: Image.Image | None = None, text: str | None = None, k: int = 10, category: str | None = None
    ) -> dict[str, Any]:
        kind = self.kind_for(image is not None, bool(text))
        k, category = self.check_search(kind, k, category)
        proba, vector = self.predict_embed_batch(kind, [(image, text)])[0]
        return self.search_vector(kind, vector, k, category, proba=proba, text=text)

    def warm_up(self) -> None:
        """One tiny forward pass per model so the first real request does not pay lazy initialisation."""
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        text = "warm up"
        for kind in self.classifiers:
            item = {"image": (image, None), "text": (None, text), "multimodal": (image, text)}[kind]
            self.predict_batch(kind, [item])
            self.embed_batch(kind, [item])


# --------------------------------------------------------------------------- adaptive batching


class MicroBatcher:
    """Adaptive micro-batching of single requests into model calls.

    `await submit(item)` queues one item; a worker task hands queued items to
    `fn(list_of_items) -> list_of_results` (run in `executor`, so the event loop
    never blocks) as one batch of at most `max_batch_size`. A batch starts as
    soon as the model is free: an idle server adds no latency. While a batch
    runs, new requests queue up and form the next batch, so the batch size
    follows the load. Under load (the previous batch held more than one item)
    the worker also waits up to min(max_latency_ms, half the last batch's run
    time) for stragglers before starting a batch that is not yet full.
    Errors raised by `fn` are delivered to every request of that batch.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch_size: int = 32,
        max_latency_ms: float = 50.0,
        executor: Executor | None = None,
        name: str = "batch",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.fn = fn
        self.max_batch_size = int(max_batch_size)
        self.max_latency_s = max(0.0, float(max_latency_ms) / 1000.0)
        self.executor = executor
        self.name = name
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_batch_size = 0
        self._last_batch_s = 0.0
        self.batches = 0
        self.items = 0
        self.max_seen_batch = 0

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name=f"microbatcher-{self.name}")

    async def submit(self, item: Any) -> Any:
        self._ensure_worker()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                if len(self._pending) < self.max_batch_size and self._last_batch_size > 1:
                    window = min(self.max_latency_s, self._last_batch_s / 2)
                    deadline = loop.time() + window
                    while len(self._pending) < self.max_batch_size and loop.time() < deadline:
                        await asyncio.sleep(min(0.002, max(0.0, deadline - loop.time())))
                batch = self._pending[: self.max_batch_size]
                del self._pending[: self.max_batch_size]
                batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
                if not batch:
                    continue
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"{self.name}: {len(results)} results for a batch of {len(batch)}")
                except Exception as exc:  # delivered to the callers, who decide the status code
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    for (_, fut), result in zip(batch, results, strict=True):
                        if not fut.done():
                            fut.set_result(result)
                self._last_batch_s = time.perf_counter() - started
                self._last_batch_size = len(batch)
                self.batches += 1
                self.items += len(batch)
                self.max_seen_batch = max(self.max_seen_batch, len(batch))

    def stats(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0,
            "max_batch_size_seen": self.max_seen_batch,
        }
