"""Lexical retrieval over listing text: Okapi BM25 (Lucene's variant) with `bm25s`.

Why BM25 beside the dense index: MiniLM embeddings place "Makita drill" near other power
tools, but an exact brand/model word ("dyson", "ps4") is best matched on the word itself.
The hybrid ranking (pipeline_steps/ranking.py) fuses both.

`bm25s` (a maintained BM25 on sparse matrices) builds, scores and stores the index. This module
adds what the ranking needs around it: the project's tokenizer (accents stripped, so "café" meets
"cafe"), the ``min_df`` cut, each document's term list ("more like this listing" queries with a
listing's own terms), and the top-n under a category filter and per-query exclusions.

Saved layout (``<index dir>/<kind>/lexical/``, built by the index stage, packaged with
the index it belongs to)::

    lexical.json    k1, b, method, min_df, n_docs, n_terms, the bm25s version, title_weight
    bm25s/          the bm25s index (its own save format: score matrix, vocabulary, params)
    doc_terms.npz   (n_docs x n_terms) binary CSR: the distinct terms of each document, row i = index row i

A query's score for document d is the sum over the query's distinct terms t of
``idf(t) * tf(t,d) / (tf(t,d) + k1 * (1 - b + b * len(d) / avglen))``, idf = ``log(1 + (N - df + 0.5) / (df + 0.5))``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from pipeline_steps.errors import DataValidationError
from pipeline_steps.io_utils import atomic_dir, read_json, write_json

META_FILE = "lexical.json"
BM25S_DIR = "bm25s"
DOC_TERMS_FILE = "doc_terms.npz"
METHOD = "lucene"

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str | None) -> list[str]:
    """Lower-cased, accent-stripped alphanumeric tokens of two or more characters (and all digits)."""
    if not text:
        return []
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii").lower()
    return [t for t in _TOKEN.findall(text) if len(t) > 1 or t.isdigit()]


def listing_text(name: str | None, description: str | None, title_weight: int = 2) -> str:
    """The text a listing is indexed with: its name repeated ``title_weight`` times, then its description."""
    name = "" if name is None else str(name)
    description = "" if description is None else str(description)
    return " ".join([name] * max(1, int(title_weight)) + [description])


class BM25Index:
    """BM25 scores of free-text queries against a fixed set of documents (one per index row).

    Queries are arrays of term ids (``query_terms`` for free text, ``doc_terms`` for indexed listings)."""

    def __init__(self, retriever: Any, doc_terms: sp.csr_matrix, meta: dict[str, Any]) -> None:
        n_docs = int(meta["n_docs"])
        if doc_terms.shape[0] != n_docs or int(retriever.scores["num_docs"]) != n_docs:
            raise DataValidationError(
                f"BM25 index of {retriever.scores['num_docs']} documents with {doc_terms.shape[0]} term lists, "
                f"expected {n_docs}: re-run the index stage"
            )
        self.retriever = retriever
        self.vocabulary: dict[str, int] = dict(retriever.vocab_dict)
        self.doc_term_matrix = doc_terms.tocsr()
        self.meta = dict(meta)

    @property
    def size(self) -> int:
        return int(self.doc_term_matrix.shape[0])

    @classmethod
    def build(cls, texts: Sequence[str | None], *, k1: float = 1.2, b: float = 0.75, min_df: int = 1,
              extra: dict[str, Any] | None = None) -> BM25Index:
        """Index ``texts`` (row i = document i).

        Args:
            texts: one text per document (None or empty: a document no query matches).
            k1, b: BM25's term-frequency saturation and length normalisation.
            min_df: terms in fewer documents than this are dropped (typos, ids).
            extra: kept in the saved metadata (e.g. the title weight the texts were built with).

        Returns:
            The index.
        """
        import bm25s

        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise DataValidationError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        if not len(texts):
            raise DataValidationError("a BM25 index needs at least one document")
        tokens = [tokenize(text) for text in texts]
        if min_df > 1:
            df = Counter(term for doc in tokens for term in set(doc))
            tokens = [[t for t in doc if df[t] >= min_df] for doc in tokens]
        retriever = bm25s.BM25(k1=float(k1), b=float(b), method=METHOD)
        retriever.index(tokens, show_progress=False)
        vocabulary = retriever.vocab_dict
        rows, cols = [], []
        for i, doc in enumerate(tokens):
            ids = {vocabulary[t] for t in doc}
            rows.extend([i] * len(ids))
            cols.extend(ids)
        doc_terms = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(tokens), len(vocabulary)))
        lengths = [len(doc) for doc in tokens]
        meta = {"implementation": f"bm25s {bm25s.__version__}", "method": METHOD, "k1": float(k1), "b": float(b),
                "min_df": int(min_df), "n_docs": len(tokens), "n_terms": len(vocabulary),
                "avg_doc_len": float(np.mean(lengths)) if lengths else 0.0, **(extra or {})}
        return cls(retriever, doc_terms, meta)

    def query_terms(self, texts: Sequence[str | None]) -> list[np.ndarray]:
        """Each text's distinct known term ids (unknown words cannot match anything)."""
        return [np.array(sorted({self.vocabulary[t] for t in tokenize(text) if t in self.vocabulary}), dtype=np.int64)
                for text in texts]

    def doc_terms(self, rows: Sequence[int]) -> list[np.ndarray]:
        """Indexed documents as queries (their distinct term ids): "more like this listing"."""
        m = self.doc_term_matrix
        return [m.indices[m.indptr[r]:m.indptr[r + 1]].astype(np.int64) for r in np.asarray(rows, dtype=np.int64)]

    def scores(self, queries: Sequence[np.ndarray]) -> np.ndarray:
        """Dense (n_queries x n_docs) BM25 scores, computed by bm25s."""
        out = np.zeros((len(queries), self.size), dtype=np.float32)
        for i, terms in enumerate(queries):
            if len(terms):
                out[i] = self.retriever.get_scores_from_ids([int(t) for t in terms])
        return out

    def top(self, queries: Sequence[np.ndarray], n: int, allowed: np.ndarray | None = None,
            exclude_rows: Sequence[Sequence[int]] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query the (rows, scores) of the ``n`` best documents with a positive score, best first.

        Args:
            queries: term-id arrays (``query_terms`` / ``doc_terms``).
            n: at most this many documents per query.
            allowed: a boolean mask over documents (the category filter); others score 0.
            exclude_rows: per query, documents to leave out (the query's own listing).
        """
        all_scores = self.scores(queries)
        out = []
        for qi in range(all_scores.shape[0]):
            s = all_scores[qi]
            if allowed is not None:
                s = np.where(allowed, s, 0.0)
            if exclude_rows is not None and len(exclude_rows[qi]):
                s = s.copy()
                s[np.asarray(exclude_rows[qi], dtype=np.int64)] = 0.0
            positive = np.flatnonzero(s > 0)
            if len(positive) > n:
                positive = positive[np.argpartition(-s[positive], n - 1)[:n]]
            order = positive[np.argsort(-s[positive], kind="stable")]
            out.append((order, s[order].astype(np.float32)))
        return out

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            self.retriever.save(str(tmp / BM25S_DIR), show_progress=False)
            sp.save_npz(tmp / DOC_TERMS_FILE, self.doc_term_matrix, compressed=True)
            write_json(tmp / META_FILE, self.meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        import bm25s

        directory = Path(directory)
        for name in (META_FILE, DOC_TERMS_FILE, BM25S_DIR):
            if not (directory / name).exists():
                raise DataValidationError(f"lexical index {directory} lacks {name}: re-run the index stage")
        retriever = bm25s.BM25.load(str(directory / BM25S_DIR), show_progress=False)
        return cls(retriever, sp.load_npz(directory / DOC_TERMS_FILE).tocsr(), read_json(directory / META_FILE))
