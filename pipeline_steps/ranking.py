"""Ranking on top of nearest neighbours: hybrid lexical + dense retrieval, category-aware re-ranking,
graded relevance metrics, and the weights fitted on the validation split.

One query's ranking (the service and the evaluation run the same functions):

1. candidates: the ``n_candidates`` best listings of the dense FAISS index and (when the query
   has text and the index a lexical part) of BM25 (pipeline_steps/lexical.py), their union;
2. retrieval score, by ``fusion``:
   * ``dense``: the cosine, min-max scaled over the dense candidates (today's order);
   * ``blend``: ``(1 - w_lex) * dense_norm + w_lex * lexical_norm``, dense min-max scaled, BM25
     divided by the query's best BM25 score, a candidate missing from one list scoring 0 there;
   * ``rrf``: reciprocal rank fusion ``sum 1 / (rrf_k + rank)``, scaled by its best value;
3. category term: ``w_cat * P(candidate's root category | query)`` from the champion classifier of the
   query's kind (text, image or multimodal), computed in the same forward pass as the embedding;
4. final score = retrieval score + category term; ties keep the retrieval order.

Graded relevance (the category path "Root / Sub / Leaf"): gain 3 = same full path, 2 = same first
two levels, 1 = same root, 0 = other. nDCG@k uses gain ``2^g - 1`` and the ideal ranking of the
whole index (every listing but the query's own). precision@k = share of the top k in the query's root.

Saved next to each index (``<index dir>/<kind>/ranking/``, written by the index stage, packaged with
the index, so it is versioned with the model the index was built from)::

    ranking.json     fusion rule and weights (fitted on val), n_candidates, model name+version, val/test metrics
    probs.npy        (index rows x classes) the classifier's probabilities of every indexed row ("more like this")
    lexical/         the BM25 index over the listings' text, row i = index row i (text and multimodal kinds)
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_steps.config import require_choice
from pipeline_steps.errors import ConfigError, DataValidationError
from pipeline_steps.io_utils import atomic_dir, read_json, write_json
from pipeline_steps.lexical import BM25Index

logger = logging.getLogger(__name__)

RANKING_DIR = "ranking"
RANKING_FILE = "ranking.json"
PROBS_FILE = "probs.npy"
LEXICAL_DIR = "lexical"
FUSIONS = ("dense", "blend", "rrf")


# --------------------------------------------------------------------------- configuration


@dataclass
class RankingConfig:
    fusion: str = "blend"
    lexical_weight: float = 0.5
    category_weight: float = 0.3
    n_candidates: int = 100
    rrf_k: int = 60
    chosen_on: str = "params"
    neighbour_weight: float = 0.0
    neighbour_k: int = 10

    def __post_init__(self) -> None:
        require_choice(self.fusion, "index.ranking.fusion", FUSIONS)
        if not 0.0 <= float(self.lexical_weight) <= 1.0:
            raise ConfigError(f"index.ranking.lexical_weight must be in [0, 1], got {self.lexical_weight}")
        if float(self.category_weight) < 0:
            raise ConfigError(f"index.ranking.category_weight must be >= 0, got {self.category_weight}")
        if int(self.n_candidates) < 1 or int(self.rrf_k) < 0:
            raise ConfigError("index.ranking.n_candidates must be >= 1 and rrf_k >= 0")
        self.lexical_weight = float(self.lexical_weight)
        self.category_weight = float(self.category_weight)
        self.n_candidates = int(self.n_candidates)
        self.rrf_k = int(self.rrf_k)
        self.neighbour_weight = float(self.neighbour_weight)
        self.neighbour_k = int(self.neighbour_k)
        if self.neighbour_weight < 0 or self.neighbour_k < 1:
            raise ConfigError("index.ranking.neighbour_weight must be >= 0 and neighbour_k >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankingConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def label(self) -> str:
        if self.fusion == "dense":
            base = "dense"
        elif self.fusion == "rrf":
            base = f"rrf(k={self.rrf_k})"
        else:
            base = f"blend(lexical={self.lexical_weight:g})"
        return (base + (f" + {self.category_weight:g}*P(category)" if self.category_weight else "")
                + (f" + {self.neighbour_weight:g}*share(top {self.neighbour_k})" if self.neighbour_weight else ""))


@dataclass(frozen=True)
class RankingSettings:
    """params.yaml ``index.ranking`` and ``index.lexical``."""

    fusion: str                      # auto | dense | blend | rrf
    lexical_weight: float | None     # None = fitted on val
    category_weight: float | None
    n_candidates: int
    rrf_k: int
    fit_metric: str
    lexical_weight_grid: tuple[float, ...]
    category_weight_grid: tuple[float, ...]
    fusion_grid: tuple[str, ...]
    neighbour_weight: float | None
    neighbour_weight_grid: tuple[float, ...]
    neighbour_k: int
    similar_photo_weight: float | None
    similar_photo_weight_grid: tuple[float, ...]
    k1: float
    b: float
    title_weight: int
    min_df: int

    @classmethod
    def from_params(cls, index_params: Mapping[str, Any]) -> RankingSettings:
        """From params.yaml's `index` section (its `ranking` and `lexical` parts, checked by the schema)."""
        from pipeline_steps import settings

        ranking = settings.section(settings.RankingSettings, index_params["ranking"], "index.ranking")
        lexical = settings.section(settings.LexicalSettings, index_params["lexical"], "index.lexical")

        def weight(value: float | str) -> float | None:
            return None if value == "auto" else float(value)

        return cls(
            fusion=ranking.fusion,
            lexical_weight=weight(ranking.lexical_weight),
            category_weight=weight(ranking.category_weight),
            n_candidates=ranking.n_candidates,
            rrf_k=ranking.rrf_k,
            fit_metric=ranking.fit_metric,
            lexical_weight_grid=tuple(ranking.lexical_weight_grid),
            category_weight_grid=tuple(ranking.category_weight_grid),
            fusion_grid=tuple(ranking.fusion_grid),
            neighbour_weight=weight(ranking.neighbour_weight),
            neighbour_weight_grid=tuple(ranking.neighbour_weight_grid),
            neighbour_k=ranking.neighbour_k,
            similar_photo_weight=weight(ranking.similar_photo_weight),
            similar_photo_weight_grid=tuple(ranking.similar_photo_weight_grid),
            k1=lexical.k1,
            b=lexical.b,
            title_weight=lexical.title_weight,
            min_df=lexical.min_df,
        )

    def similar_weights(self) -> list[float]:
        """The photo weights "more like this" chooses from on val (a fixed value stays fixed)."""
        if self.similar_photo_weight is not None:
            return [self.similar_photo_weight]
        return list(dict.fromkeys(self.similar_photo_weight_grid))

    def candidate_configs(self, has_lexical: bool) -> list[RankingConfig]:
        """Every configuration the val split chooses from (fixed values stay fixed)."""
        fusions = [self.fusion] if self.fusion != "auto" else list(self.fusion_grid)
        if not has_lexical:
            fusions = ["dense"]
        lex_grid = [self.lexical_weight] if self.lexical_weight is not None else list(self.lexical_weight_grid)
        cat_grid = [self.category_weight] if self.category_weight is not None else list(self.category_weight_grid)
        nb_grid = [self.neighbour_weight] if self.neighbour_weight is not None else list(self.neighbour_weight_grid)
        configs = []
        for fusion in dict.fromkeys(fusions):
            lexes = lex_grid if fusion == "blend" else [0.0]
            for lex, cat, nb in itertools.product(lexes, cat_grid, nb_grid):
                configs.append(RankingConfig(fusion, lex, cat, self.n_candidates, self.rrf_k, "val", nb, self.neighbour_k))
        return configs


@dataclass
class SimilarConfig:
    """"More like this listing": the text index's candidates and classifier fused with the multimodal
    (text + photos) index's, ``(1 - photo_weight) * text + photo_weight * multimodal`` for both the
    cosines (pipeline_steps.ranking.fuse_dense) and P(category), then ranked by ``config``.

    Saved in the multimodal index's ranking.json (key ``similar``) with the text model it was fitted
    with; the service uses it only when its text index was built from that same model version."""

    photo_weight: float
    config: RankingConfig
    text_model: tuple[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"photo_weight": self.photo_weight, "config": self.config.to_dict(),
                "text_model": list(self.text_model), "rule": self.label()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimilarConfig:
        name, version = data["text_model"]
        return cls(float(data["photo_weight"]), RankingConfig.from_dict(data["config"]), (str(name), str(version)))

    def label(self) -> str:
        return f"(1-{self.photo_weight:g})*text + {self.photo_weight:g}*multimodal, {self.config.label()}"

    def weights(self) -> tuple[float, float]:
        return 1.0 - self.photo_weight, self.photo_weight


# --------------------------------------------------------------------------- one query


@dataclass
class Candidates:
    """One query's candidate pool: the union of the dense and lexical lists."""

    keys: np.ndarray            # product ids (object)
    dense: np.ndarray           # raw cosine, nan when not among the dense candidates
    lexical: np.ndarray         # raw BM25, nan when not among the lexical candidates
    dense_rank: np.ndarray      # 1-based, inf when missing
    lexical_rank: np.ndarray
    labels: np.ndarray          # class index of each candidate's root category, -1 unknown
    proba: np.ndarray           # the query's class probabilities
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def category_prob(self) -> np.ndarray:
        out = np.zeros(len(self.keys), dtype=np.float64)
        known = self.labels >= 0
        if self.proba is not None and len(self.proba):
            out[known] = np.asarray(self.proba, dtype=np.float64)[self.labels[known]]
        return out


def make_candidates(
    dense_keys: Sequence[Hashable],
    dense_scores: Sequence[float],
    lexical_keys: Sequence[Hashable] | None,
    lexical_scores: Sequence[float] | None,
    label_of: Mapping[Hashable, int],
    proba: np.ndarray | None,
) -> Candidates:
    position: dict[Hashable, int] = {}
    keys: list[Hashable] = []
    lexical_keys = [] if lexical_keys is None else list(lexical_keys)
    lexical_scores = [] if lexical_scores is None else list(lexical_scores)
    for key in list(dense_keys) + lexical_keys:
        if key not in position:
            position[key] = len(keys)
            keys.append(key)
    n = len(keys)
    dense = np.full(n, np.nan)
    lexical = np.full(n, np.nan)
    dense_rank = np.full(n, np.inf)
    lexical_rank = np.full(n, np.inf)
    for rank, (key, score) in enumerate(zip(dense_keys, dense_scores), start=1):
        i = position[key]
        if math.isinf(dense_rank[i]):
            dense[i], dense_rank[i] = float(score), rank
    for rank, (key, score) in enumerate(zip(lexical_keys, lexical_scores), start=1):
        i = position[key]
        if math.isinf(lexical_rank[i]):
            lexical[i], lexical_rank[i] = float(score), rank
    labels = np.fromiter((int(label_of.get(key, -1)) for key in keys), dtype=np.int64, count=n)
    key_array = np.empty(n, dtype=object)
    key_array[:] = keys
    return Candidates(key_array, dense, lexical, dense_rank, lexical_rank, labels,
                      None if proba is None else np.asarray(proba, dtype=np.float64))


def fuse_dense(
    lists: Sequence[tuple[Sequence[Hashable], Sequence[float]]],
    weights: Sequence[float],
) -> tuple[list[Hashable], np.ndarray]:
    """One dense list from several indexes' neighbour lists: ``sum_i w_i * cosine_i`` over the union of
    the keys of the lists with a weight above 0, best first ("more like this": the listing's text
    vector in the text index and its text + photo vector in the multimodal index).

    A key missing from a list scores that list's lowest cosine there: it ranked below every listed
    one, so its cosine is at most that (an upper bound, which keeps a listing that one index did
    not return from being punished below listings it did return). With one list of weight 1 the
    result is that list.

    Args:
        lists: per index, the candidate keys and their cosines (best first).
        weights: one non-negative weight per list.

    Returns:
        The keys and their fused scores, best first (ties keep the first list's order).
    """
    if len(lists) != len(weights):
        raise ValueError(f"{len(lists)} lists, {len(weights)} weights")
    used = [(list(keys), np.asarray(scores, dtype=np.float64), float(w))
            for (keys, scores), w in zip(lists, weights) if float(w) > 0]
    position: dict[Hashable, int] = {}
    keys_out: list[Hashable] = []
    for keys, _, _ in used:
        for key in keys:
            if key not in position:
                position[key] = len(keys_out)
                keys_out.append(key)
    fused = np.zeros(len(keys_out))
    for keys, scores, weight in used:
        column = np.full(len(keys_out), scores.min() if len(scores) else 0.0)
        seen: set[Hashable] = set()
        for key, score in zip(keys, scores):
            if key not in seen:  # a key's first (best) score in its list
                seen.add(key)
                column[position[key]] = score
        fused += weight * column
    order = np.argsort(-fused, kind="stable")
    return [keys_out[i] for i in order], fused[order]


def _minmax(values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values))
    present = ~np.isnan(values)
    if present.any():
        lo, hi = values[present].min(), values[present].max()
        out[present] = (values[present] - lo) / (hi - lo) if hi > lo else 1.0
    return out


def retrieval_scores(c: Candidates, cfg: RankingConfig) -> np.ndarray:
    if cfg.fusion == "dense" or np.isnan(c.lexical).all():
        if np.isnan(c.dense).all():  # lexical candidates only (e.g. nothing dense survived a filter)
            return _scaled_max(c.lexical)
        return _minmax(c.dense)
    if cfg.fusion == "rrf":
        rrf = 1.0 / (cfg.rrf_k + c.dense_rank) + 1.0 / (cfg.rrf_k + c.lexical_rank)
        return rrf / rrf.max() if len(rrf) and rrf.max() > 0 else rrf
    return (1.0 - cfg.lexical_weight) * _minmax(c.dense) + cfg.lexical_weight * _scaled_max(c.lexical)


def _scaled_max(values: np.ndarray) -> np.ndarray:
    out = np.nan_to_num(values, nan=0.0)
    top = out.max() if len(out) else 0.0
    return out / top if top > 0 else out


def neighbour_share(c: Candidates, retrieval: np.ndarray, k: int) -> np.ndarray:
    """Per candidate: the retrieval-score-weighted share of the ``k`` best-retrieved candidates in its
    root category (a k-nearest-neighbour vote on the category, beside the classifier's)."""
    out = np.zeros(len(retrieval))
    if not len(retrieval):
        return out
    top = np.argsort(-retrieval, kind="stable")[:k]
    top = top[c.labels[top] >= 0]
    weights = np.clip(retrieval[top], 0.0, None)
    if not len(top) or weights.sum() <= 0:
        return out
    share = np.bincount(c.labels[top], weights=weights, minlength=int(c.labels.max()) + 1) / weights.sum()
    known = c.labels >= 0
    out[known] = share[c.labels[known]]
    return out


def rank(c: Candidates, cfg: RankingConfig, cache: dict[Any, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(order, retrieval score, category term, final score), order = candidate positions best first.

    The category term is ``category_weight * P(category | query) + neighbour_weight * neighbour share``.
    ``cache`` (per query) keeps retrieval scores between configurations that share the fusion."""
    key = (cfg.fusion, cfg.lexical_weight, cfg.rrf_k)
    retrieval = None if cache is None else cache.get(key)
    if retrieval is None:
        retrieval = retrieval_scores(c, cfg)
        if cache is not None:
            cache[key] = retrieval
    category = cfg.category_weight * c.category_prob if cfg.category_weight else np.zeros(len(retrieval))
    if cfg.neighbour_weight:
        nkey = (*key, "nb", cfg.neighbour_k)
        share = None if cache is None else cache.get(nkey)
        if share is None:
            share = neighbour_share(c, retrieval, cfg.neighbour_k)
            if cache is not None:
                cache[nkey] = share
        category = category + cfg.neighbour_weight * share
    final = retrieval + category
    order = np.lexsort((-retrieval, -final))
    return order, retrieval, category, final


# --------------------------------------------------------------------------- graded relevance


def path_codes(paths: Sequence[str | None]) -> np.ndarray:
    """(n, 3) strings: root, first two levels, full path (lower-cased, spaces normalised)."""
    out = np.empty((len(paths), 3), dtype=object)
    for i, path in enumerate(paths):
        parts = [p.strip().lower() for p in str(path or "").split("/") if p.strip()]
        out[i] = (" / ".join(parts[:1]), " / ".join(parts[:2]), " / ".join(parts))
    return out


def graded_gains(query_codes: np.ndarray, doc_codes: np.ndarray) -> np.ndarray:
    """(n_queries, n_docs) gains 0..3: same root +1, same first two levels +1, same full path +1."""
    gains = np.zeros((len(query_codes), len(doc_codes)), dtype=np.int8)
    for level in range(3):
        q = pd.Series(query_codes[:, level]).astype(str)
        d = pd.Series(doc_codes[:, level]).astype(str)
        cats = pd.Categorical(pd.concat([q, d], ignore_index=True))
        qc, dc = cats.codes[: len(q)], cats.codes[len(q):]
        gains += (qc[:, None] == dc[None, :]).astype(np.int8)
    return gains


def ideal_dcg(gain_counts: np.ndarray, k: int) -> float:
    """Best possible DCG@k given how many documents have gain 3, 2, 1 (``gain_counts[g]``)."""
    ideal: list[int] = []
    for g in (3, 2, 1):
        ideal.extend([g] * int(min(gain_counts[g], k - len(ideal))))
        if len(ideal) >= k:
            break
    return float(sum((2.0 ** g - 1.0) / math.log2(i + 2) for i, g in enumerate(ideal)))


@dataclass
class EvalQuery:
    candidates: Candidates
    gains: np.ndarray          # gain of each candidate
    ideal: dict[int, float]    # k -> ideal DCG


def evaluate(queries: Sequence[EvalQuery], cfg: RankingConfig, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Mean precision@k (same root) and graded nDCG@k of ``cfg``'s ranking over ``queries``."""
    ks = sorted({int(k) for k in ks})
    totals = {f"precision@{k}": 0.0 for k in ks} | {f"ndcg@{k}": 0.0 for k in ks}
    if not queries:
        return {key: float("nan") for key in totals}
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    for q in queries:
        order = rank(q.candidates, cfg, q.candidates.extra)[0][: max(ks)]
        g = q.gains[order]
        for k in ks:
            top = g[:k]
            totals[f"precision@{k}"] += float((top >= 1).sum()) / k
            ideal = q.ideal[k]
            dcg = float(((2.0 ** top - 1.0) * discounts[: len(top)]).sum())
            totals[f"ndcg@{k}"] += dcg / ideal if ideal > 0 else 0.0
    return {key: value / len(queries) for key, value in totals.items()}


def fit(queries: Sequence[EvalQuery], configs: Sequence[RankingConfig], metric: str,
        ks: Sequence[int]) -> tuple[RankingConfig, list[dict[str, Any]]]:
    """The configuration with the best ``metric`` on ``queries`` (the val split), and every score."""
    ks = sorted({*ks, int(metric.split("@")[1])})
    table = []
    best, best_value = None, -math.inf
    for cfg in configs:
        scores = evaluate(queries, cfg, ks)
        table.append({**cfg.to_dict(), **scores})
        if scores[metric] > best_value + 1e-12:
            best, best_value = cfg, scores[metric]
    if best is None:
        raise DataValidationError("no ranking configuration to fit")
    return best, table


# --------------------------------------------------------------------------- saved files


def ranking_dir(index_dir: str | Path) -> Path:
    return Path(index_dir) / RANKING_DIR


def save(index_dir: str | Path, cfg: RankingConfig, probs: np.ndarray, classes: Sequence[str],
         lexical: BM25Index | None, index_meta: Mapping[str, Any], metrics: Mapping[str, Any],
         similar: SimilarConfig | None = None) -> Path:
    """Write ``<index_dir>/ranking/`` as a whole (atomically); ``similar`` goes with the multimodal index."""
    target = ranking_dir(index_dir)
    with atomic_dir(target) as tmp:
        np.save(tmp / PROBS_FILE, np.asarray(probs, dtype=np.float32))
        if lexical is not None:
            lexical.save(tmp / LEXICAL_DIR)
        write_json(tmp / RANKING_FILE, {
            "config": cfg.to_dict(),
            "classes": list(classes),
            "lexical": None if lexical is None else lexical.meta,
            "model_name": index_meta.get("model_name"),
            "model_version": index_meta.get("model_version"),
            "index_built_at": index_meta.get("built_at"),
            "metrics": dict(metrics),
            "similar": None if similar is None else similar.to_dict(),
        })
    return target


class MissingRanking(Exception):
    """An index without (a usable) ranking part: served dense-only."""


@dataclass
class Ranker:
    """What the service needs to rank one index's results."""

    config: RankingConfig
    classes: list[str]
    probs: np.ndarray
    lexical: BM25Index | None
    info: dict[str, Any]

    @classmethod
    def load(cls, index_dir: str | Path, index_meta: Mapping[str, Any], n_rows: int) -> Ranker:
        """Raise MissingRanking (with the reason) for an old bundle or a ranking of another model version."""
        directory = ranking_dir(index_dir)
        path = directory / RANKING_FILE
        if not path.is_file():
            raise MissingRanking(f"{directory} not found: the index was built without the ranking part "
                                 "(re-run the index stage, then the package stage)")
        info = read_json(path)
        built_for = (str(info.get("model_name")), str(info.get("model_version")))
        index_model = (str(index_meta.get("model_name")), str(index_meta.get("model_version")))
        if built_for != index_model:
            raise MissingRanking(f"{path} belongs to model {built_for[0]} v{built_for[1]}, the index to "
                                 f"{index_model[0]} v{index_model[1]}: re-run the index stage")
        probs = np.load(directory / PROBS_FILE) if (directory / PROBS_FILE).is_file() else None
        if probs is None or probs.shape[0] != n_rows:
            raise MissingRanking(f"{directory / PROBS_FILE} is missing or does not have one row per index row")
        lexical = None
        if (directory / LEXICAL_DIR).is_dir():
            try:
                lexical = BM25Index.load(directory / LEXICAL_DIR)
            except DataValidationError as exc:  # e.g. a bundle from before the bm25s format
                raise MissingRanking(str(exc)) from None
            if lexical.size != n_rows:
                raise MissingRanking(f"the lexical index has {lexical.size} rows, the index {n_rows}")
        return cls(RankingConfig.from_dict(info["config"]), list(info.get("classes") or []), probs, lexical, info)

    @property
    def similar(self) -> SimilarConfig | None:
        """The fitted "more like this" fusion saved with a multimodal index (None: older files or other kinds)."""
        data = self.info.get("similar")
        return None if not data else SimilarConfig.from_dict(data)

    @property
    def uses_lexical(self) -> bool:
        cfg = self.config
        return self.lexical is not None and (cfg.fusion == "rrf" or (cfg.fusion == "blend" and cfg.lexical_weight > 0))

    def describe(self) -> dict[str, Any]:
        return {
            "mode": "hybrid" if self.uses_lexical else ("dense+category" if self.config.category_weight else "dense"),
            "fusion": self.config.fusion,
            "lexical_weight": self.config.lexical_weight,
            "category_weight": self.config.category_weight,
            "n_candidates": self.config.n_candidates,
            "rrf_k": self.config.rrf_k,
            "neighbour_weight": self.config.neighbour_weight,
            "neighbour_k": self.config.neighbour_k,
            "chosen_on": self.config.chosen_on,
            "rule": self.config.label(),
        }
