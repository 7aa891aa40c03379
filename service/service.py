"""BentoML service: category prediction, price estimate, embeddings and similar-listing search.

Run locally against a bundle directory (no model store needed)::

    MARKETPLACE_BUNDLE_DIR=artifacts/bundle bentoml serve service.service:MarketplaceSearch

Without MARKETPLACE_BUNDLE_DIR the bundle is the BentoML model `serve.bundle_model`
(params.yaml), which is also what `bentoml build` packs into the Bento.

Endpoints (POST, JSON or multipart/form-data; photos as the multipart file field `image`):
/predict, /embed, /search, /similar, /metadata; the search page is at /ui/; BentoML's /livez, /readyz,
/metrics and /docs.json stay. Bad requests get a 4xx `{"error": ..., "status": ...}`.

NB: no `from __future__ import annotations` here: BentoML infers the API schemas from the
real annotations.
"""

import asyncio
import functools
import logging
import os
import typing
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException, InvalidArgument
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import Field

from pipeline_steps.config import load_params
from service.engine import MarketplaceEngine, MicroBatcher, preflight_bundle
from service.request_validation import Limits, RequestError, check_text, decode_image, fit_text

logger = logging.getLogger("bentoml.marketplace")

BUNDLE_DIR_ENV = "MARKETPLACE_BUNDLE_DIR"
PARAMS_ENV = "MARKETPLACE_PARAMS"
STATIC_DIR = Path(__file__).resolve().parent / "static"
UI_PATH = "/ui"


def _serve_params() -> typing.Dict[str, typing.Any]:
    params = load_params(os.environ.get(PARAMS_ENV) or None)
    serve = params.get("serve") or {}
    if not isinstance(serve, dict):
        raise ValueError("params.yaml key 'serve' must be a mapping")
    return serve


def _harden_multipart_parsing() -> None:
    """Two BentoML 1.4.40 multipart behaviours that would answer a client's mistake with a 500.

    * A non-file multipart value of a file parameter is treated as a URL and fetched by the
      server (a 500 for anything that is not a reachable URL, and a request-forgery surface):
      here a photo must be uploaded as a file part -> 400.
    * Starlette refuses a malformed form or a text field over 1 MB with an HTTPException(400),
      and BentoML's json.loads of each text field can raise ValueError/RecursionError; its API
      wrapper turns both into a 500 -> passed on as a 4xx with the reason.
    """
    try:
        from _bentoml_impl.serde import MultipartSerde
        from starlette.datastructures import UploadFile
        from pydantic import ValidationError
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError:  # another BentoML layout: keep its behaviour
        return
    if getattr(MultipartSerde, "__marketplace_hardened__", False):
        return
    original_parse = MultipartSerde.parse_request

    async def parse_request(self: typing.Any, request: typing.Any, cls: typing.Any) -> typing.Any:
        try:
            return await original_parse(self, request, cls)
        except StarletteHTTPException as exc:
            if not 400 <= exc.status_code < 500:
                raise
            detail = str(exc.detail)
            if "maximum size" in detail:
                raise BentoMLException(
                    f"a multipart text field is too large ({detail}); 'text' may hold at most "
                    f"{LIMITS.max_text_chars:,} characters",
                    error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                ) from exc
            raise InvalidArgument(f"malformed multipart/form-data request: {detail}") from exc
        except ValidationError:
            raise  # BentoML answers these with a 400 listing the fields
        except (ValueError, TypeError, RecursionError) as exc:
            # e.g. a form field holding a 5,000-digit number or deeply nested JSON, which
            # BentoML's json.loads of every text field chokes on
            raise InvalidArgument(f"a multipart form field could not be parsed: {str(exc)[:200]}") from exc

    async def ensure_file(obj: typing.Any) -> typing.Any:
        if isinstance(obj, UploadFile):
            return obj
        raise InvalidArgument(
            "'image' must be uploaded as a file (a multipart/form-data part with a filename); "
            "text values and URLs are not accepted"
        )

    MultipartSerde.ensure_file = staticmethod(ensure_file)
    MultipartSerde.parse_request = parse_request
    MultipartSerde.__marketplace_hardened__ = True


SERVE = _serve_params()
LIMITS = Limits.from_params(SERVE)
_harden_multipart_parsing()
BUNDLE_MODEL = str(SERVE.get("bundle_model", "marketplace-bundle"))
SERVICE_NAME = str(SERVE.get("bento_name", "marketplace-search"))
BATCH_MAX_SIZE = int(SERVE.get("batch_max_size", 32))
BATCH_MAX_LATENCY_MS = float(SERVE.get("batch_max_latency_ms", 50))
TORCH_THREADS = SERVE.get("torch_threads", "auto")
if TORCH_THREADS != "auto" and (isinstance(TORCH_THREADS, bool) or not isinstance(TORCH_THREADS, int)
                                or TORCH_THREADS < 1):
    raise ValueError(f"params.yaml key 'serve.torch_threads' must be 'auto' or a positive integer, got {TORCH_THREADS!r}")

if os.environ.get(BUNDLE_DIR_ENV):
    # Fail `bentoml serve` itself (not just each worker, which BentoML would restart forever)
    # when the bundle directory is unusable or an index does not match its model version.
    preflight_bundle(os.environ[BUNDLE_DIR_ENV])

# The search page and thumbnails: a FastAPI app mounted into the BentoML server at /ui.
ui_app = FastAPI(title="Marketplace search page", docs_url=None, redoc_url=None, openapi_url=None)
ui_app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

# `Path = None`, not Optional[Path]: BentoML 1.4.40 cannot build a schema for Optional[Path]
# ("unhashable type: FileSchema"), and a PIL.Image parameter would be decoded by BentoML
# before our checks (a non-image upload would then be a 500).
OptionalImage = typing.Annotated[
    Path,
    Field(description="A photo of the listing (JPEG, PNG, WEBP, GIF, BMP or TIFF) as a multipart file part; "
                      f"at most {LIMITS.max_image_bytes:,} bytes and {LIMITS.max_image_pixels:,} pixels."),
]
# Limits are documented in the schema (json_schema_extra) and enforced by request_validation,
# whose 4xx messages say what to fix.
OptionalText = typing.Annotated[
    typing.Optional[str],
    Field(description="Listing text (name, description); photo and/or text is required. "
                      "Multipart text fields are JSON-encoded strings.",
          json_schema_extra={"maxLength": LIMITS.max_text_chars}),
]
SearchK = typing.Annotated[
    int,
    Field(description=f"Number of results, 1 to {LIMITS.max_k}.",
          json_schema_extra={"minimum": 1, "maximum": LIMITS.max_k}),
]
SearchCategory = typing.Annotated[
    typing.Optional[str],
    Field(description="Only return listings of this category (case-insensitive; see /metadata 'categories')."),
]
ProductId = typing.Annotated[
    typing.Optional[str],
    Field(description="The product_id of a listing in the index (as returned by /search).",
          json_schema_extra={"maxLength": 100}),
]
JSONDict = typing.Dict[str, typing.Any]


@bentoml.service(
    name=SERVICE_NAME,
    workers=1,
    traffic={"timeout": 120, "max_concurrency": 256},
)
@bentoml.asgi_app(ui_app, path=UI_PATH)
class MarketplaceSearch:
    """Marketplace listings: predict a category (and a price), embed, and find similar listings."""

    # Referenced here so `bentoml build` packs the bundle into the Bento. Skipped when a
    # bundle directory is given (local development, tests), so no model store is needed.
    if not os.environ.get(BUNDLE_DIR_ENV):
        bundle_model = bentoml.models.BentoModel(f"{BUNDLE_MODEL}:latest")

    def __init__(self) -> None:
        if TORCH_THREADS != "auto":
            import torch

            torch.set_num_threads(int(TORCH_THREADS))
        bundle_dir = os.environ.get(BUNDLE_DIR_ENV)
        if bundle_dir:
            path, source = Path(bundle_dir), f"{BUNDLE_DIR_ENV}={bundle_dir}"
        else:
            stored = self.bundle_model
            path, source = Path(stored.path), f"BentoML model {stored.tag}"
        try:
            self.engine = MarketplaceEngine(path, LIMITS, thumbnail_prefix=f"{UI_PATH}/thumbnails/")
        except Exception as exc:
            logger.error("marketplace service cannot start from %s: %s", source, exc)
            raise RuntimeError(f"marketplace service cannot start from {source}: {exc}") from exc
        self.engine.warm_up()
        self.source = source
        # One model thread: batches run one after another, each using serve.torch_threads cores.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="marketplace-model")
        self.batchers: typing.Dict[typing.Tuple[str, str], MicroBatcher] = {}
        for kind in self.engine.classifiers:
            for op, fn in (("predict", self.engine.predict_batch), ("embed", self.engine.embed_batch),
                           ("rank", self.engine.predict_embed_batch)):
                self.batchers[(op, kind)] = MicroBatcher(
                    functools.partial(fn, kind),
                    max_batch_size=BATCH_MAX_SIZE,
                    max_latency_ms=BATCH_MAX_LATENCY_MS,
                    executor=self.executor,
                    name=f"{op}-{kind}",
                )
        logger.info("marketplace service ready (%s)", source)

    # ------------------------------------------------------------------ helpers

    async def _inputs(
        self, image: typing.Optional[Path], text: typing.Optional[str]
    ) -> typing.Tuple[typing.Optional[Image.Image], typing.Optional[str], str, typing.Optional[JSONDict]]:
        """Validate outside the batch: text first (cheap), then the photo in a worker thread.

        The last item reports text cut to serve.model_text_chars (None when it was not cut).
        """
        clean_text, cut = fit_text(check_text(text, LIMITS), LIMITS)
        photo = None
        if image is not None:
            photo = await asyncio.to_thread(decode_image, image, LIMITS)
        kind = self.engine.kind_for(photo is not None, clean_text is not None)
        return photo, clean_text, kind, cut

    @staticmethod
    def _noted(result: JSONDict, cut: typing.Optional[JSONDict]) -> JSONDict:
        if cut is not None:
            result["text_truncated"] = cut
        return result

    @staticmethod
    def _refuse(ctx: bentoml.Context, error: RequestError) -> JSONDict:
        ctx.response.status_code = error.status
        return error.to_dict()

    # ------------------------------------------------------------------ APIs

    @bentoml.api
    async def predict(
        self,
        image: OptionalImage = None,
        text: OptionalText = None,
        *,
        ctx: bentoml.Context,
    ) -> JSONDict:
        """Predict the category of a listing from a photo and/or its text; with text, also estimate its price (GBP).

        Photo only -> image model, text only -> text model, both -> multimodal model.
        Returns {"category", "probabilities": {category: p}, "model": {"kind","name","version"}}
        plus "price_estimate" (GBP) and "price_model" when text is given.
        """
        try:
            photo, clean_text, kind, cut = await self._inputs(image, text)
        except RequestError as error:
            return self._refuse(ctx, error)
        result = await self.batchers[("predict", kind)].submit((photo, clean_text))
        return self._noted(self.engine.format_prediction(kind, result, with_price=clean_text is not None), cut)

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
            photo, clean_text, kind, cut = await self._inputs(image, text)
        except RequestError as error:
            return self._refuse(ctx, error)
        vector = await self.batchers[("embed", kind)].submit((photo, clean_text))
        return self._noted(self.engine.format_embedding(kind, vector), cut)

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
            photo, clean_text, kind, cut = await self._inputs(image, text)
            k, category = self.engine.check_search(kind, k, category)
        except RequestError as error:
            return self._refuse(ctx, error)
        proba, vector = await self.batchers[("rank", kind)].submit((photo, clean_text))
        return self._noted(
            await asyncio.to_thread(self.engine.search_vector, kind, vector, k, category, proba, clean_text), cut
        )

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
        info["batching"] = {
            f"{op}-{kind}": batcher.stats() for (op, kind), batcher in self.batchers.items()
        }
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


@ui_app.get("/index.html", include_in_schema=False)
def _index_alias() -> RedirectResponse:
    return RedirectResponse(url=f"{UI_PATH}/")
