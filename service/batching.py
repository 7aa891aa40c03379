"""Adaptive micro-batching of single requests into model calls (the service's batcher).

Why this and not BentoML's own `@bentoml.api(batchable=True)` (issue 10, measured, not guessed):
BentoML batches a batchable API only when it is called through the server's HTTP layer, and such an
API takes one list argument, so the public /predict, /embed and /search (one query, several
parameters, multipart or JSON) cannot be batchable themselves. BentoML's way is model composition:
the model behind a batchable API in a second service reached through `bentoml.depends` (another
worker process, pickled requests over a local socket). benchmarks/batchable_variant.py builds
exactly that for the text search and benchmarks/batching_compare.py serves both variants,
alternating, 3 rounds, text /search only (benchmarks/results/batching_compare.json):

    python benchmarks/batching_compare.py --bundle <tiny bundle> --rounds 3 --requests-1 300 \
        --requests-16 1500 --out benchmarks/results/batching_compare.json

    2026-12-02 01:33-01:44 UTC, the shared 2-core box under load from other sessions' test runs
    (load average 7-10: noisy; compare within a round), the tests' tiny bundle (real frozen MiniLM
    text tower, 30 listings), serve.torch_threads 1; p50 / p99 in ms, medians of the 3 rounds:

    batching                         clients   p50     p99     req/s   failed   mean batch
    micro-batcher (this module)         1       66.2   130.0    12.9     0         1.0
    micro-batcher (this module)        16      277.8  1026.8    53.7     0         4.2
    BentoML batchable + depends         1       69.5   115.8    14.1     0         1.0
    BentoML batchable + depends        16      317.1  1323.8    36.7     1         3.7

At one client the two are level; at 16 clients BentoML's composition is slower (p50 +14%, p99 +29%,
a third fewer requests/s: every query pays a second HTTP hop and pickling, and the batches are
smaller), it needed a retry of its internal call on ~160 of 1,500 requests per run (pooled
connections closed by the model service: bentoml/BentoML#4971; without the retry a smoke run
answered 25 of 200 requests with a 500) and one request hung until the client's 60 s timeout.
So the micro-batcher stays, here, until BentoML's batching measures as well (re-run the command).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any


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
