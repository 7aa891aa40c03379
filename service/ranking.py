"""The service's ranking: hybrid lexical + dense candidates, category-aware re-ranking, "more like this".

`MarketplaceEngine` (service/engine.py) holds one `IndexRanking` per index; it is built from the
``ranking/`` folder the index stage wrote next to the index (pipeline_steps/ranking.py). An index
packaged without it (a bundle built before the ranking existed) is served dense-only: the
service starts, ranks by cosine as before, and says so in `/metadata` ("ranking": {kind: {"mode":
"dense-only", "reason": ...}}) and in every search response's "ranking".
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_steps.ranking import MissingRanking, Ranker, RankingConfig, make_candidates, rank
from service.request_validation import RequestError

logger = logging.getLogger(__name__)

NOT_FOUND = 404
MAX_PRODUCT_ID_CHARS = 100
_PRODUCT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
DENSE_ONLY = RankingConfig("dense", 0.0, 0.0, 1, 60, "no ranking files")


class IndexRanking:
    """One index's ranker (or the reason it has none) and its product lookups."""

    def __init__(self, kind: str, index: Any, index_dir: Path, products: Mapping[str, Mapping[str, Any]],
                 classes: list[str]) -> None:
        self.kind = kind
        self.index = index
        self.pids = index.ids["product_id"].astype(str).to_numpy()
        self.row_of: dict[str, int] = {}
        for row, pid in enumerate(self.pids):
            self.row_of.setdefault(pid, row)
        self.ranker: Ranker | None = None
        self.reason: str | None = None
        try:
            self.ranker = Ranker.load(index_dir, index.metadata.to_dict(), index.size)
        except MissingRanking as exc:
            self.reason = str(exc)
            logger.warning("%s index served dense-only: %s", kind, exc)
        class_names = (self.ranker.classes if self.ranker and self.ranker.classes else classes)
        class_index = {c: i for i, c in enumerate(class_names)}
        self.label_of = {pid: class_index.get(str(p.get("category")), -1) for pid, p in products.items()}
        self._reconstructable: bool | None = None

    def describe(self) -> dict[str, Any]:
        if self.ranker is None:
            return {"mode": "dense-only", "reason": self.reason}
        return self.ranker.describe()

    def vector_of(self, row: int) -> np.ndarray:
        """The stored vector of an index row (a Flat/HNSW index reconstructs directly; IVF after a direct map)."""
        faiss_index = self.index.cpu_index()
        try:
            return np.asarray(faiss_index.reconstruct(int(row)), dtype=np.float32)
        except RuntimeError:
            import faiss

            faiss.extract_index_ivf(faiss_index).make_direct_map()
            return np.asarray(faiss_index.reconstruct(int(row)), dtype=np.float32)

    def candidates(self, vector: np.ndarray, proba: np.ndarray | None, text: str | None, query_row: int | None,
                   k: int, mask: np.ndarray | None, exclude: str | None) -> tuple[Any, RankingConfig, dict[str, str | None]]:
        cfg = self.ranker.config if self.ranker is not None else DENSE_ONLY
        n = max(cfg.n_candidates, k)
        hits = self.index.search(
            np.asarray(vector, dtype=np.float32).reshape(1, -1), n,
            exclude_product_ids=None if exclude is None else [exclude],
            filter_fn=None if mask is None else (lambda _ids: mask),
            unique_products=self.kind == "image",
        )[0]
        image_of = {str(h.product_id): (None if h.image_id is None else str(h.image_id)) for h in hits}
        lex_keys = lex_scores = None
        lexical = self.ranker.lexical if self.ranker is not None else None
        if lexical is not None and cfg.fusion != "dense" and (text or query_row is not None):
            queries = lexical.doc_queries([query_row]) if query_row is not None else lexical.query_matrix([text])
            exclude_rows = [[self.row_of[exclude]]] if exclude is not None and exclude in self.row_of else None
            rows, lex_scores = lexical.top(queries, n, allowed=mask, exclude_rows=exclude_rows)[0]
            lex_keys = self.pids[rows].tolist()
        cands = make_candidates([str(h.product_id) for h in hits], [h.score for h in hits], lex_keys, lex_scores,
                                self.label_of, proba if self.ranker is not None else None)
        return cands, cfg, image_of

    def search(self, vector: np.ndarray, proba: np.ndarray | None, text: str | None, k: int,
               mask: np.ndarray | None, exclude: str | None = None, query_row: int | None = None) -> list[dict[str, Any]]:
        """The k best results: product id, image id, and the score parts (final, retrieval, category term)."""
        cands, cfg, image_of = self.candidates(vector, proba, text, query_row, k, mask, exclude)
        if proba is None:
            cfg = dataclasses.replace(cfg, category_weight=0.0)
        order, retrieval, category, final = rank(cands, cfg)
        # scaled by the largest possible final score, so "score" stays in [0, 1] (like a cosine) and
        # still equals retrieval_score + category_score
        scale = 1.0 / (1.0 + cfg.category_weight + cfg.neighbour_weight)
        retrieval, category, final = retrieval * scale, category * scale, final * scale
        out = []
        for i in order[:k]:
            pid = str(cands.keys[i])
            out.append({
                "product_id": pid,
                "image_id": image_of.get(pid),
                "score": round(float(final[i]), 6),
                "retrieval_score": round(float(retrieval[i]), 6),
                "category_score": round(float(category[i]), 6),
                "dense_score": None if np.isnan(cands.dense[i]) else round(float(cands.dense[i]), 6),
                "lexical_score": None if np.isnan(cands.lexical[i]) else round(float(cands.lexical[i]), 6),
            })
        return out


def check_product_id(value: Any) -> str:
    """A product id as sent by a client: a string of at most 100 id characters, else a 400 naming it."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RequestError("'product_id' is required: the id of a listing in the index (see /search results)")
    if not isinstance(value, str):
        raise RequestError(f"'product_id' must be a string, got {type(value).__name__} {str(value)[:100]!r}")
    value = value.strip()
    if len(value) > MAX_PRODUCT_ID_CHARS or not _PRODUCT_ID.fullmatch(value):
        raise RequestError(
            f"malformed product_id {value[:100]!r}: expected at most {MAX_PRODUCT_ID_CHARS} letters, digits, '.', '_', ':' or '-'"
        )
    return value


def load_rankings(indexes: Mapping[str, Any], index_dir_of: Callable[[str], Path],
                  products: Mapping[str, Mapping[str, Any]], classes: list[str]) -> dict[str, IndexRanking]:
    # One FAISS (OpenMP) thread: a request searches one query; on a busy 2-core box a single query with
    # two OpenMP threads is several times slower (pipeline_steps/retrieval.py, limited_threads).
    import faiss

    faiss.omp_set_num_threads(1)
    return {kind: IndexRanking(kind, index, index_dir_of(kind), products, classes) for kind, index in indexes.items()}


def similar_kind(rankings: Mapping[str, IndexRanking]) -> str | None:
    """"More like this listing" uses the listing's text and photos together: the multimodal index, else text."""
    for kind in ("multimodal", "text"):
        if kind in rankings:
            return kind
    return None


def not_found(product_id: str) -> RequestError:
    return RequestError(f"product_id {product_id[:100]!r} is not in the index: use an id returned by /search", NOT_FOUND)

