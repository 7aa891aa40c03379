"""The index stage's champion-model pass over shards on a real Dask LocalCluster (2 worker processes,
through prefect-dask's DaskTaskRunner; `distributed.index_on_dask`) equals the single-process pass:
the same embeddings, class probabilities and ids for every kind, stored under the same cache key,
and the same index built from them.

The models are the tiny bundle's real ones (tests/support/tiny_bundle.py: image, text, multimodal
trained for an epoch on 30 products / 39 photos); shards of 16 rows with batches of 8, so every kind
has several shards and a short last one, and the multimodal model sees products without photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.common import load_params
from pipeline_steps import inference, sharding
from pipeline_steps.index import IndexSettings, SimilarityIndex
from pipeline_steps.model_kinds import INDEX_KINDS

pytest.importorskip("prefect_dask", reason="prefect-dask is not installed (pip install -e '.[team]')")

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

BATCH = 8


@pytest.fixture(scope="module")
def tiny_work(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle's models, clean data and feature cache (the shared cache is rebuilt,
    and its old folder removed, when the code changes: the Dask workers read these files later)."""
    import shutil

    source = Path(bundle_dir).parent
    if not all((source / "models" / kind / "model.pt").is_file() for kind in INDEX_KINDS) or not (source / "clean").is_dir():
        pytest.skip("the tiny bundle's models and clean data are not next to MARKETPLACE_TEST_BUNDLE")
    work = tmp_path_factory.mktemp("tiny_work")
    for name in ("models", "clean", "features"):
        if (source / name).is_dir():
            shutil.copytree(source / name, work / name, ignore=shutil.ignore_patterns("checkpoints"))
    return work


def _settings(work: Path, tmp_path: Path) -> dict:
    # an empty feature cache: every photo goes through the backbone (in the shard tasks), the hard case
    return load_params(None, [
        f"data.clean_dir={work / 'clean'}", f"train.image.features_dir={tmp_path / 'no-features'}",
        f"index.embeddings_dir={tmp_path / 'embeddings'}", f"index.batch_size={BATCH}", "index.factory=Flat",
        "index.use_gpu=false", "train.num_threads=1",
        "distributed.index_on_dask=true", "distributed.shard_size=16", "distributed.n_workers=2",
        "distributed.threads_per_worker=1", f"distributed.work_dir={tmp_path / 'dist'}",
    ])


def _single_process(work: Path, kind: str, features: Path) -> inference.SplitPrediction:
    """What index_task computes without Dask."""
    classifier = inference.load_classifier(work / "models" / kind, batch_size=BATCH)
    return inference.predict_split(classifier, work / "clean", None, progress=False, feature_cache_dir=features)


def _index(vectors: np.ndarray, ids: pd.DataFrame, settings: dict, kind: str) -> SimilarityIndex:
    return SimilarityIndex.from_settings(vectors, ids, IndexSettings.from_params(settings["index"]), kind=kind, model_name="m", model_version="1")


@pytest.mark.parametrize("cached", [True, False], ids=["feature-cache", "no-feature-cache"])
@pytest.mark.parametrize("kind", ["image", "multimodal"])
def test_predict_split_rows_are_slices_of_the_whole_pass(tiny_work: Path, tmp_path: Path, kind: str, cached: bool) -> None:
    """Shards of 16 rows start at photo offsets that are no multiple of the backbone batch: the
    photos still go through the backbone in the whole pass's batches (the last bits would differ)."""
    features = tiny_work / "features" if cached else tmp_path / "empty"
    whole = _single_process(tiny_work, kind, features)
    classifier = inference.load_classifier(tiny_work / "models" / kind, batch_size=BATCH)
    n = len(whole.ids)
    assert sharding.listing_count(tiny_work / "clean", kind) == n
    parts = [inference.predict_split(classifier, tiny_work / "clean", None, progress=False, feature_cache_dir=features, rows=(s.start, s.stop))
             for s in sharding.plan_shards(n, 16, BATCH)]
    np.testing.assert_array_equal(np.concatenate([p.embeddings for p in parts]), whole.embeddings)
    np.testing.assert_array_equal(np.concatenate([p.proba for p in parts]), whole.proba)
    pd.testing.assert_frame_equal(pd.concat([p.ids for p in parts], ignore_index=True), whole.ids)


def test_index_stage_pass_on_dask_equals_single_process(tiny_work: Path, tmp_path: Path) -> None:
    import faiss

    from flows.index import _cache_key, _stores, run_on_dask

    settings = _settings(tiny_work, tmp_path)
    models = {kind: (str(tiny_work / "models" / kind), f"marketplace-{kind}", "1") for kind in INDEX_KINDS}
    first = run_on_dask(models, settings)  # one cluster: the models' pass, then the indexes filled over shards
    assert sorted(first["computed"]) == sorted(INDEX_KINDS)

    for kind in INDEX_KINDS:
        single = _single_process(tiny_work, kind, tmp_path / "no-features")
        n = len(single.ids)
        assert len(sharding.plan_shards(n, 16, BATCH)) >= 2
        stored, stored_probs = (store.load_if_fresh(_cache_key(models[kind], settings)) for store in _stores(kind, settings))
        assert stored is not None and stored_probs is not None
        np.testing.assert_array_equal(stored.vectors, single.embeddings)
        np.testing.assert_array_equal(stored_probs.vectors, single.proba)
        pd.testing.assert_frame_equal(stored.ids.reset_index(drop=True), single.ids, check_dtype=False)
        pd.testing.assert_frame_equal(stored_probs.ids.reset_index(drop=True), single.ids, check_dtype=False)

        on_dask, alone = _index(stored.vectors, stored.ids, settings, kind), _index(single.embeddings, single.ids, settings, kind)
        assert on_dask.size == alone.size == n
        np.testing.assert_array_equal(on_dask.index.reconstruct_n(0, n), alone.index.reconstruct_n(0, n))
        queries = alone.prepare_queries(single.embeddings[:5])
        for got, expected in zip(on_dask.search_raw(queries, 5), alone.search_raw(queries, 5)):
            np.testing.assert_array_equal(got, expected)
        saved = tmp_path / "saved" / kind
        on_dask.save(saved)
        np.testing.assert_array_equal(faiss.read_index(str(saved / "index.faiss")).reconstruct_n(0, n), alone.index.reconstruct_n(0, n))

    # the index itself filled over shards on Dask (Flat: the copies merge into one) equals the one built at once
    filled = first["filled"]
    assert sorted(filled) == sorted(INDEX_KINDS)
    index_settings = IndexSettings.from_params(settings["index"])
    for kind in INDEX_KINDS:
        stored = _stores(kind, settings)[0].load_if_fresh(_cache_key(models[kind], settings))
        on_dask = SimilarityIndex.from_filled(faiss.deserialize_index(np.frombuffer(filled[kind], dtype=np.uint8)), stored.ids,
                                              index_settings, kind=kind, model_name="m", model_version="1")
        alone = _index(stored.vectors, stored.ids, settings, kind)
        assert on_dask.metadata.factory == alone.metadata.factory and on_dask.size == alone.size
        assert faiss.serialize_index(on_dask.index).tobytes() == faiss.serialize_index(alone.index).tobytes()

    # fresh stores: nothing left to compute (index_task then reuses them)
    assert run_on_dask(models, settings)["computed"] == []
