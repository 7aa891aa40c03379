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

from pipeline_steps.ranking import MissingRanking, Ranker, RankingConfig, SimilarConfig, fuse_dense, make_candidates, rank
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

    def dense_list(self, vector: np.ndarray, n: int, mask: np.ndarray | None,
                   exclude: str | None) -> tuple[list[str], list[float], dict[str, str | None]]:
        """The index's n nearest listings (product ids, cosines, the photo that matched for the image index)."""
        hits = self.index.search(
            np.asarray(vector, dtype=np.float32).reshape(1, -1), n,
            exclude_product_ids=None if exclude is None else [exclude],
            filter_fn=None if mask is None else (lambda _ids: mask),
            unique_products=self.kind == "image",
        )[0]
        image_of = {str(h.product_id): (None if h.image_id is None else str(h.image_id)) for h in hits}
        return [str(h.product_id) for h in hits], [h.score for h in hits], image_of

    def lexical_list(self, cfg: RankingConfig, text: str | None, query_row: int | None, n: int,
                     mask: np.ndarray | None, exclude: str | None) -> tuple[list[str] | None, Any]:
        """BM25 candidates of a text (or of an indexed listing's own text), when the ranking uses them."""
        lexical = self.ranker.lexical if self.ranker is not None else None
        if lexical is None or cfg.fusion == "dense" or not (text or query_row is not None):
            return None, None
        queries = lexical.doc_terms([query_row]) if query_row is not None else lexical.query_terms([text])
        exclude_rows = [[self.row_of[exclude]]] if exclude is not None and exclude in self.row_of else None
        rows, scores = lexical.top(queries, n, allowed=mask, exclude_rows=exclude_rows)[0]
        return self.pids[rows].tolist(), scores

    def candidates(self, vector: np.ndarray, proba: np.ndarray | None, text: str | None, query_row: int | None,
                   k: int, mask: np.ndarray | None, exclude: str | None) -> tuple[Any, RankingConfig, dict[str, str | None]]:
        cfg = self.ranker.config if self.ranker is not None else DENSE_ONLY
        n = max(cfg.n_candidates, k)
        keys, scores, image_of = self.dense_list(vector, n, mask, exclude)
        lex_keys, lex_scores = self.lexical_list(cfg, text, query_row, n, mask, exclude)
        cands = make_candidates(keys, scores, lex_keys, lex_scores, self.label_of, proba if self.ranker is not None else None)
        return cands, cfg, image_of

    def search(self, vector: np.ndarray, proba: np.ndarray | None, text: str | None, k: int,
               mask: np.ndarray | None, exclude: str | None = None, query_row: int | None = None) -> list[dict[str, Any]]:
        """The k best results: product id, image id, and the score parts (final, retrieval, category term)."""
        cands, cfg, image_of = self.candidates(vector, proba, text, query_row, k, mask, exclude)
        if proba is None:
            cfg = dataclasses.replace(cfg, category_weight=0.0)
        return ranked_results(cands, cfg, image_of, k)


def ranked_results(cands: Any, cfg: RankingConfig, image_of: Mapping[str, str | None], k: int) -> list[dict[str, Any]]:
    """Rank a candidate pool and give the k best with their score parts."""
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


def fused_similar(rankings: Mapping[str, IndexRanking]) -> tuple[SimilarConfig | None, str | None]:
    """The fitted "more like this" fusion of the text and multimodal indexes, or why it is not used."""
    text, multimodal = rankings.get("text"), rankings.get("multimodal")
    if text is None or multimodal is None or text.ranker is None or multimodal.ranker is None:
        return None, "needs the ranking files of both the text and the multimodal index"
    spec = multimodal.ranker.similar
    if spec is None:
        return None, "the multimodal index has no fitted 'similar' fusion (built before it existed: re-run the index stage)"
    meta = text.index.metadata
    if spec.text_model != (str(meta.model_name), str(meta.model_version)):
        return None, (f"the 'similar' fusion was fitted with text model {spec.text_model[0]} v{spec.text_model[1]}, "
                      f"the text index is {meta.model_name} v{meta.model_version}: re-run the index stage")
    return spec, None


def similar_fused(text: IndexRanking, multimodal: IndexRanking, spec: SimilarConfig, product_id: str, k: int,
                  masks: Mapping[str, np.ndarray | None]) -> list[dict[str, Any]]:
    """"More like this listing" by the fitted fusion: the listing's text vector in the text index and its
    text + photo vector in the multimodal index, cosines and P(category) mixed by ``spec.photo_weight``,
    BM25 on its own text, ranked by ``spec.config`` (pipeline_steps/ranking_eval.py fits and scores the same)."""
    cfg = spec.config
    n = max(cfg.n_candidates, k)
    text_row = text.row_of[product_id]
    mm_row = multimodal.row_of.get(product_id)
    w_text, w_photo = spec.weights() if mm_row is not None else (1.0, 0.0)
    keys, scores, image_of = text.dense_list(text.vector_of(text_row), n, masks.get("text"), product_id)
    lists, weights = [(keys, scores)], [w_text]
    proba = w_text * text.ranker.probs[text_row]
    if w_photo > 0:
        mm_keys, mm_scores, mm_images = multimodal.dense_list(multimodal.vector_of(mm_row), n, masks.get("multimodal"), product_id)
        lists.append((mm_keys, mm_scores))
        weights.append(w_photo)
        proba = proba + w_photo * multimodal.ranker.probs[mm_row]
        image_of = {**mm_images, **image_of}
    fused_keys, fused_scores = fuse_dense(lists, weights)
    lex_keys, lex_scores = text.lexical_list(cfg, None, text_row, n, masks.get("text"), product_id)
    cands = make_candidates(fused_keys, fused_scores, lex_keys, lex_scores, text.label_of, proba)
    return ranked_results(cands, cfg, image_of, k)


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

