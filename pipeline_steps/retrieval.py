"""Measuring an index: is it useful (precision@k), faithful (recall vs exact) and fast (latency)?

* ``precision_at_k`` answers "do similar listings share the query's root
  category?" — the only relevance label the marketplace data has. The query's
  own product is excluded, otherwise every listing would trivially find itself
  (and, in the image index, its sibling photos).
* ``recall_at_k_vs_exact`` answers "how much does the approximate index (IVF,
  HNSW) lose against exhaustive search?" — independent of labels.
* ``query_latency`` answers "how fast, one query at a time (the service) and
  in batches (offline evaluation)?".
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np

from pipeline_steps.index import SimilarityIndex

AnyIndex = SimilarityIndex | faiss.Index


def precision_at_k(
    index: SimilarityIndex,
    query_vectors: np.ndarray,
    query_product_ids: Sequence[Hashable],
    query_labels: Sequence[Any] | np.ndarray,
    label_of_row: Sequence[Any] | np.ndarray | str,
    ks: Iterable[int] = (1, 5, 10),
    unique_products: bool = False,
) -> dict[str, float]:
    """Mean "same label" precision@k over the queries, each query's own product excluded.

    ``label_of_row[r]`` is the label (root category) of index row ``r``; a
    string names a column of ``index.ids`` instead. For each query the top
    ``max(ks)`` hits are fetched once (with its own ``product_id`` excluded)
    and ``precision@k = (# of the first k hits with the query's label) / k``.
    When fewer than ``k`` hits exist the missing ones count as misses (the
    denominator stays ``k``), so a tiny index cannot look better than it is.
    ``unique_products`` counts each product once (for the image index).

    Returns ``{"precision@1": ..., "precision@5": ..., ...}``.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    n = len(query_product_ids)
    if len(query_labels) != n or len(query_vectors) != n:
        raise ValueError(
            f"{len(query_vectors)} query vectors, {n} query product ids and {len(query_labels)} labels: lengths must match"
        )
    if n == 0:
        return {f"precision@{k}": float("nan") for k in ks}
    row_labels = index.ids[label_of_row].to_numpy() if isinstance(label_of_row, str) else np.asarray(label_of_row)
    if len(row_labels) != index.size:
        raise ValueError(f"label_of_row has {len(row_labels)} entries for an index of {index.size} rows")

    hits = index.search(
        query_vectors, max(ks), exclude_product_ids=list(query_product_ids), unique_products=unique_products
    )
    labels = np.asarray(query_labels)
    totals = dict.fromkeys(ks, 0.0)
    for qi, query_hits in enumerate(hits):
        matches = np.array([row_labels[h.row] == labels[qi] for h in query_hits], dtype=bool)
        for k in ks:
            totals[k] += float(matches[:k].sum()) / k
    return {f"precision@{k}": totals[k] / n for k in ks}


def _search_rows(index: AnyIndex, queries: np.ndarray, k: int) -> np.ndarray:
    if isinstance(index, SimilarityIndex):
        return index.search_raw(queries, k)[1]
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at_k_vs_exact(approx_index: AnyIndex, exact_index: AnyIndex, queries: np.ndarray, k: int = 10) -> float:
    """Mean share of the exact top-``k`` rows that the approximate index also returns in its top ``k``.

    Both indexes must hold the same vectors in the same row order (e.g. the
    same embeddings in an ``IVF…`` and a ``Flat`` index). A ``SimilarityIndex``
    normalises the queries itself; a bare ``faiss.Index`` gets them as given.
    """
    k = int(k)
    exact = _search_rows(exact_index, queries, k)
    approx = _search_rows(approx_index, queries, k)
    return recall_from_rows(approx, exact)


def recall_from_rows(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Recall of ``approx_rows`` against ``exact_rows`` (both ``(nq, k)``, -1 = no result)."""
    if len(exact_rows) == 0:
        return float("nan")
    total = 0.0
    for a, e in zip(approx_rows, exact_rows, strict=True):
        truth = set(int(r) for r in e if r >= 0)
        if truth:
            total += len(truth.intersection(int(r) for r in a if r >= 0)) / len(truth)
        else:
            total += 1.0
    return total / len(exact_rows)


@contextmanager
def limited_threads(n_threads: int | None) -> Iterator[None]:
    """Temporarily cap FAISS's OpenMP threads and NumPy's BLAS threads (``None``: leave them alone).

    Why: one query is too little work to split, and on a busy machine OpenMP
    threads wait on each other — on the shared 2-core box a single Flat query
    over 100k vectors took ~64 ms with 2 threads and ~7.5 ms with 1. A service
    answering one request per call should run FAISS with one thread.
    """
    if n_threads is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n_threads))
    try:
        if threadpool_limits is None:
            yield
        else:
            with threadpool_limits(limits=int(n_threads)):
                yield
    finally:
        faiss.omp_set_num_threads(previous)


def query_latency(
    index: AnyIndex,
    queries: np.ndarray,
    k: int = 10,
    warmup: int = 5,
    max_single: int | None = None,
    single_threads: int | None = 1,
) -> dict[str, float]:
    """Latency of one-query-at-a-time search and throughput of one batched search.

    Returns ``p50_ms``/``p99_ms`` (per single query), ``qps_single``
    (queries / total time, one at a time — what a service answering one
    request at a time sees) and ``qps_batch`` (all queries in one call — what
    offline evaluation sees; FAISS parallelises over queries). A
    ``SimilarityIndex`` is timed through ``search_raw`` (normalisation + FAISS),
    without building ``Hit`` objects. ``max_single`` caps how many queries are
    timed one by one (slow indexes at 1M vectors). Single queries run with
    ``single_threads`` threads (default 1, see ``limited_threads``; ``None``
    keeps the current setting); the batch uses all threads.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or len(q) == 0:
        raise ValueError(f"queries must be a non-empty 2-D array, got shape {q.shape}")
    k = int(k)
    for i in range(min(warmup, len(q))):
        _search_rows(index, q[i : i + 1], k)

    single = q if max_single is None else q[: max(1, int(max_single))]
    times = np.empty(len(single))
    with limited_threads(single_threads):
        for i in range(len(single)):
            start = time.perf_counter()
            _search_rows(index, single[i : i + 1], k)
            times[i] = time.perf_counter() - start

    start = time.perf_counter()
    _search_rows(index, q, k)
    batch_s = time.perf_counter() - start
    return {
        "p50_ms": float(np.percentile(times, 50) * 1000.0),
        "p99_ms": float(np.percentile(times, 99) * 1000.0),
        "qps_single": float(len(single) / times.sum()) if times.sum() > 0 else float("inf"),
        "qps_batch": float(len(q) / batch_s) if batch_s > 0 else float("inf"),
        "n_single": float(len(single)),
        "n_batch": float(len(q)),
    }
