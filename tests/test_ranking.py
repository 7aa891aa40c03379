"""Ranking: BM25, score fusion, category re-ranking, graded relevance, weights fitted on val, saved files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline_steps.errors import ConfigError
from pipeline_steps.index import SimilarityIndex
from pipeline_steps.lexical import BM25Index, listing_text, tokenize
from pipeline_steps.ranking import (
    MissingRanking,
    Ranker,
    RankingConfig,
    RankingSettings,
    evaluate,
    graded_gains,
    ideal_dcg,
    make_candidates,
    path_codes,
    rank,
)
from pipeline_steps.ranking_eval import KindData, fit_and_report, headline

DOCS = [
    "makita cordless drill 18v with two batteries",
    "bosch hammer drill corded",
    "acoustic guitar yamaha with case",
    "electric guitar fender stratocaster",
    "pram and pushchair silver cross",
]


def test_tokenize_lowercases_strips_accents_and_short_tokens() -> None:
    assert tokenize("Café  A/B 5 x Déjà-vu!") == ["cafe", "5", "deja", "vu"]
    assert tokenize(None) == []
    assert listing_text("Drill", "cordless", title_weight=2) == "Drill Drill cordless"


def test_bm25_ranks_documents_sharing_rare_terms_first() -> None:
    bm25 = BM25Index.build(DOCS)
    rows, scores = bm25.top(bm25.query_terms(["cordless drill"]), 3)[0]
    assert rows[0] == 0 and rows[1] == 1  # both drills, the one with both terms first
    assert list(scores) == sorted(scores, reverse=True) and scores[-1] > 0
    assert len(bm25.top(bm25.query_terms(["zzz unknown"]), 3)[0][0]) == 0
    # a filter and per-query exclusions
    rows, _ = bm25.top(bm25.query_terms(["guitar"]), 5, allowed=np.array([1, 1, 0, 1, 1], bool))[0]
    assert list(rows) == [3]
    rows, _ = bm25.top(bm25.query_terms(["guitar"]), 5, exclude_rows=[[3]])[0]
    assert list(rows) == [2]
    # a document as the query finds itself first
    rows, _ = bm25.top(bm25.doc_terms([2]), 2)[0]
    assert rows[0] == 2


def test_bm25_scores_follow_the_documented_formula() -> None:
    """bm25s's Lucene BM25, as pipeline_steps/lexical.py documents it (the blend scales it by the best score)."""
    k1, b = 1.2, 0.75
    bm25 = BM25Index.build(DOCS, k1=k1, b=b)
    docs = [tokenize(d) for d in DOCS]
    avg = sum(map(len, docs)) / len(docs)
    for term in ("guitar", "drill"):
        df = sum(term in doc for doc in docs)
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        expected = [idf * doc.count(term) / (doc.count(term) + k1 * (1 - b + b * len(doc) / avg)) for doc in docs]
        np.testing.assert_allclose(bm25.scores(bm25.query_terms([term]))[0], expected, rtol=1e-5)
    assert bm25.meta["implementation"].startswith("bm25s ")


def test_bm25_save_load_round_trip(tmp_path) -> None:
    bm25 = BM25Index.build(DOCS, k1=1.5, b=0.5)
    loaded = BM25Index.load(bm25.save(tmp_path / "lex"))
    q = bm25.query_terms(["fender guitar"])
    np.testing.assert_allclose(bm25.scores(q), loaded.scores(loaded.query_terms(["fender guitar"])))
    assert loaded.meta["k1"] == 1.5


def test_graded_gains_and_ideal_dcg() -> None:
    codes = path_codes(["A / B / C", "A / B / D", "A / E", "F", "a/b/c"])
    gains = graded_gains(codes[:1], codes)
    assert gains.tolist() == [[3, 2, 1, 0, 3]]
    assert ideal_dcg(np.array([0, 1, 0, 2]), 2) == pytest.approx(7.0 + 7.0 / math.log2(3))
    assert ideal_dcg(np.array([5, 0, 0, 0]), 10) == 0.0


def _cands(dense, lexical, labels, proba):
    keys = [f"p{i}" for i in range(len(labels))]
    dk = [keys[i] for i, _ in dense]
    lk = [keys[i] for i, _ in lexical]
    return make_candidates(dk, [s for _, s in dense], lk, [s for _, s in lexical],
                           dict(zip(keys, labels)), np.asarray(proba))


def test_fusion_rules_and_category_term() -> None:
    # p0 dense-best, p1 lexical-best, p2 in both lists
    c = _cands([(0, 0.9), (2, 0.8), (3, 0.1)], [(1, 10.0), (2, 8.0)], [0, 1, 1, 0], [0.9, 0.1])
    dense = RankingConfig("dense", 0.0, 0.0)
    assert list(c.keys[rank(c, dense)[0]][:3]) == ["p0", "p2", "p3"]
    blend = RankingConfig("blend", 0.5, 0.0)
    assert c.keys[rank(c, blend)[0][0]] == "p2"  # good in both
    rrf = RankingConfig("rrf", 0.0, 0.0, rrf_k=1)
    assert c.keys[rank(c, rrf)[0][0]] == "p2"
    # a strong category term lifts the class-0 listings
    order, retrieval, category, final = rank(c, RankingConfig("blend", 0.5, 2.0))
    assert c.keys[order[0]] == "p0"
    np.testing.assert_allclose(final, retrieval + category)
    assert category[list(c.keys).index("p1")] == pytest.approx(2.0 * 0.1)


# A complete `index` section for RankingSettings.from_params (every key is required); the tests
# below change only what they are about.
BASE_RANKING = {
    "fusion": "auto", "fusion_grid": ["blend", "rrf"], "lexical_weight": "auto",
    "lexical_weight_grid": [0.0, 0.25, 0.5, 0.75], "category_weight": "auto", "category_weight_grid": [0.0, 0.3, 1.0],
    "neighbour_weight": "auto", "neighbour_weight_grid": [0.0], "neighbour_k": 10, "similar_photo_weight": "auto", "similar_photo_weight_grid": [0.0, 0.5], "n_candidates": 100, "rrf_k": 60,
    "fit_metric": "ndcg@10",
}
BASE_LEXICAL = {"k1": 1.2, "b": 0.75, "title_weight": 2, "min_df": 1}


def _index_section(**ranking: object) -> dict:
    return {"ranking": {**BASE_RANKING, **ranking}, "lexical": dict(BASE_LEXICAL)}


def test_config_checks_and_settings_grid() -> None:
    with pytest.raises(ConfigError):
        RankingConfig("bogus")
    with pytest.raises(ConfigError):
        RankingConfig("blend", 1.5)
    settings = RankingSettings.from_params(_index_section(fusion="auto", lexical_weight_grid=[0.0, 0.5],
                                                           category_weight_grid=[0.0, 1.0]))
    configs = settings.candidate_configs(has_lexical=True)
    assert {c.fusion for c in configs} == {"blend", "rrf"} and len(configs) == 2 * 2 + 2
    assert {c.fusion for c in settings.candidate_configs(has_lexical=False)} == {"dense"}
    fixed = RankingSettings.from_params(_index_section(fusion="rrf", category_weight=0.3))
    assert [(c.fusion, c.category_weight) for c in fixed.candidate_configs(True)] == [("rrf", 0.3)]
    with pytest.raises(ConfigError):
        RankingSettings.from_params(_index_section(fit_metric="mrr"))
    with pytest.raises(ConfigError, match="index.ranking.n_candidates"):
        RankingSettings.from_params({"ranking": {"fusion": "rrf"}, "lexical": BASE_LEXICAL})  # no hidden defaults


def _synthetic(n_per_class: int = 30, n_classes: int = 3, seed: int = 0):
    """Listings whose dense vectors are noisy class directions and whose texts share class words;
    the classifier's probabilities are informative but not perfect."""
    rng = np.random.default_rng(seed)
    words = [["drill", "saw", "hammer"], ["guitar", "piano", "drum"], ["pram", "cot", "toy"]]
    rows = []
    centres = rng.normal(size=(n_classes, 16))
    vectors, probs = [], []
    for label in range(n_classes):
        for i in range(n_per_class):
            pid = f"c{label}-{i}"
            split = ["train", "train", "val", "test"][i % 4]
            leaf = f"Leaf{i % 2}"
            rows.append({"product_id": pid, "product_name": f"{words[label][i % 3]} {i}",
                         "product_description": f"used {words[label][(i + 1) % 3]} good",
                         "category": f"Root{label}", "category_path": f"Root{label} / Sub / {leaf}",
                         "label": label, "split": split, "n_images": 1})
            vectors.append(centres[label] + 1.6 * rng.normal(size=16))
            p = np.full(n_classes, 0.1)
            p[label if rng.random() < 0.85 else (label + 1) % n_classes] = 0.8
            probs.append(p / p.sum())
    products = pd.DataFrame(rows)
    vectors = np.asarray(vectors, np.float32)
    ids = products[["product_id", "split", "label"]].assign(image_id=None)
    classes = [f"Root{i}" for i in range(n_classes)]
    return products, vectors, ids, np.asarray(probs, np.float32), classes


def test_fit_and_report_beats_dense_and_saves_a_loadable_ranker(tmp_path) -> None:
    products, vectors, ids, probs, classes = _synthetic()
    index = SimilarityIndex.build(vectors, ids[["product_id", "image_id"]], kind="text", factory="Flat",
                                  use_gpu=False, model_name="m", model_version="1")
    index.save(tmp_path / "text")
    settings = RankingSettings.from_params(_index_section(n_candidates=20))
    report = fit_and_report({"text": KindData(index, vectors, ids, probs, classes)}, products, settings,
                            index_dirs={"text": tmp_path / "text"})
    test = report["text"]["test"]
    chosen = next(v for k, v in test.items() if k.startswith("chosen"))
    assert chosen["ndcg@10"] > test["dense (baseline)"]["ndcg@10"]
    assert chosen["precision@10"] > test["dense (baseline)"]["precision@10"]
    assert report["text"]["chosen"]["category_weight"] > 0
    flat = headline(report)
    assert flat["text"]["ranked_precision_at_10"] == chosen["precision@10"]

    loaded = SimilarityIndex.load(tmp_path / "text")
    ranker = Ranker.load(tmp_path / "text", loaded.metadata.to_dict(), loaded.size)
    assert ranker.lexical is not None and ranker.probs.shape == (len(ids), len(classes))
    assert ranker.describe()["fusion"] == report["text"]["chosen"]["fusion"]
    # a ranking of another model version, or none at all, is refused (-> dense-only in the service)
    with pytest.raises(MissingRanking, match="re-run the index stage"):
        Ranker.load(tmp_path / "text", {**loaded.metadata.to_dict(), "model_version": "2"}, loaded.size)
    with pytest.raises(MissingRanking, match="without the ranking part"):
        Ranker.load(tmp_path / "nothing", loaded.metadata.to_dict(), loaded.size)


def test_evaluate_counts_missing_results_as_misses() -> None:
    from pipeline_steps.ranking import EvalQuery

    c = _cands([(0, 0.9)], [], [0], [1.0])
    q = EvalQuery(c, np.array([3], np.int8), {1: ideal_dcg(np.array([0, 0, 0, 5]), 1), 10: ideal_dcg(np.array([0, 0, 0, 5]), 10)})
    m = evaluate([q], RankingConfig("dense", 0.0, 0.0), ks=(1, 10))
    assert m["precision@1"] == 1.0 and m["precision@10"] == pytest.approx(0.1)
    assert m["ndcg@1"] == 1.0 and 0 < m["ndcg@10"] < 1


def test_product_id_checks() -> None:
    from service.ranking import check_product_id
    from service.request_validation import RequestError

    assert check_product_id(" abc-123 ") == "abc-123"
    for bad in (None, "", 12, "a" * 101, "../etc/passwd", "id with spaces"):
        with pytest.raises(RequestError) as err:
            check_product_id(bad)
        assert err.value.status == 400


def test_neighbour_vote_lifts_the_category_of_the_best_retrieved() -> None:
    from pipeline_steps.ranking import neighbour_share

    # p0, p1 (class 1) retrieved best; p2 (class 0) and p3 (class 1) further down; the classifier is unsure
    c = _cands([(0, 0.9), (1, 0.85), (2, 0.5), (3, 0.45)], [], [1, 1, 0, 1], [0.5, 0.5])
    retrieval = rank(c, RankingConfig("dense", 0.0, 0.0))[1]
    share = neighbour_share(c, retrieval, k=2)
    np.testing.assert_allclose(share, [1.0, 1.0, 0.0, 1.0])
    order = rank(c, RankingConfig("dense", 0.0, 0.0, neighbour_weight=1.0, neighbour_k=2))[0]
    assert list(c.keys[order]) == ["p0", "p1", "p3", "p2"]
    cache: dict = {}
    first = rank(c, RankingConfig("dense", 0.0, 0.5, neighbour_weight=1.0, neighbour_k=2), cache)
    again = rank(c, RankingConfig("dense", 0.0, 0.5, neighbour_weight=1.0, neighbour_k=2), cache)
    np.testing.assert_allclose(first[3], again[3])


def test_index_stage_ranking_task_writes_ranking_files_metrics_and_an_mlflow_run(tmp_path, monkeypatch) -> None:
    """flows/ranking_step.py on what the index stage leaves behind (stores, indexes, clean products)."""

    import mlflow

    from flows import ranking_step
    from pipeline_steps.config import load_params
    from pipeline_steps.embeddings import save_embeddings

    products, vectors, ids, probs, classes = _synthetic()
    params = load_params()
    params["data"]["clean_dir"] = str(tmp_path / "clean")
    params["index"].update(dir=str(tmp_path / "index"), embeddings_dir=str(tmp_path / "emb"))
    params["index"]["ranking"].update(n_candidates=20)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "clean").mkdir()
    products.to_parquet(tmp_path / "clean" / "products.parquet", index=False)
    models = {}
    for kind in ("text", "multimodal"):
        save_embeddings(tmp_path / "emb" / f"{kind}.parquet", vectors, ids, "k")
        save_embeddings(ranking_step.probs_path(params, kind), probs, ids, "k")
        SimilarityIndex.build(vectors, ids[["product_id", "image_id"]], kind=kind, factory="Flat", use_gpu=False,
                              model_name=f"m-{kind}", model_version="3").save(tmp_path / "index" / kind)
        model_dir = tmp_path / "models" / kind
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(json.dumps({"classes": classes}))
        models[kind] = (str(model_dir), f"m-{kind}", "3")
    out = ranking_step.ranking_task.fn(models, params, {})
    report = out["ranking"]["report"]
    assert {"text", "combined", "similar"} <= set(report)
    assert "text_with_photos" in report["similar"]
    assert out["ranking"]["headline"]["text"]["ranked_ndcg_at_10"] >= out["ranking"]["headline"]["text"]["dense_ndcg_at_10"]
    for kind in ("text", "multimodal"):
        saved = json.loads((tmp_path / "index" / kind / "ranking" / "ranking.json").read_text())
        assert saved["model_version"] == "3" and saved["config"]["chosen_on"] == "val"
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.step = 'ranking'")
    assert len(runs) == 1 and "metrics.text.ranked_precision_at_10" in runs.columns


def test_fuse_dense_weights_the_union_and_floors_missing_scores() -> None:
    from pipeline_steps.ranking import fuse_dense

    text = (["a", "b", "c"], [0.9, 0.8, 0.5])
    photo = (["c", "d"], [0.95, 0.6])
    keys, scores = fuse_dense([text], [1.0])
    assert keys == ["a", "b", "c"] and scores.tolist() == pytest.approx([0.9, 0.8, 0.5])
    # a weight of 0 adds nothing: not even the other list's candidates
    keys, scores = fuse_dense([text, photo], [1.0, 0.0])
    assert keys == ["a", "b", "c"]
    keys, scores = fuse_dense([text, photo], [0.5, 0.5])
    fused = dict(zip(keys, scores))
    assert fused["c"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.95)   # in both lists
    assert fused["a"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.6)    # missing from the photo list: its lowest score
    assert fused["d"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.6)    # missing from the text list: its lowest score
    assert keys[0] == "a" and list(scores) == sorted(scores, reverse=True)
    with pytest.raises(ValueError):
        fuse_dense([text], [0.5, 0.5])


def test_similar_fuses_text_and_photos_fitted_on_val_and_saved_with_the_multimodal_index(tmp_path) -> None:
    """The photo side carries category evidence the text lacks: the fitted fusion uses it, never does
    worse on val than the text ranking alone (weight 0 is in the grid), and is saved for the service."""
    from pipeline_steps.ranking import SimilarConfig

    products, text_vectors, ids, text_probs, classes = _synthetic(seed=1)
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(len(classes), 16))
    photo_vectors = (centres[products["label"].to_numpy()] + 0.8 * rng.normal(size=(len(products), 16))).astype(np.float32)
    mm_vectors = np.hstack([text_vectors, 2.0 * photo_vectors]).astype(np.float32)
    mm_probs = np.full_like(text_probs, 0.05)
    mm_probs[np.arange(len(products)), products["label"].to_numpy()] = 0.9
    kinds, dirs = {}, {}
    for kind, vectors, probs in (("text", text_vectors, text_probs), ("multimodal", mm_vectors, mm_probs)):
        index = SimilarityIndex.build(vectors, ids[["product_id", "image_id"]], kind=kind, factory="Flat",
                                      use_gpu=False, model_name=f"m-{kind}", model_version="4")
        dirs[kind] = tmp_path / kind
        index.save(dirs[kind])
        kinds[kind] = KindData(index, vectors, ids, probs, classes)
    settings = RankingSettings.from_params(_index_section(n_candidates=20, similar_photo_weight_grid=[0.0, 0.5, 0.8]))
    report = fit_and_report(kinds, products, settings, index_dirs=dirs)

    similar = report["similar"]
    fitted = {row["photo_weight"]: row["ndcg@10"] for row in similar["val_fit"]}
    assert set(fitted) == {0.0, 0.5, 0.8}
    assert similar["chosen"]["photo_weight"] > 0 and fitted[similar["chosen"]["photo_weight"]] >= fitted[0.0]
    test = similar["test_with_photos"]
    chosen = next(v for k, v in test.items() if k.startswith("chosen"))
    assert chosen["ndcg@10"] > test["text ranking (text index only)"]["ndcg@10"]
    assert {"dense (baseline)", "multimodal index only (combined rule)"} <= set(test)
    assert headline(report)["similar_with_photos"]["text_ranking_ndcg_at_10"] == test["text ranking (text index only)"]["ndcg@10"]

    saved = json.loads((dirs["multimodal"] / "ranking" / "ranking.json").read_text())
    spec = SimilarConfig.from_dict(saved["similar"])
    assert spec.text_model == ("m-text", "4") and spec.photo_weight == similar["chosen"]["photo_weight"]
    assert json.loads((dirs["text"] / "ranking" / "ranking.json").read_text())["similar"] is None
