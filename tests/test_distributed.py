"""Sharded embedding + indexing on a real Dask LocalCluster (2 worker processes, through prefect-dask's
DaskTaskRunner) equals the single-process result: same vectors, same ids, same index contents."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flows.common import load_params
from pipeline_steps import sharding

pytest.importorskip("prefect_dask", reason="prefect-dask is not installed (pip install -e '.[team]')")


def _photos(folder, n=40, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 255, size=(int(rng.integers(40, 90)), int(rng.integers(40, 90)), 3), dtype=np.uint8)
        path = folder / f"img{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        rows.append({"image_id": f"img{i}", "product_id": f"p{i // 2}", "path": str(path)})
    return pd.DataFrame(rows)


def _settings(tmp_path, factory="Flat"):
    return load_params(None, [
        "train.image.input_size=48", "train.num_threads=1", "index.batch_size=8", f"index.factory={factory}",
        "distributed.shard_size=16", "distributed.n_workers=2", "distributed.threads_per_worker=1",
        f"distributed.work_dir={tmp_path / 'dist'}",
    ])


def test_plan_shards_fall_on_batch_boundaries():
    shards = sharding.plan_shards(40, 12, 8)
    assert [(s.start, s.stop) for s in shards] == [(0, 16), (16, 32), (32, 40)]
    assert sharding.plan_shards(0, 5) == []


@pytest.mark.integration
def test_dask_sharded_embedding_and_index_equal_single_process(tmp_path):
    import faiss
    import torch

    from flows.distributed_index import run_on_dask

    rows = _photos(tmp_path / "photos", n=24)
    settings = _settings(tmp_path)
    threads = torch.get_num_threads()
    try:  # the single-process reference: one embedder over all photos, one index
        single = sharding.image_embedder(settings)(rows["path"].tolist())
    finally:
        torch.set_num_threads(threads)
    single_index = sharding.fill_shard_index(sharding.empty_index(single, "Flat"), single)

    summary = run_on_dask(settings, rows)
    work = tmp_path / "dist"
    assert summary["shards"] == 2 and summary["rows"] == 24  # one shard per worker
    vectors, ids = sharding.merge_shards(
        [{"shard": i, "vectors": str(p), "ids": str(p.with_suffix(".parquet"))}
         for i, p in enumerate(sorted((work / "shards").glob("shard-*.npy")))])
    np.testing.assert_array_equal(vectors, single)
    pd.testing.assert_frame_equal(ids, rows.drop(columns=["path"]))
    pd.testing.assert_frame_equal(pd.read_parquet(work / "ids.parquet"), rows.drop(columns=["path"]))
    merged = faiss.read_index(str(work / "index.faiss"))
    assert merged.ntotal == single_index.ntotal == 24
    np.testing.assert_array_equal(merged.reconstruct_n(0, 24), single_index.reconstruct_n(0, 24))
    queries = sharding.fill_shard_index(sharding.empty_index(single, "Flat"), single[:5]).reconstruct_n(0, 5)
    d1, i1 = merged.search(queries, 5)
    d2, i2 = single_index.search(queries, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_sharded_ivf_and_hnsw_equal_single_index():
    """Merged IVF shards hold exactly the single index's lists; HNSW shards answer through IndexShards."""
    import faiss

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    trained = sharding.empty_index(x, "IVF16,Flat", seed=0)
    single = sharding.fill_shard_index(trained, x)
    parts = [sharding.fill_shard_index(trained, x[s.start:s.stop]) for s in sharding.plan_shards(len(x), 1000)]
    merged = sharding.merge_indexes(parts)
    for index in (single, merged):
        faiss.extract_index_ivf(index).nprobe = 4
    q = x[:20]
    np.testing.assert_array_equal(single.search(q, 10)[1], merged.search(q, 10)[1])
    inv_a, inv_b = faiss.extract_index_ivf(single).invlists, faiss.extract_index_ivf(merged).invlists
    assert all(inv_a.list_size(i) == inv_b.list_size(i) for i in range(16))

    hnsw_parts = [sharding.fill_shard_index(sharding.empty_index(x, "HNSW16"), x[s.start:s.stop])
                  for s in sharding.plan_shards(len(x), 1500)]
    combined = sharding.merge_indexes(hnsw_parts)
    assert isinstance(combined, faiss.IndexShards) and combined.ntotal == len(x)
    found = combined.search(sharding.fill_shard_index(sharding.empty_index(x, "Flat"), q).reconstruct_n(0, 20), 1)[1]
    assert (found[:, 0] == np.arange(20)).mean() >= 0.95  # each vector finds itself across shards
