"""Tests for pipeline_steps.embeddings: batching, and the on-disk cache keyed by model version + data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline_steps.embeddings import (
    CacheKey,
    EmbeddingStore,
    embed_in_batches,
    fingerprint,
    load_if_fresh,
    read_metadata,
)
from pipeline_steps.errors import DataValidationError


def fake_embed(batch: list[int]) -> np.ndarray:
    """A deterministic 'model': item i -> [i, 2i, 3i] (float64, to check the float32 cast)."""
    return np.array([[i, 2 * i, 3 * i] for i in batch], dtype=np.float64)


def test_embed_in_batches_shapes_order_and_dtype():
    calls: list[int] = []

    def embed(batch):
        calls.append(len(batch))
        return fake_embed(batch)

    out = embed_in_batches(embed, range(10), batch_size=4, desc="test", progress=False)
    assert calls == [4, 4, 2]
    assert out.dtype == np.float32 and out.shape == (10, 3)
    np.testing.assert_array_equal(out[:, 0], np.arange(10))
    assert embed_in_batches(embed, [], batch_size=4, dim=3, progress=False).shape == (0, 3)


def test_embed_in_batches_rejects_broken_models():
    with pytest.raises(DataValidationError, match="shape"):
        embed_in_batches(lambda b: np.zeros((len(b) - 1, 3)), range(5), batch_size=5, progress=False)
    with pytest.raises(DataValidationError, match="width"):
        embed_in_batches(lambda b: np.zeros((len(b), 3 if b[0] == 0 else 4)), range(4), batch_size=2, progress=False)
    with pytest.raises(DataValidationError, match="NaN"):
        embed_in_batches(lambda b: np.full((len(b), 3), np.nan), range(2), batch_size=2, progress=False)
    with pytest.raises(ValueError):
        embed_in_batches(fake_embed, range(2), batch_size=0, progress=False)


def _data() -> tuple[pd.DataFrame, np.ndarray]:
    ids = pd.DataFrame({
        "product_id": ["p1", "p1", "p2"],
        "image_id": ["i1", "i2", None],
        "split": ["train", "train", "test"],
        "label": [0, 0, 3],
    })
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    return ids, vectors


def test_store_round_trip_keeps_vectors_ids_and_key(tmp_path):
    ids, vectors = _data()
    key = CacheKey("marketplace-image-classifier", "3", fingerprint(ids))
    store = EmbeddingStore(tmp_path / "emb" / "image.parquet")
    store.save(vectors, ids, key)
    loaded = store.load()
    np.testing.assert_array_equal(loaded.vectors, vectors)
    assert loaded.vectors.dtype == np.float32
    pd.testing.assert_frame_equal(loaded.ids, ids)
    meta = read_metadata(store.path)
    assert meta["cache_key"]["digest"] == key.digest == loaded.cache_key
    assert meta["cache_key"]["model_version"] == "3" and meta["dim"] == 4 and meta["count"] == 3
    assert [p.name for p in store.path.parent.iterdir()] == ["image.parquet"]  # no temp file left behind


def test_store_freshness_reuses_same_key_and_recomputes_on_change(tmp_path):
    ids, vectors = _data()
    store = EmbeddingStore(tmp_path / "text.parquet")
    computed: list[str] = []

    def compute(tag: str):
        def run():
            computed.append(tag)
            return vectors + len(computed), ids
        return run

    v1 = CacheKey("marketplace-text-classifier", "1", fingerprint(ids))
    first, reused = store.get_or_compute(v1, compute("v1"))
    assert not reused
    again, reused = store.get_or_compute(CacheKey("marketplace-text-classifier", "1", fingerprint(ids.copy())),
                                         compute("v1-again"))
    assert reused and computed == ["v1"]
    np.testing.assert_array_equal(again.vectors, first.vectors)

    v2 = CacheKey("marketplace-text-classifier", "2", fingerprint(ids))  # new model version
    assert store.load_if_fresh(v2) is None
    _, reused = store.get_or_compute(v2, compute("v2"))
    assert not reused and computed == ["v1", "v2"]
    assert load_if_fresh(store.path, v2) is not None and load_if_fresh(store.path, v1) is None

    changed = ids.assign(label=[0, 1, 3])  # same model, different data
    assert store.load_if_fresh(CacheKey("marketplace-text-classifier", "2", fingerprint(changed))) is None


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    ids, _ = _data()
    assert fingerprint(ids) == fingerprint(ids.copy())
    assert fingerprint(ids) != fingerprint(ids.iloc[::-1])  # row order maps rows to vectors
    assert fingerprint(ids) != fingerprint(ids.rename(columns={"label": "y"}))
    image = tmp_path / "x.jpg"
    image.write_bytes(b"abc")
    before = fingerprint(image)
    image.write_bytes(b"abd")
    assert fingerprint(image) != before
    assert CacheKey("m", "1", "f").digest != CacheKey("m", "1", "f", extra={"pooling": "mean"}).digest


def test_missing_or_corrupt_cache_means_recompute(tmp_path):
    assert load_if_fresh(tmp_path / "nope.parquet", "k") is None
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    assert load_if_fresh(junk, "k") is None


def test_save_rejects_mismatched_rows(tmp_path):
    ids, vectors = _data()
    with pytest.raises(DataValidationError, match="3 vectors but 2 id rows"):
        EmbeddingStore(tmp_path / "e.parquet").save(vectors, ids.iloc[:2], "k")
    with pytest.raises(DataValidationError, match="reserved"):
        EmbeddingStore(tmp_path / "e.parquet").save(vectors, ids.assign(vector=1), "k")


def test_embed_in_batches_refuses_a_dataframe():
    with pytest.raises(TypeError, match="DataFrame"):
        embed_in_batches(fake_embed, pd.DataFrame({"a": [1, 2]}), batch_size=2, progress=False)
