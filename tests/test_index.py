"""Tests for pipeline_steps.index: building, searching, filtering, saving and refusing stale indexes."""

from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pandas as pd
import pytest

from pipeline_steps.errors import ConfigError, DataValidationError
from pipeline_steps.index import (
    IndexMismatchError,
    IndexSettings,
    SimilarityIndex,
    build_index,
    effective_factory,
    normalise_rows,
)
from pipeline_steps.retrieval import recall_at_k_vs_exact


def clustered(n: int, dim: int = 32, n_clusters: int = 20, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    """A Gaussian mixture: neighbours are meaningful, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    assign = rng.integers(0, n_clusters, size=n)
    return (centers[assign] + spread * rng.normal(size=(n, dim))).astype(np.float32)


def ids_for(n: int) -> pd.DataFrame:
    return pd.DataFrame({"product_id": [f"p{i}" for i in range(n)], "image_id": [f"i{i}" for i in range(n)]})


def test_exact_search_returns_the_vector_itself_first():
    x = clustered(500)
    index = SimilarityIndex.build(x, ids_for(500), kind="text", factory="Flat", use_gpu=False)
    hits = index.search(x[:50], k=3)
    assert [h[0].row for h in hits] == list(range(50))
    assert [h[0].product_id for h in hits] == [f"p{i}" for i in range(50)]
    assert all(h[0].score == pytest.approx(1.0, abs=1e-5) for h in hits)
    assert all(h[0].score >= h[1].score >= h[2].score for h in hits)


def test_cosine_normalises_copies_and_ignores_scale():
    x = clustered(200, dim=16)
    original = x.copy()
    index = build_index(x, "Flat", metric="cosine", use_gpu=False)
    np.testing.assert_array_equal(x, original)  # the caller's array is untouched
    stored = index.reconstruct_n(0, 200)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, rtol=1e-5)
    # A query scaled by 1000 finds the same neighbour with the same cosine score.
    scores_a, rows_a = index.search(normalise_rows(x[:5]), 1)
    si = SimilarityIndex(index, ids_for(200), _meta(index))
    scores_b, rows_b = si.search_raw(1000.0 * x[:5], 1)
    np.testing.assert_array_equal(rows_a, rows_b)
    np.testing.assert_allclose(scores_a, scores_b, rtol=1e-5)
    # Score is a true cosine: compare against numpy for one pair.
    a, b = x[0], x[1]
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    si_scores, si_rows = si.search_raw(a, 200)
    assert si_scores[0][list(si_rows[0]).index(1)] == pytest.approx(cos, abs=1e-5)


def test_normalise_rows_keeps_zero_rows_zero():
    x = np.array([[0, 0, 0], [3, 4, 0]], dtype=np.float32)
    out = normalise_rows(x)
    np.testing.assert_allclose(out, [[0, 0, 0], [0.6, 0.8, 0]])


def _meta(index: faiss.Index):
    from pipeline_steps.index import IndexMetadata

    return IndexMetadata(kind="text", factory="Flat", dim=index.d, size=index.ntotal,
                         model_name="m", model_version="1", built_at="now")


@pytest.mark.parametrize(("factory", "params"), [("IVF16,Flat", {"nprobe": 8}), ("HNSW32", {"ef_search": 64})])
def test_approximate_indexes_recall_vs_flat(factory, params):
    x = clustered(3000, dim=32, n_clusters=30, seed=1)
    queries = clustered(200, dim=32, n_clusters=30, seed=1)  # same centres, fresh points
    ids = ids_for(3000)
    exact = SimilarityIndex.build(x, ids, kind="text", factory="Flat", use_gpu=False)
    approx = SimilarityIndex.build(x, ids, kind="text", factory=factory, use_gpu=False, **params)
    assert approx.metadata.factory == factory
    assert recall_at_k_vs_exact(approx, exact, queries, k=10) > 0.9


def test_nprobe_and_ef_search_are_applied():
    x = clustered(2000)
    ivf = build_index(x, "IVF16,Flat", nprobe=5, use_gpu=False)
    assert faiss.extract_index_ivf(ivf).nprobe == 5
    hnsw = build_index(x, "HNSW16", ef_search=77, use_gpu=False)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 77


def test_ef_construction_reaches_every_hnsw_graph_and_travels_with_a_saved_index(tmp_path):
    from pipeline_steps.index import IndexSettings, hnsw_graphs
    from pipeline_steps import sharding

    x = clustered(600)
    assert faiss.downcast_index(build_index(x, "HNSW16", use_gpu=False)).hnsw.efConstruction == 40  # FAISS's default
    for factory in ("HNSW16", "PCA16,HNSW16,RFlat", "IVF8_HNSW16,Flat"):
        graphs = hnsw_graphs(build_index(x, factory, use_gpu=False, ef_construction=123))
        assert graphs and {g.efConstruction for g in graphs} == {123}, factory
    params = {"index": {"dir": "x", "kinds": ["text"], "factory": "HNSW16", "nprobe": 8, "ef_search": 32,
                        "ef_construction": 77, "batch_size": 8, "use_gpu": False, "eval_k": [10]}}
    built = SimilarityIndex.from_settings(x, ids_for(600), IndexSettings.from_params(params), kind="text",
                                          model_name="m", model_version="1")
    built.save(tmp_path / "hnsw")
    assert faiss.downcast_index(SimilarityIndex.load(tmp_path / "hnsw").index).hnsw.efConstruction == 77
    # the Dask path: the trained empty index carries it to every shard's copy
    shard = sharding.fill_shard_index(sharding.empty_index(x, "HNSW16", ef_construction=55), x[:50])
    assert faiss.downcast_index(shard).hnsw.efConstruction == 55


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_an_index_filled_over_shards_and_merged_is_the_index_built_at_once(factory):
    """What the index stage does on Dask (flows/index.py `_fill_indexes`) for types that merge."""
    from pipeline_steps import sharding
    from pipeline_steps.index import IndexSettings

    x, ids = clustered(800), ids_for(800)
    params = {"index": {"dir": "x", "kinds": ["text"], "factory": factory, "nprobe": 4, "ef_search": 32,
                        "ef_construction": 40, "batch_size": 8, "use_gpu": False, "eval_k": [10]}}
    settings = IndexSettings.from_params(params)
    alone = SimilarityIndex.from_settings(x, ids, settings, kind="text", model_name="m", model_version="1")
    trained = sharding.empty_index(x, factory, None, ef_construction=40)
    assert sharding.merges_into_one(trained)
    parts = [sharding.fill_shard_index(trained, x[start:start + 300]) for start in range(0, 800, 300)]
    merged = SimilarityIndex.from_filled(sharding.merge_indexes(parts), ids, settings, kind="text", model_name="m", model_version="1")
    assert faiss.serialize_index(merged.index).tobytes() == faiss.serialize_index(alone.index).tobytes()
    assert (merged.metadata.factory, merged.metadata.nprobe) == (alone.metadata.factory, alone.metadata.nprobe)
    # graph or wrapped types do not merge into one index: the stage builds those in one process
    assert not sharding.merges_into_one(sharding.empty_index(x, "HNSW16"))
    assert not sharding.merges_into_one(sharding.empty_index(x, "PCA8,Flat"))


def test_ivf_with_too_few_vectors_lowers_nlist_then_falls_back_to_flat(caplog):
    assert effective_factory("IVF256,Flat", 100_000) == "IVF256,Flat"
    with caplog.at_level(logging.WARNING, logger="pipeline_steps.index"):
        assert effective_factory("IVF256,Flat", 500) == "IVF12,Flat"
        assert effective_factory("IVF4096_HNSW32,PQ8", 1000) == "IVF25_HNSW32,PQ8"
        assert effective_factory("IVF64,Flat", 20) == "Flat"
    assert "lowering nlist" in caplog.text and "Flat" in caplog.text
    index = SimilarityIndex.build(clustered(500), ids_for(500), kind="image", factory="IVF256,Flat", use_gpu=False)
    assert index.metadata.factory == "IVF12,Flat"
    assert index.metadata.requested_factory == "IVF256,Flat"
    assert index.size == 500


def test_unknown_factory_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="index.factory"):
        build_index(clustered(100), "NotAnIndex42", use_gpu=False)
    with pytest.raises(ConfigError, match="index.factory"):
        build_index(clustered(100, dim=30), "PQ7", use_gpu=False)  # 7 does not divide 30


def test_use_gpu_true_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(ConfigError, match="index.use_gpu"):
        build_index(clustered(100), "Flat", use_gpu=True)
    index = build_index(clustered(100), "Flat", use_gpu="auto")  # auto quietly stays on the CPU
    assert index.ntotal == 100


def test_bad_inputs_rejected():
    with pytest.raises(DataValidationError):
        build_index(np.zeros((0, 8), dtype=np.float32), "Flat", use_gpu=False)
    bad = clustered(10)
    bad[3, 2] = np.nan
    with pytest.raises(DataValidationError, match="NaN"):
        build_index(bad, "Flat", use_gpu=False)
    with pytest.raises(DataValidationError):
        SimilarityIndex.build(clustered(10), ids_for(9), kind="text", use_gpu=False)
    index = SimilarityIndex.build(clustered(10), ids_for(10), kind="text", use_gpu=False)
    with pytest.raises(DataValidationError, match="dim"):
        index.search(np.ones((1, 5), dtype=np.float32), 3)


def test_save_load_round_trip(tmp_path):
    x = clustered(800)
    ids = ids_for(800).assign(category=["a", "b"] * 400)
    built = SimilarityIndex.build(x, ids, kind="image", factory="IVF8,Flat", nprobe=3, use_gpu=False,
                                  model_name="marketplace-image-classifier", model_version=4)
    target = tmp_path / "index" / "image"
    built.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["ids.parquet", "index.faiss", "index.json"]
    meta = json.loads((target / "index.json").read_text())
    for key in ("kind", "factory", "dim", "size", "model_name", "model_version", "built_at"):
        assert key in meta
    assert meta["model_version"] == "4" and meta["size"] == 800 and meta["dim"] == 32

    loaded = SimilarityIndex.load(target, expected_model=("marketplace-image-classifier", "4"), use_gpu=False)
    assert faiss.extract_index_ivf(loaded.index).nprobe == 3
    pd.testing.assert_frame_equal(loaded.ids, built.ids)
    assert loaded.metadata == built.metadata
    assert loaded.search(x[:20], 5) == built.search(x[:20], 5)

    built.save(target)  # overwriting an existing directory works (atomic swap)
    assert SimilarityIndex.load(target, use_gpu=False).size == 800
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_model_version_mismatch_is_refused(tmp_path):
    built = SimilarityIndex.build(clustered(50), ids_for(50), kind="text", use_gpu=False,
                                  model_name="marketplace-text-classifier", model_version="2")
    built.save(tmp_path / "text")
    with pytest.raises(IndexMismatchError, match="version '2'.*version '3'"):
        SimilarityIndex.load(tmp_path / "text", expected_model=("marketplace-text-classifier", 3))
    with pytest.raises(IndexMismatchError):
        SimilarityIndex.load(tmp_path / "text", expected_model=("marketplace-image-classifier", 2))
    assert SimilarityIndex.load(tmp_path / "text", expected_model=("marketplace-text-classifier", 2)).size == 50


def test_load_rejects_incomplete_directory(tmp_path):
    SimilarityIndex.build(clustered(20), ids_for(20), kind="text", use_gpu=False).save(tmp_path / "t")
    (tmp_path / "t" / "ids.parquet").unlink()
    with pytest.raises(DataValidationError, match="ids.parquet"):
        SimilarityIndex.load(tmp_path / "t")


def _toy_index() -> tuple[SimilarityIndex, np.ndarray]:
    """Six photos of four products in two categories, on a line so the order is known."""
    angles = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    ids = pd.DataFrame({
        "product_id": ["A", "A", "B", "C", "C", "D"],
        "image_id": ["a1", "a2", "b1", "c1", "c2", "d1"],
        "category": ["cars", "cars", "home", "cars", "cars", "home"],
    })
    return SimilarityIndex.build(x, ids, kind="image", factory="Flat", use_gpu=False), x


def test_category_filter_and_own_product_exclusion():
    index, x = _toy_index()
    q = x[:1]  # photo a1
    assert [h.image_id for h in index.search(q, 3)[0]] == ["a1", "a2", "b1"]
    assert [h.image_id for h in index.search(q, 3, exclude_product_ids=["A"])[0]] == ["b1", "c1", "c2"]
    assert [h.image_id for h in index.search(q, 3, category="home")[0]] == ["b1", "d1"]  # only two exist
    assert [h.image_id for h in index.search(q, 3, exclude_product_ids=["A"], category="cars")[0]] == ["c1", "c2"]
    assert [h.image_id for h in index.search(q, 2, filter_fn=lambda ids: ids["image_id"].str.endswith("2"))[0]] == [
        "a2", "c2"]
    # A set applies to every query; a sequence is one entry per query.
    both = index.search(x[[0, 5]], 1, exclude_product_ids=[{"A", "B"}, "D"])
    assert [h[0].image_id for h in both] == ["c1", "c2"]
    assert [h[0].product_id for h in index.search(x[[0, 5]], 1, exclude_product_ids={"A", "D"})] == ["B", "C"]
    with pytest.raises(ValueError, match="one per query"):
        index.search(x[[0, 5]], 1, exclude_product_ids=["A"])


def test_over_fetch_reaches_beyond_the_first_batch():
    """A filter that keeps only far-away rows still yields k hits (re-asks FAISS with more)."""
    x = clustered(2000, seed=3)
    ids = ids_for(2000).assign(category=["rare" if i % 97 == 0 else "common" for i in range(2000)])
    index = SimilarityIndex.build(x, ids, kind="text", use_gpu=False)
    hits = index.search(x[:10], 10, category="rare")
    assert all(len(h) == 10 for h in hits)
    assert all(index.ids.loc[hit.row, "category"] == "rare" for h in hits for hit in h)
    # Same as a brute-force answer over the rare rows only.
    rare_rows = np.flatnonzero(ids["category"] == "rare")
    xn = normalise_rows(x)
    expected = rare_rows[np.argsort(-(xn[:10] @ xn[rare_rows].T), axis=1)[:, :10]]
    assert [[hit.row for hit in h] for h in hits] == expected.tolist()


def test_unique_products_collapses_photos():
    index, x = _toy_index()
    hits = index.search(x[:1], 3, unique_products=True)[0]
    assert [(h.product_id, h.image_id) for h in hits] == [("A", "a1"), ("B", "b1"), ("C", "c1")]
    hits = index.search(x[1:2], 3, unique_products=True, exclude_product_ids=["A"])[0]
    assert [h.product_id for h in hits] == ["B", "C", "D"]


def test_text_index_without_image_ids_gives_none():
    index = SimilarityIndex.build(clustered(10), pd.DataFrame({"product_id": range(10)}), kind="text", use_gpu=False)
    assert index.search(clustered(10)[:1], 1)[0][0].image_id is None


def test_settings_from_params():
    from pipeline_steps.config import load_params

    settings = IndexSettings.from_params(load_params())
    assert settings.factory and settings.nprobe >= 1 and settings.use_gpu in ("auto", True, False)
    assert IndexSettings.from_params(load_params()["index"]) == settings  # the section alone works too
    with pytest.raises(ConfigError, match="index.use_gpu"):
        IndexSettings.from_params({"index": {**load_params()["index"], "use_gpu": "maybe"}})


def test_exclusions_accept_arrays_and_metadata_versions_are_strings(tmp_path):
    index, x = _toy_index()
    hits = index.search(x[[0, 5]], 1, exclude_product_ids=np.array(["A", "D"], dtype=object))
    assert [h[0].product_id for h in hits] == ["B", "C"]
    with pytest.raises(TypeError):
        index.search(x[:1], 1, exclude_product_ids="A")  # ambiguous: a string is not one entry per query
    index.metadata.model_name, index.metadata.model_version = "m", "7"
    index.save(tmp_path / "i")
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    meta["model_version"] = 7  # hand-edited / written by another tool as a number
    (tmp_path / "i" / "index.json").write_text(json.dumps(meta))
    assert SimilarityIndex.load(tmp_path / "i", expected_model=("m", "7"), use_gpu=False).metadata.model_version == "7"
