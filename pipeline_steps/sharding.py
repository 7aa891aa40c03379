"""Embedding and index building over shards of the listings: the plain functions a Dask run maps.

The listings (one row per photo or per product, in a fixed order) are cut into contiguous shards
of ``distributed.shard_size`` rows. Each shard is embedded on its own (`embed_shard`: a fresh
process may run it, on any machine that sees the photos) and written as one ``.npy`` + one
``.parquet`` of ids; `merge_shards` reads them back in shard order. Index building is sharded too:
one empty index is trained once (on a sample of all vectors, seeded), every shard fills a copy
(`fill_shard_index`), and `merge_indexes` appends the shards in order (``merge_from``, for Flat and
IVF indexes) or, for index types that cannot be merged (HNSW), serves them together at query time
through ``faiss.IndexShards``.

The result equals the single-process run: the same rows in the same order, each embedded with the
same model, batch composition and preprocessing (shard boundaries fall on batch boundaries: the
shard size is rounded up to a multiple of the batch size) and one torch thread per task; the
merged index holds the same vectors under the same ids (tests/test_distributed.py checks it).

The index stage (flows/index.py, ``distributed.index_on_dask``) shards the champion models' pass
the same way: `predict_shard` runs `inference.predict_split` on rows ``[start, stop)`` of a kind's
listings (photos for the image model, products for the text and multimodal ones) and writes the
shard's embeddings, class probabilities and ids; `merge_predictions` concatenates them in shard
order — the arrays the single-process pass returns (tests/test_index_dask.py).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_steps.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    number: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.number:05d}"


def plan_shards(n_rows: int, shard_size: int, batch_size: int = 1) -> list[Shard]:
    """Contiguous shards of at most `shard_size` rows (rounded up to a multiple of `batch_size`)."""
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"distributed.shard_size and the batch size must be >= 1 (got {shard_size}, {batch_size})")
    size = int(math.ceil(shard_size / batch_size) * batch_size)
    return [Shard(i, start, min(n_rows, start + size)) for i, start in enumerate(range(0, n_rows, size))]


# --------------------------------------------------------------------------- embedding


def image_embedder(settings: Mapping[str, Any]) -> Any:
    """`embed(paths) -> (n, d) float32`: the frozen image backbone of `train.image` (the features the
    image index uses with `search_embedding: backbone`), built once per task."""
    import torch

    from pipeline_steps import image_features, models

    image = settings["train"]["image"]
    threads = settings["train"]["num_threads"] or 1  # null (one per core) -> 1 per Dask worker process
    torch.set_num_threads(int(threads))
    spec = models.describe_weights(image["backbone"], image["weights"])
    backbone, _ = models.build_backbone(image["backbone"], spec)
    preprocessor = models.build_image_preprocessor(image, spec)
    batch_size = int(settings["index"]["batch_size"])

    def embed(paths: Sequence[str]) -> np.ndarray:
        with torch.inference_mode():
            out = image_features.extract(backbone, preprocessor, list(paths), "cpu", batch_size, progress=False)
        return out.numpy().astype(np.float32, copy=False)

    return embed


def embed_shard(rows: pd.DataFrame, shard: Shard, settings: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Embed the photos of `rows` (columns `path`, plus id columns) and write `<out_dir>/<shard>.npy/.parquet`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vectors = image_embedder(settings)(rows["path"].tolist())
    vec_path, ids_path = out_dir / f"{shard.name}.npy", out_dir / f"{shard.name}.parquet"
    tmp = out_dir / f".{shard.name}.npy.tmp"
    with tmp.open("wb") as handle:
        np.save(handle, vectors)
    tmp.replace(vec_path)
    rows.drop(columns=["path"]).reset_index(drop=True).to_parquet(ids_path)
    return {"shard": shard.number, "rows": len(rows), "vectors": str(vec_path), "ids": str(ids_path)}


def merge_shards(results: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, pd.DataFrame]:
    """Vectors and ids of every shard, concatenated in shard order."""
    ordered = sorted(results, key=lambda r: r["shard"])
    vectors = np.concatenate([np.load(r["vectors"]) for r in ordered]) if ordered else np.zeros((0, 0), np.float32)
    ids = pd.concat([pd.read_parquet(r["ids"]) for r in ordered], ignore_index=True) if ordered else pd.DataFrame()
    return vectors, ids


# --------------------------------------------------------------------------- the champion models' pass


def listing_count(clean_dir: str | Path, kind: str) -> int:
    """How many rows `inference.predict_split` gives a `kind` model over every split (photos or products)."""
    from pipeline_steps import datasets

    data = datasets.load_clean(clean_dir)
    return len(data.images_of(None)) if kind == "image" else len(data.products_of(None))


def pass_threads(num_threads: int | None) -> int:
    """Torch threads of the champion models' pass: `train.num_threads`, else this process's count.

    The same count in the single-process pass and in every shard task keeps the outputs identical:
    torch's CPU kernels split their float sums by thread, so another count changes the last bits.
    With several LocalCluster workers on one machine set ``train.num_threads`` (e.g. cores / workers).
    """
    import torch

    return int(num_threads or torch.get_num_threads())


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with `num_threads` torch threads, then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_CLASSIFIERS: dict[tuple[str, int, int, int], Any] = {}
_CLASSIFIERS_LOCK = threading.Lock()


def _classifier(model_dir: str | Path, batch_size: int) -> Any:
    """The model of `model_dir`, loaded once per worker process (again when its model.pt changes)."""
    from pipeline_steps import inference

    weights = Path(model_dir) / "model.pt"
    stat = weights.stat()
    key = (str(Path(model_dir).resolve()), int(batch_size), stat.st_mtime_ns, stat.st_size)
    with _CLASSIFIERS_LOCK:
        if key not in _CLASSIFIERS:
            while len(_CLASSIFIERS) >= 4:  # the served kinds' models, at most; oldest out first
                _CLASSIFIERS.pop(next(iter(_CLASSIFIERS)))
            _CLASSIFIERS[key] =  inference.load_classifier(model_dir, batch_size=int(batch_size))
        return _CLASSIFIERS[key]


def predict_shard(
    model_dir: str | Path,
    shard: Shard,
    clean_dir: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int,
    feature_cache_dir: str | Path | None = None,
    num_threads: int | None = None,
    text_cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The model's embeddings + class probabilities of rows [shard.start, shard.stop) of its listings,
    written as ``<out_dir>/<shard>.npy`` (embeddings), ``.proba.npy`` and ``.parquet`` (ids), with
    `num_threads` torch threads (`pass_threads`: pass the single-process pass's count)."""
    from pipeline_steps import inference

    classifier = _classifier(model_dir, batch_size)
    started = time.perf_counter()
    with torch_threads(pass_threads(num_threads)):
        prediction = inference.predict_split(
            classifier, clean_dir, None, progress=False, feature_cache_dir=feature_cache_dir, rows=(shard.start, shard.stop),
            text_cache_dir=text_cache_dir,
        )
    seconds = time.perf_counter() - started
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"vectors": out_dir / f"{shard.name}.npy", "proba": out_dir / f"{shard.name}.proba.npy", "ids": out_dir / f"{shard.name}.parquet"}
    for key, array in (("vectors", prediction.embeddings), ("proba", prediction.proba)):
        tmp = out_dir / f".{paths[key].name}.tmp"
        with tmp.open("wb") as handle:
            np.save(handle, np.ascontiguousarray(array, dtype=np.float32))
        tmp.replace(paths[key])
    prediction.ids.to_parquet(paths["ids"], index=False)
    n = len(prediction.ids)
    rate = n / seconds if seconds > 0 else float("inf")
    print(f"{classifier.kind} {shard.name} rows {shard.start}-{shard.stop}: {n} rows in {seconds:.1f} s ({rate:.1f} rows/s)")
    return {"shard": shard.number, "rows": n, "seconds": seconds, **{key: str(path) for key, path in paths.items()}}


def merge_predictions(results: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(embeddings, probabilities, ids) of every shard of `predict_shard`, concatenated in shard order."""
    ordered = sorted(results, key=lambda r: r["shard"])
    if not ordered:
        raise ConfigError("no shards to merge: the listings are empty")
    vectors, ids = merge_shards(ordered)
    proba = np.concatenate([np.load(r["proba"]) for r in ordered])
    return vectors, proba, ids


# --------------------------------------------------------------------------- indexes


def empty_index(vectors: np.ndarray, factory: str, train_points: int | None = None, seed: int = 0,
                ef_construction: int | None = None) -> Any:
    """An empty, trained index for `factory` (cosine: inner product of L2-normalised vectors); HNSW graphs
    get `ef_construction` (`index.ef_construction`), which travels with the serialised copies."""
    import faiss

    from pipeline_steps.index import effective_factory, normalise_rows, set_build_params

    x = normalise_rows(vectors)
    index = faiss.index_factory(x.shape[1], effective_factory(factory, len(x)), faiss.METRIC_INNER_PRODUCT)
    set_build_params(index, ef_construction)
    if not index.is_trained:
        sample = x
        if train_points and len(x) > train_points:
            sample = x[np.sort(np.random.default_rng(seed).choice(len(x), size=train_points, replace=False))]
        index.train(sample)
    return index


def merges_into_one(index: Any) -> bool:
    """Whether filled copies of this (empty, trained) index merge into one index of the same type that
    equals one built from all rows at once: Flat and IVF do (`merge_from`); HNSW graphs, PCA or
    refine wrappers do not (they would be an `IndexShards`, which faiss cannot write as one file)."""
    import faiss

    return isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexIVF))


def fill_shard_index(trained_empty: Any, vectors: np.ndarray) -> Any:
    """A copy of the trained empty index holding this shard's (normalised) vectors."""
    import faiss

    from pipeline_steps.index import normalise_rows

    index = faiss.clone_index(trained_empty)
    index.add(normalise_rows(vectors))
    return index


def merge_indexes(shards: Sequence[Any]) -> Any:
    """One index from the shard indexes, ids in shard order: merged when the type allows it
    (Flat, IVF), else a `faiss.IndexShards` searching all of them and merging the results."""
    import faiss

    if not shards:
        raise ConfigError("no shard indexes to merge")
    first = faiss.clone_index(shards[0])
    ivf = faiss.try_extract_index_ivf(first) is not None  # IVF lists store ids: offset the others'
    try:
        for other in shards[1:]:
            first.merge_from(other, first.ntotal if ivf else 0)
        return first
    except RuntimeError:
        combined = faiss.IndexShards(shards[0].d, True, True)  # threaded, successive ids
        for shard in shards:
            combined.add_shard(shard)  # faiss's Python wrapper keeps a reference to each shard
        return combined
