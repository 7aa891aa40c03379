"""BentoML service: category prediction, price estimate, embeddings and similar-listing search.

Run locally against a bundle directory (no model store needed)::

    MARKETPLACE_BUNDLE_DIR=artifacts/bundle bentoml serve service.service:MarketplaceSearch

Without MARKETPLACE_BUNDLE_DIR the bundle is the BentoML model `serve.bundle_model`
(params.yaml), which is also what `bentoml build` packs into the Bento.

Endpoints (POST, JSON or multipart/form-data; photos as the multipart file field `image`):
/predict, /embed, /search, /similar, /metadata; the search page is at /ui/; BentoML's /livez, /readyz,
/metrics and /docs.json stay. Bad requests get a 4xx `{"error": ..., "status": ...}`.

The rooms: service/settings.py (params), service/bundle.py (loading), service/engine.py (inference
and search), service/responses.py (response bodies), service/batching.py (the micro-batcher and
why it is not BentoML's `batchable`), service/multipart.py (a BentoML work-around),
service/request_validation.py (4xx checks), service/schemas.py (parameter types), service/ui.py.

NB: no `from __future__ import annotations` here: BentoML infers the API schemas from the
real annotations.
"""

import asyncio
import functools
import logging
import os
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
from fastapi.responses import FileResponse, JSONResponse

from service import multipart, responses
from service.batching import MicroBatcher
from service.bundle import preflight_bundle
from service.engine import MarketplaceEngine, Query
from service.request_validation import RequestError, check_location, check_text, decode_image, fit_text
from service.schemas import (
    JSONDict, OptionalCounty, OptionalImage, OptionalText, OptionalTown, ProductId, SearchCategory, SearchK,
)
from service.settings import (
    BATCH_MAX_LATENCY_MS, BATCH_MAX_SIZE, BUNDLE_DIR_ENV, BUNDLE_MODEL, LIMITS, MAX_LOCATION_CHARS,
    SERVICE_NAME, TORCH_THREADS, UI_PATH,
)
from service.ui import STATIC_DIR, ui_app

logger = logging.getLogger("bentoml.marketplace")

multipart.apply(LIMITS.max_text_chars)
if os.environ.get(BUNDLE_DIR_ENV):
    # Fail `bentoml serve` itself (not just each worker, which BentoML would restart forever)
    # when the bundle directory is unusable or an index does not match its model version.
    preflight_bundle(os.environ[BUNDLE_DIR_ENV])


@bentoml.service(name=SERVICE_NAME, workers=1, traffic={"timeout": 120, "max_concurrency": 256})
@bentoml.asgi_app(ui_app, path=UI_PATH)
class MarketplaceSearch:
    """Marketplace listings: predict a category (and a price), embed, and find similar listings."""

    # Referenced here so `bentoml build` packs the bundle into the Bento. Skipped when a
    # bundle directory is given (local development, tests), so no model store is needed.
    if not os.environ.get(BUNDLE_DIR_ENV):
        bundle_model = bentoml.models.BentoModel(f"{BUNDLE_MODEL}:latest")

    def __init__(self) -> None:
        if TORCH_THREADS is not None:
            import torch

            torch.set_num_threads(TORCH_THREADS)
        bundle_dir = os.environ.get(BUNDLE_DIR_ENV)
        if bundle_dir:
            path, self.source = Path(bundle_dir), f"{BUNDLE_DIR_ENV}={bundle_dir}"
        else:
            path, self.source = Path(self.bundle_model.path), f"BentoML model {self.bundle_model.tag}"
        try:
            self.engine = MarketplaceEngine(path, LIMITS, thumbnail_prefix=f"{UI_PATH}/thumbnails/")
        except Exception as exc:
            logger.error("marketplace service cannot start from %s: %s", self.source, exc)
            raise RuntimeError(f"marketplace service cannot start from {self.source}: {exc}") from exc
        self.engine.warm_up()
        # One model thread: batches run one after another, each using serve.torch_threads cores.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="marketplace-model")
        self.batchers = {
            (op, kind): MicroBatcher(functools.partial(fn, kind), max_batch_size=BATCH_MAX_SIZE,
                                     max_latency_ms=BATCH_MAX_LATENCY_MS, executor=executor, name=f"{op}-{kind}")
            for kind in self.engine.classifiers
            for op, fn in (("predict", self.engine.predict_batch), ("embed", self.engine.embed_batch),
                           ("rank", self.engine.predict_embed_batch))
        }
        logger.info("marketplace service ready (%s)", self.source)

    async def _query(self, image: typing.Optional[Path], text: typing.Optional[str]) -> typing.Tuple[Query, str, typing.Any]:
        """Validate outside the batch: text first (cheap), then the photo in a worker thread.

        Returns the query, the model kind that answers it, and the text_truncated note (None: not cut).
        """
        clean_text, cut = fit_text(check_text(text, LIMITS), LIMITS)
        photo = None if image is None else await asyncio.to_thread(decode_image, image, LIMITS)
        return Query(photo, clean_text), self.engine.kind_for(photo is not None, clean_text is not None), cut

    @staticmethod
    def _refuse(ctx: bentoml.Context, error: RequestError) -> JSONDict:
        ctx.response.status_code = error.status
        return error.to_dict()

    @bentoml.api
    async def predict(
        self,
        image: OptionalImage = None,
        text: OptionalText = None,
        town: OptionalTown = None,
        county: OptionalCounty = None,
        *,
        ctx: bentoml.Context,
    ) -> JSONDict:
        """Predict the category of a listing from a photo and/or its text; with text, also estimate its price (GBP).

        Photo only -> image model, text only -> text model, both -> multimodal model.
        Returns {"category", "probabilities": {category: p}, "model": {"kind","name","version"}}
        plus "price_estimate" (GBP) and "price_model" when text is given: the price model's estimate
        for the text, the predicted category and the given town/county (optional; none given: no location).
        """
        try:
            query, kind, cut = await self._query(image, text)
            query = query._replace(town=check_location(town, "town", MAX_LOCATION_CHARS),
                                   county=check_location(county, "county", MAX_LOCATION_CHARS))
        except RequestError as error:
            return self._refuse(ctx, error)
        result = await self.batchers[("predict", kind)].submit(query)
        return responses.text_truncated(self.engine.format_prediction(kind, result, with_price=query.text is not None), cut)

    @bentoml.api
    async def embed(
        self,
        image: OptionalImage = None,
        text: OptionalText = None,
        *,
        ctx: bentoml.Context,
    ) -> JSONDict:
        """The model's embedding of a photo and/or text: {"embedding": [...], "dim", "model"} (not normalised)."""
        try:
            query, kind, cut = await self._query(image, text)
        except RequestError as error:
            return self._refuse(ctx, error)
        vector = await self.batchers[("embed", kind)].submit(query)
        return responses.text_truncated(self.engine.format_embedding(kind, vector), cut)

    @bentoml.api
    async def search(
        self,
        image: OptionalImage = None,
        text: OptionalText = None,
        k: SearchK = 10,
        category: SearchCategory = None,
        *,
        ctx: bentoml.Context,
    ) -> JSONDict:
        """The k listings most similar to a photo and/or text, best first (cosine score).

        Photo only -> image index (one result per product), text only -> text index, both ->
        multimodal index. `k` in 1..serve.max_k; `category` (optional) keeps only that category.
        Ranked by the index's ranking (params.yaml index.ranking, fitted on val): dense and BM25 candidates
        fused, plus the category term; per result "score" (final, scaled to [0, 1]) = "retrieval_score" +
        "category_score",
        with the raw "dense_score" (cosine) and "lexical_score" (BM25, null when not a BM25 candidate).
        Returns {"results": [{"product_id","image_id","score","retrieval_score","category_score",
        "dense_score","lexical_score","product_name","price","location","category","thumbnail_url"}],
        "model", "index", "ranking", "category", "k"}; an index packaged without its ranking files is
        served dense-only, "ranking": {"mode": "dense-only", "reason"}.
        """
        try:
            query, kind, cut = await self._query(image, text)
            k, category = self.engine.check_search(kind, k, category)
        except RequestError as error:
            return self._refuse(ctx, error)
        proba, vector = await self.batchers[("rank", kind)].submit(query)
        found = await asyncio.to_thread(self.engine.search_vector, kind, vector, k, category, proba, query.text)
        return responses.text_truncated(found, cut)

    @bentoml.api
    async def similar(
        self,
        product_id: ProductId = None,
        k: SearchK = 10,
        category: SearchCategory = None,
        *,
        ctx: bentoml.Context,
    ) -> JSONDict:
        """More like this listing: the k listings most similar to an indexed listing (by product_id), using its
        text and photos together (multimodal index, else text) with the same hybrid ranking and category
        re-ranking as /search; the listing itself is excluded. Unknown id -> 404, malformed id or k -> 400.
        Returns {"product_id", "query": the listing, "results": [... as /search ...], "model", "index",
        "ranking", "category", "k"}.
        """
        try:
            return await asyncio.to_thread(self.engine.similar, product_id, k, category)
        except RequestError as error:
            return self._refuse(ctx, error)

    @bentoml.api
    async def metadata(self) -> JSONDict:
        """Model names and versions, index sizes, categories, limits and the bundle's build time."""
        info = self.engine.metadata()
        info["source"] = self.source
        info["batching"] = {f"{op}-{kind}": batcher.stats() for (op, kind), batcher in self.batchers.items()}
        return info

    # ------------------------------------------------------------------ search page (mounted at /ui)

    @ui_app.get("/", include_in_schema=False)
    def search_page(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @ui_app.get("/thumbnails/{image_id}.jpg", response_class=FileResponse)
    def thumbnail(self, image_id: str):
        """A listing photo's thumbnail (JPEG) by image id; 404 for ids not in the bundle."""
        path = self.engine.thumbnail_path(image_id)
        if path is None:
            return JSONResponse({"error": f"no thumbnail for image id {image_id[:100]!r}", "status": 404},
                                status_code=404)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})
