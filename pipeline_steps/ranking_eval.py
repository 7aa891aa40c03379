"""The index stage's ranking step: build the lexical part, fit the ranking weights on the val split,
report precision@k and graded nDCG@k on the test split beside the dense-only baseline.

Query sets (every query's own listing excluded from its results):

* ``text``       a val/test listing's text        -> text index (+ BM25), text classifier's P(category)
* ``image``      each photo of a val/test listing -> image index (one result per product), image classifier
* ``combined``   text + photos of a val/test listing that has photos -> multimodal index (+ BM25), multimodal classifier
* ``similar``    "more like this listing" by product id: the listing's text vector in the text index and its
                 text + photo vector in the multimodal index, fused with a photo weight fitted on val
                 (``ranking.SimilarConfig``), its text as the BM25 query, the two classifiers' P(category)
                 mixed the same way; test reported on all listings and on those with photos, beside the
                 multimodal-index-only and the text-only rankings of the same listings

Weights are chosen per index kind on val (``index.ranking.fit_metric``); test is reported once with
the chosen weights, next to fixed reference rankings (dense only, BM25 only, RRF, equal blend).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline_steps.index import SimilarityIndex
from pipeline_steps.lexical import BM25Index, listing_text
from pipeline_steps.ranking import (
    EvalQuery,
    RankingConfig,
    RankingSettings,
    SimilarConfig,
    evaluate,
    fit,
    fuse_dense,
    graded_gains,
    ideal_dcg,
    make_candidates,
    path_codes,
    save,
)

logger = logging.getLogger(__name__)

QUERY_KIND = {"text": "text", "image": "image", "combined": "multimodal", "similar": "multimodal"}


@dataclass
class KindData:
    """One index kind's built index and the stored outputs of its model for every indexed row."""

    index: SimilarityIndex
    vectors: np.ndarray       # row i <-> ids row i (every split)
    ids: pd.DataFrame         # product_id, image_id, split, label
    probs: np.ndarray         # (rows, classes)
    classes: list[str]


class Catalogue:
    """Per product: category path codes, root label, listing text, photos."""

    def __init__(self, products: pd.DataFrame, classes: Sequence[str], title_weight: int) -> None:
        products = products.reset_index(drop=True)
        self.pids = products["product_id"].astype(str).to_numpy()
        self.position = {p: i for i, p in enumerate(self.pids)}
        path = products["category_path"] if "category_path" in products.columns else products["category"]
        self.codes = path_codes(path.fillna("").astype(str).tolist())
        class_index = {c: i for i, c in enumerate(classes)}
        self.label_of = {p: class_index.get(str(c), -1) for p, c in zip(self.pids, products["category"].astype(str))}
        names = products["product_name"] if "product_name" in products.columns else products["text"]
        descriptions = products["product_description"] if "product_description" in products.columns else pd.Series([""] * len(products))
        self.text = {p: listing_text(n, d, title_weight) for p, n, d in
                     zip(self.pids, names.fillna("").astype(str), descriptions.fillna("").astype(str))}
        n_images = products["n_images"] if "n_images" in products.columns else pd.Series([0] * len(products))
        self.has_photo = {p: int(n) > 0 for p, n in zip(self.pids, n_images.fillna(0))}


def build_lexical(index: SimilarityIndex, catalogue: Catalogue, settings: RankingSettings) -> BM25Index:
    pids = index.ids["product_id"].astype(str).tolist()
    return BM25Index.build([catalogue.text.get(p, "") for p in pids], k1=settings.k1, b=settings.b,
                           min_df=settings.min_df, extra={"title_weight": settings.title_weight})


DenseList = tuple[list[str], list[float]]


def _dense_lists(data: KindData, rows: np.ndarray, n_candidates: int) -> tuple[np.ndarray, list[DenseList]]:
    """The query rows' product ids and their dense neighbour lists (own listing excluded)."""
    query_pids = data.ids["product_id"].astype(str).to_numpy()[rows]
    unique = data.index.metadata.kind == "image"
    hits = data.index.search(data.vectors[rows], n_candidates, exclude_product_ids=list(query_pids), unique_products=unique)
    return query_pids, [([str(h.product_id) for h in row], [h.score for h in row]) for row in hits]


def _lexical_lists(lexical: BM25Index, index: SimilarityIndex, catalogue: Catalogue, query_pids: np.ndarray,
                   n_candidates: int) -> list[tuple[list[str], np.ndarray]]:
    """BM25 lists of the query listings' own text (own listing excluded)."""
    index_pids = index.ids["product_id"].astype(str).to_numpy()
    own_rows = {p: i for i, p in enumerate(index_pids)}
    lists = lexical.top(
        lexical.query_terms([catalogue.text.get(p, "") for p in query_pids]), n_candidates,
        exclude_rows=[[own_rows[p]] if p in own_rows else [] for p in query_pids],
    )
    return [(index_pids[lex_rows].tolist(), lex_scores) for lex_rows, lex_scores in lists]


def _eval_queries(
    query_pids: np.ndarray,
    dense: Sequence[DenseList],
    lexical: Sequence[tuple[list[str], np.ndarray]] | None,
    probs: np.ndarray,
    index: SimilarityIndex,
    catalogue: Catalogue,
    ks: Sequence[int],
) -> list[EvalQuery]:
    """One EvalQuery per query: its candidates, each candidate's graded gain, and the ideal DCG
    against every product of the index but the query's own."""
    index_products = pd.unique(index.ids["product_id"].astype(str).to_numpy())
    product_codes = catalogue.codes[[catalogue.position[p] for p in index_products]]
    query_codes = catalogue.codes[[catalogue.position[p] for p in query_pids]]
    all_gains = graded_gains(query_codes, product_codes)
    in_index = set(index_products)
    out = []
    for qi, pid in enumerate(query_pids):
        counts = np.bincount(all_gains[qi], minlength=4).astype(np.int64)
        if pid in in_index:
            counts[3] -= 1
        lex_keys, lex_scores = lexical[qi] if lexical is not None else (None, None)
        cands = make_candidates(dense[qi][0], dense[qi][1], lex_keys, lex_scores, catalogue.label_of, probs[qi])
        cand_codes = catalogue.codes[[catalogue.position[p] for p in cands.keys]] if len(cands.keys) else np.empty((0, 3), object)
        gains = (cand_codes == query_codes[qi]).sum(axis=1).astype(np.int8) if len(cands.keys) else np.zeros(0, np.int8)
        out.append(EvalQuery(cands, gains, {k: ideal_dcg(counts, k) for k in ks}))
    return out


def _queries(
    data: KindData,
    rows: np.ndarray,
    catalogue: Catalogue,
    lexical: BM25Index | None,
    n_candidates: int,
    ks: Sequence[int],
    with_text: bool,
) -> list[EvalQuery]:
    if len(rows) == 0:
        return []
    query_pids, dense = _dense_lists(data, rows, n_candidates)
    lex = _lexical_lists(lexical, data.index, catalogue, query_pids, n_candidates) if lexical is not None and with_text else None
    return _eval_queries(query_pids, dense, lex, data.probs[rows], data.index, catalogue, ks)


def reference_configs(chosen: RankingConfig, has_lexical: bool) -> dict[str, RankingConfig]:
    """The rankings every report compares: today's dense order, the parts, and the chosen one."""
    n, rrf_k = chosen.n_candidates, chosen.rrf_k
    refs = {"dense (baseline)": RankingConfig("dense", 0.0, 0.0, n, rrf_k, "fixed")}
    if has_lexical:
        refs["bm25 only"] = RankingConfig("blend", 1.0, 0.0, n, rrf_k, "fixed")
        refs["rrf"] = RankingConfig("rrf", 0.0, 0.0, n, rrf_k, "fixed")
        refs["blend 0.5"] = RankingConfig("blend", 0.5, 0.0, n, rrf_k, "fixed")
        refs["hybrid (chosen, no category)"] = RankingConfig(chosen.fusion, chosen.lexical_weight, 0.0, n, rrf_k, "val")
    refs["dense + category"] = RankingConfig("dense", 0.0, chosen.category_weight, n, rrf_k, "val",
                                             chosen.neighbour_weight, chosen.neighbour_k)
    refs["chosen: " + chosen.label()] = chosen
    return refs


def _split_rows(data: KindData, catalogue: Catalogue, split: str, photos_only: bool) -> np.ndarray:
    mask = (data.ids["split"].astype(str) == split).to_numpy().copy()
    if photos_only:
        mask &= np.array([catalogue.has_photo.get(str(p), False) for p in data.ids["product_id"]], dtype=bool)
    return np.flatnonzero(mask)


def fit_and_report(
    kinds: Mapping[str, KindData],
    products: pd.DataFrame,
    settings: RankingSettings,
    ks: Sequence[int] = (1, 5, 10),
    index_dirs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit every kind's ranking on val, save it next to its index (when ``index_dirs`` is given),
    and return ``{query type: {"val": ..., "test": {ranking: metrics}, "chosen": config}}``."""
    ks = sorted({*map(int, ks), 10})
    report: dict[str, Any] = {}
    chosen_of: dict[str, RankingConfig] = {}
    lexicals: dict[str, BM25Index | None] = {}
    for kind, data in kinds.items():
        catalogue = Catalogue(products, data.classes, settings.title_weight)
        lexical = build_lexical(data.index, catalogue, settings) if kind in ("text", "multimodal") else None
        lexicals[kind] = lexical
        query_type = {"text": "text", "image": "image", "multimodal": "combined"}[kind]
        photos_only = kind == "multimodal"
        val = _queries(data, _split_rows(data, catalogue, "val", photos_only), catalogue, lexical,
                       settings.n_candidates, ks, with_text=kind != "image")
        test = _queries(data, _split_rows(data, catalogue, "test", photos_only), catalogue, lexical,
                        settings.n_candidates, ks, with_text=kind != "image")
        configs = settings.candidate_configs(lexical is not None)
        if val:
            chosen, table = fit(val, configs, settings.fit_metric, ks)
        else:  # no val split: the params' fixed values (or the first of the grid)
            chosen, table = configs[0], []
            logger.warning("%s: no val queries, ranking weights not fitted (%s)", kind, chosen.label())
        chosen_of[kind] = chosen
        refs = reference_configs(chosen, lexical is not None)
        report[query_type] = {
            "index": kind,
            "queries": {"val": len(val), "test": len(test)},
            "chosen": chosen.to_dict() | {"rule": chosen.label(), "fit_metric": settings.fit_metric},
            "val": {name: evaluate(val, cfg, ks) for name, cfg in refs.items()},
            "test": {name: evaluate(test, cfg, ks) for name, cfg in refs.items()},
            "val_grid_size": len(table),
        }
        logger.info("%s ranking chosen on val: %s", kind, chosen.label())
        if kind == "multimodal":
            report["similar"] = {
                "index": kind,
                "chosen": report["combined"]["chosen"],
                **{split_key: _multimodal_similar(data, catalogue, lexical, settings, ks, split_key, refs)
                   for split_key in ("test", "test_with_photos")},
            }
    similar_of: SimilarConfig | None = None
    if "text" in kinds and "multimodal" in kinds:
        similar_of = _similar(kinds["text"], kinds["multimodal"], products, settings, lexicals["text"],
                              chosen_of["text"], ks, report["similar"])
    elif "text" in kinds and "similar" in report:
        data = kinds["text"]
        catalogue = Catalogue(products, data.classes, settings.title_weight)
        photo_test = _queries(data, _split_rows(data, catalogue, "test", True), catalogue, lexicals["text"],
                              settings.n_candidates, ks, with_text=True)
        refs = reference_configs(chosen_of["text"], lexicals["text"] is not None)
        report["similar"]["text_with_photos"] = {name: evaluate(photo_test, cfg, ks) for name, cfg in refs.items()}
    if index_dirs is not None:
        for kind, data in kinds.items():
            query_type = {"text": "text", "image": "image", "multimodal": "combined"}[kind]
            save(index_dirs[kind], chosen_of[kind], data_probs_by_index_row(data), data.classes, lexicals[kind],
                 data.index.metadata.to_dict(), {"val": report[query_type]["val"], "test": report[query_type]["test"]},
                 similar=similar_of if kind == "multimodal" else None)
    return report


def _multimodal_similar(data: KindData, catalogue: Catalogue, lexical: BM25Index | None, settings: RankingSettings,
                        ks: Sequence[int], split_key: str, refs: Mapping[str, RankingConfig]) -> dict[str, Any]:
    """"More like this" from the multimodal index alone (the listing's own vector, its text as the BM25
    query): every reference ranking of the combined queries, on all test listings or those with photos."""
    queries = _queries(data, _split_rows(data, catalogue, "test", split_key == "test_with_photos"), catalogue,
                       lexical, settings.n_candidates, ks, with_text=True)
    return {name: evaluate(queries, cfg, ks) for name, cfg in refs.items()}


def _similar(text: KindData, multimodal: KindData, products: pd.DataFrame, settings: RankingSettings,
             lexical: BM25Index | None, text_chosen: RankingConfig, ks: Sequence[int],
             entry: dict[str, Any]) -> SimilarConfig | None:
    """Fit "more like this listing" on val: the photo weight of the text + multimodal fusion
    (`ranking.fuse_dense`, probabilities mixed the same way) together with the ranking rule; report
    it on test beside the multimodal-only and text-only rankings. Updates ``entry`` (report["similar"])."""
    if list(text.classes) != list(multimodal.classes):
        logger.warning("similar: the text and multimodal models have different classes; multimodal index only")
        return None
    catalogue = Catalogue(products, text.classes, settings.title_weight)
    mm_row = {p: i for i, p in enumerate(multimodal.ids["product_id"].astype(str))}
    text_pids = text.ids["product_id"].astype(str).to_numpy()
    n = settings.n_candidates

    def gather(split: str, photos_only: bool) -> tuple[Any, ...]:
        rows = _split_rows(text, catalogue, split, photos_only)
        rows = rows[np.array([text_pids[r] in mm_row for r in rows], dtype=bool)] if len(rows) else rows
        pids, text_dense = _dense_lists(text, rows, n)
        mm_rows = np.array([mm_row[p] for p in pids], dtype=np.int64)
        _, mm_dense = _dense_lists(multimodal, mm_rows, n)
        lex = _lexical_lists(lexical, text.index, catalogue, pids, n) if lexical is not None else None
        return pids, text_dense, mm_dense, lex, text.probs[rows], multimodal.probs[mm_rows]

    def queries(gathered: tuple[Any, ...], weight: float) -> list[EvalQuery]:
        pids, text_dense, mm_dense, lex, text_probs, mm_probs = gathered
        dense = [fuse_dense([t, m], [1.0 - weight, weight]) for t, m in zip(text_dense, mm_dense)]
        return _eval_queries(pids, dense, lex, (1.0 - weight) * text_probs + weight * mm_probs, text.index, catalogue, ks)

    val = gather("val", False)
    if not len(val[0]):
        logger.warning("similar: no val listings, the fusion is not fitted; multimodal index only")
        return None
    configs = settings.candidate_configs(lexical is not None)
    best: tuple[float, float, RankingConfig] | None = None
    fit_table = []
    for weight in settings.similar_weights():
        cfg, table = fit(queries(val, weight), configs, settings.fit_metric, ks)
        value = max(row[settings.fit_metric] for row in table)
        fit_table.append({"photo_weight": weight, "rule": cfg.label(), settings.fit_metric: value})
        if best is None or value > best[0] + 1e-12:
            best = (value, weight, cfg)
    assert best is not None
    meta = text.index.metadata
    similar = SimilarConfig(best[1], best[2], (str(meta.model_name), str(meta.model_version)))
    logger.info("similar ranking chosen on val: %s", similar.label())
    entry["chosen"] = similar.to_dict() | {"fit_metric": settings.fit_metric}
    entry["val_fit"] = fit_table
    counts = {}
    for split_key, photos_only in (("test", False), ("test_with_photos", True)):
        gathered = gather("test", photos_only)
        counts[split_key] = len(gathered[0])
        text_only = evaluate(queries(gathered, 0.0), text_chosen, ks)
        entry[split_key] = {
            "dense (baseline)": entry[split_key]["dense (baseline)"],
            "multimodal index only (combined rule)": next(v for k, v in entry[split_key].items() if k.startswith("chosen")),
            "text ranking (text index only)": text_only,
            "chosen: " + similar.label(): evaluate(queries(gathered, similar.photo_weight), similar.config, ks),
        }
        if photos_only:
            entry["text_with_photos"] = {"text ranking (text index only)": text_only}
    entry["queries"] = counts
    return similar


def data_probs_by_index_row(data: KindData) -> np.ndarray:
    """The stored probabilities in the index's row order (the index is built from the same rows)."""
    if len(data.probs) != data.index.size:
        raise ValueError(f"{len(data.probs)} probability rows for an index of {data.index.size}")
    return data.probs


def headline(report: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Flat per-query-type numbers for retrieval.json / MLflow: chosen vs dense baseline on test."""
    out: dict[str, dict[str, float]] = {}
    for query_type, entry in report.items():
        for split_key in ("test", "test_with_photos", "text_with_photos"):
            table = entry.get(split_key)
            if not table:
                continue
            prefix = query_type if split_key == "test" else f"{query_type}_{split_key.replace('test_', '')}"
            chosen = next((v for name, v in table.items() if name.startswith("chosen")), None)
            base = table.get("dense (baseline)")
            if chosen is None or base is None:
                continue
            text_only = table.get("text ranking (text index only)")  # "more like this": the text ranking beside it
            flat = out.setdefault(prefix, {})
            for metric in ("precision@1", "precision@10", "ndcg@10"):
                key = metric.replace("@", "_at_")
                flat[f"ranked_{key}"] = float(chosen[metric])
                flat[f"dense_{key}"] = float(base[metric])
                if text_only is not None:
                    flat[f"text_ranking_{key}"] = float(text_only[metric])
    return out
