"""The text search served with BentoML's own adaptive batching, to measure it against service.batching.

Not the production service: a benchmark-only pair of BentoML services with the same engine
(service.engine.MarketplaceEngine), request checks and ranking as service/service.py, where
only the batching differs. BentoML batches a `@bentoml.api(batchable=True)` method only when it
is called through the server's HTTP layer, and a batchable API takes one list argument, so the
public /search (one query, several parameters) cannot itself be batchable; BentoML's pattern is
model composition: a front service whose /search calls a model service's batchable API through
`bentoml.depends` (a second worker process, pickled requests over a local socket), where
BentoML's CorkDispatcher forms the batches.

    MARKETPLACE_BUNDLE_DIR=B bentoml serve benchmarks.batchable_variant:BatchableSearch

`max_latency_ms` is BentoML's latency budget (requests predicted to exceed it are refused with
503), not a wait window like serve.batch_max_latency_ms: the model service keeps BentoML's
default budget (60 s) so no request is refused, and serve.batch_max_size as the batch cap.
benchmarks/batching_compare.py serves both variants and runs benchmarks/load_test.py on each.

The front retries a model call once when the pooled connection to the model service was closed
under it (`aiohttp.ServerDisconnectedError`: BentoML's internal client keeps connections alive
15 s, uvicorn closes them after 5 s; bentoml/BentoML#4971, fix proposed in PR #5698). Without the
retry, a first smoke run lost 25 of 200 requests at 16 clients to 500s; /metadata counts the retries.
"""

import asyncio
import os
import typing

import aiohttp
import bentoml
import numpy as np

from service.engine import MarketplaceEngine, Query
from service.request_validation import RequestError, check_text, fit_text
from service.settings import BATCH_MAX_SIZE, BUNDLE_DIR_ENV, LIMITS, TORCH_THREADS

JSONDict = typing.Dict[str, typing.Any]


def _engine() -> MarketplaceEngine:
    if TORCH_THREADS is not None:
        import torch

        torch.set_num_threads(TORCH_THREADS)
    return MarketplaceEngine(os.environ[BUNDLE_DIR_ENV], LIMITS)


@bentoml.service(name="marketplace-batchable-model", workers=1, traffic={"timeout": 120})
class BatchedTextModel:
    """The text model behind a batchable API: (class probabilities | embedding) per text."""

    def __init__(self) -> None:
        self.engine = _engine()
        self.engine.warm_up()
        self.batches = self.items = self.max_seen = 0

    @bentoml.api(batchable=True, max_batch_size=BATCH_MAX_SIZE)
    def rank_text(self, texts: typing.List[str]) -> np.ndarray:
        pairs = self.engine.predict_embed_batch("text", [Query(None, text) for text in texts])
        self.batches += 1
        self.items += len(texts)
        self.max_seen = max(self.max_seen, len(texts))
        return np.stack([np.concatenate([proba, vector.astype(np.float64)]) for proba, vector in pairs])

    @bentoml.api
    def stats(self) -> JSONDict:
        return {"batches": self.batches, "items": self.items, "max_batch_size_seen": self.max_seen,
                "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0}


@bentoml.service(name="marketplace-batchable-search", workers=1, traffic={"timeout": 120, "max_concurrency": 256})
class BatchableSearch:
    """/search (text) and /metadata of service/service.py, the model call batched by BentoML."""

    model = bentoml.depends(BatchedTextModel)

    def __init__(self) -> None:
        self.engine = _engine()  # indexes, listings, ranking (its models stay idle here)
        self.n_classes = len(self.engine.classes)
        self.retries = 0

    @bentoml.api
    async def search(self, text: typing.Optional[str] = None, k: int = 10, category: typing.Optional[str] = None,
                     *, ctx: bentoml.Context) -> JSONDict:
        try:
            clean_text, _ = fit_text(check_text(text, LIMITS), LIMITS)
            kind = self.engine.kind_for(False, clean_text is not None)
            k, category = self.engine.check_search(kind, k, category)
        except RequestError as error:
            ctx.response.status_code = error.status
            return error.to_dict()
        try:
            rows = await self.model.to_async.rank_text([clean_text])
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError):
            self.retries += 1  # a pooled connection the model service had closed: once more
            rows = await self.model.to_async.rank_text([clean_text])
        row = rows[0]
        proba, vector = row[: self.n_classes], np.asarray(row[self.n_classes:], dtype=np.float32)
        return await asyncio.to_thread(self.engine.search_vector, kind, vector, k, category, proba, clean_text)

    @bentoml.api
    async def metadata(self) -> JSONDict:
        info = self.engine.metadata()
        info["batching"] = {"rank-text": {**await self.model.to_async.stats(), "retries": self.retries}}
        return info
