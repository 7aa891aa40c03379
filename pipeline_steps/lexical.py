"""Lexical retrieval over listing text: Okapi BM25 on a sparse term matrix (scikit-learn + SciPy).

Why BM25 beside the dense index: MiniLM embeddings place "Makita drill" near other power
tools, but an exact brand/model word ("dyson", "ps4") is best matched on the word itself.
The hybrid ranking (pipeline_steps/ranking.py) fuses both.

Saved layout (``<index dir>/<kind>/lexical/``, built by the index stage, packaged with
the index it belongs to)::

    lexical.json    k1, b, title_weight, n_docs, vocabulary size, avg doc length
    vocabulary.json term -> column
    weights.npz     (n_docs x n_terms) CSR of BM25 term weights, row i = index row i

A query's score for document d is the sum over the query's distinct terms t of
``idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * len(d) / avglen))``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from pipeline_steps.errors import DataValidationError
from pipeline_steps.io_utils import atomic_dir, read_json, write_json

META_FILE = "lexical.json"
VOCAB_FILE = "vocabulary.json"
WEIGHTS_FILE = "weights.npz"

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
    """BM25 scores of free-text queries against a fixed set of documents (one per index row)."""

    def __init__(self, weights: sp.csr_matrix, vocabulary: dict[str, int], meta: dict[str, Any]) -> None:
        if weights.shape != (int(meta["n_docs"]), len(vocabulary)):
            raise DataValidationError(
                f"BM25 weights have shape {weights.shape}, expected ({meta['n_docs']}, {len(vocabulary)})"
            )
        self.weights = weights.tocsr()
        self.vocabulary = vocabulary
        self.meta = dict(meta)
        self._by_term = self.weights.T.tocsr()  # (n_terms x n_docs): one row per term, fast query sums

    @property
    def size(self) -> int:
        return int(self.weights.shape[0])

    @classmethod
    def build(cls, texts: Sequence[str | None], *, k1: float = 1.2, b: float = 0.75, min_df: int = 1,
              extra: dict[str, Any] | None = None) -> BM25Index:
        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise DataValidationError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        vocabulary: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        for i, text in enumerate(texts):
            for token in tokenize(text):
                col = vocabulary.setdefault(token, len(vocabulary))
                rows.append(i)
                cols.append(col)
        n_docs = len(texts)
        tf = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_docs, len(vocabulary)))
        tf.sum_duplicates()
        df = np.bincount(tf.indices, minlength=len(vocabulary))
        if min_df > 1 and len(vocabulary):
            keep = np.flatnonzero(df >= min_df)
            tf = tf[:, keep].tocsr()
            terms = sorted(vocabulary, key=vocabulary.__getitem__)
            vocabulary = {terms[j]: new for new, j in enumerate(keep)}
            df = df[keep]
        doc_len = np.asarray(tf.sum(axis=1)).ravel()
        avg_len = float(doc_len.mean()) if n_docs and doc_len.mean() > 0 else 1.0
        idf = np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
        weights = tf.tocoo()
        norm = k1 * (1.0 - b + b * doc_len[weights.row] / avg_len)
        data = idf[weights.col] * weights.data * (k1 + 1.0) / (weights.data + norm)
        matrix = sp.csr_matrix((data.astype(np.float32), (weights.row, weights.col)), shape=tf.shape)
        meta = {"k1": float(k1), "b": float(b), "min_df": int(min_df), "n_docs": int(n_docs),
                "n_terms": int(len(vocabulary)), "avg_doc_len": avg_len, **(extra or {})}
        return cls(matrix, vocabulary, meta)

    def query_matrix(self, texts: Sequence[str | None]) -> sp.csr_matrix:
        """(n_queries x n_terms) binary matrix of each query's known distinct terms."""
        rows, cols = [], []
        for i, text in enumerate(texts):
            for col in {self.vocabulary[t] for t in tokenize(text) if t in self.vocabulary}:
                rows.append(i)
                cols.append(col)
        return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(texts), len(self.vocabulary)))

    def doc_queries(self, rows: Sequence[int]) -> sp.csr_matrix:
        """Indexed documents as queries (their distinct terms): "more like this listing"."""
        q = self.weights[np.asarray(rows, dtype=np.int64)].copy()
        q.data[:] = 1.0
        return q.tocsr()

    def scores(self, queries: sp.csr_matrix) -> np.ndarray:
        """Dense (n_queries x n_docs) BM25 scores for a query matrix."""
        return np.asarray((queries @ self._by_term).todense(), dtype=np.float32)

    def top(self, queries: sp.csr_matrix, n: int, allowed: np.ndarray | None = None,
            exclude_rows: Sequence[Sequence[int]] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query the (rows, scores) of the ``n`` best documents with a positive score, best first."""
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
            sp.save_npz(tmp / WEIGHTS_FILE, self.weights, compressed=True)
            (tmp / VOCAB_FILE).write_text(json.dumps(self.vocabulary), encoding="utf-8")
            write_json(tmp / META_FILE, self.meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        directory = Path(directory)
        for name in (META_FILE, VOCAB_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise DataValidationError(f"lexical index {directory} lacks {name}: re-run the index stage")
        meta = read_json(directory / META_FILE)
        vocabulary = read_json(directory / VOCAB_FILE)
        return cls(sp.load_npz(directory / WEIGHTS_FILE).tocsr(), vocabulary, meta)
