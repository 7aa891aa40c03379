"""Embedding many items in batches, and caching the result on disk.

Embedding every listing or photo is the slowest part of building an index, and
its result only changes when the model or the data changes. So the vectors are
stored once, together with a *cache key* (model name + model version + a
fingerprint of the input data), and a re-run with the same key reads them back
instead of recomputing.

Storage format (one file, chosen on purpose)
--------------------------------------------
A single Parquet file per embedding set:

* one column ``vector`` of type ``fixed_size_list<float32>[dim]`` — the vectors;
* the id columns given by the caller (e.g. ``product_id``, ``image_id``,
  ``split``, ``label``), one row per vector, in the same order;
* the Parquet schema metadata key ``embedding_store`` holding JSON with the
  cache key and its parts (``model_name``, ``model_version``,
  ``data_fingerprint``), ``dim``, ``count`` and ``created_at``.

One file rather than a ``.npy`` + ``.parquet`` pair because a single file is
written atomically (temporary sibling + ``os.replace``), so vectors, ids and
the cache key can never come from two different runs. A fixed-size list column
reads back into a ``(n, dim)`` float32 array without a per-row Python loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline_steps.errors import DataValidationError
from pipeline_steps.io_utils import atomic_path, file_sha256

logger = logging.getLogger(__name__)

VECTOR_COLUMN = "vector"
METADATA_KEY = b"embedding_store"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- batching


def _to_numpy(batch_output: Any) -> np.ndarray:
    """Accept numpy arrays, lists and (CPU or GPU) torch tensors from an embed function."""
    if hasattr(batch_output, "detach"):  # torch.Tensor, without importing torch here
        batch_output = batch_output.detach().cpu().numpy()
    return np.asarray(batch_output, dtype=np.float32)


def embed_in_batches(
    embed_fn: Callable[[list[Any]], Any],
    items: Sequence[Any] | Iterable[Any],
    batch_size: int,
    desc: str = "embedding",
    *,
    dim: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Run ``embed_fn`` over ``items`` ``batch_size`` at a time; return an ``(n, dim)`` float32 array.

    Why batches: a model call on the whole dataset would not fit in memory, one
    call per item wastes the vectorised forward pass. The progress bar (tqdm)
    is there because embedding thousands of photos on CPU takes minutes.

    ``embed_fn`` receives a list of items and must return one row per item.
    Every batch is checked (row count, a constant width, finite values) so a
    broken model fails here, not later as a silently wrong index.
    ``dim`` only shapes the result when ``items`` is empty (``(0, dim)``;
    ``(0, 0)`` when not given).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    if isinstance(items, pd.DataFrame):  # list(df) would silently iterate over column names
        raise TypeError("items is a DataFrame: pass a list of rows/records (e.g. df.to_dict('records')) or a column")
    items = list(items)
    n = len(items)
    if n == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)

    out: np.ndarray | None = None
    with tqdm(total=n, desc=desc, unit="item", disable=not progress, mininterval=1.0) as bar:
        for start in range(0, n, batch_size):
            batch = items[start : start + batch_size]
            vectors = _to_numpy(embed_fn(batch))
            if vectors.ndim != 2 or vectors.shape[0] != len(batch):
                raise DataValidationError(
                    f"{desc}: embed_fn returned shape {vectors.shape} for a batch of {len(batch)} items "
                    f"(items {start}..{start + len(batch) - 1}); expected ({len(batch)}, dim)"
                )
            if out is None:
                if dim is not None and vectors.shape[1] != dim:
                    raise DataValidationError(f"{desc}: embed_fn returned width {vectors.shape[1]}, expected dim={dim}")
                out = np.empty((n, vectors.shape[1]), dtype=np.float32)
            elif vectors.shape[1] != out.shape[1]:
                raise DataValidationError(
                    f"{desc}: embed_fn returned width {vectors.shape[1]} at item {start}, "
                    f"earlier batches had {out.shape[1]}"
                )
            if not np.isfinite(vectors).all():
                bad = int((~np.isfinite(vectors).all(axis=1)).sum())
                raise DataValidationError(
                    f"{desc}: {bad} embedding(s) with NaN/inf in items {start}..{start + len(batch) - 1}"
                )
            out[start : start + len(batch)] = vectors
            bar.update(len(batch))
    assert out is not None
    return out


# --------------------------------------------------------------------------- cache keys


def fingerprint(*parts: Any) -> str:
    """A sha256 hex digest of the data an embedding set was computed from.

    Accepts DataFrames (content + column names, row order matters since rows
    map to vectors), Series, numpy arrays, file paths (``pathlib.Path``: their
    bytes are hashed), ``str``/``bytes`` and JSON-able scalars/mappings.
    Use it on exactly what the embed function reads (e.g. ``products[["product_id",
    "text"]]``, or image ids plus the image files), so unrelated column changes
    do not invalidate the cache.
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(_fingerprint_one(part).encode("ascii"))
        digest.update(b"|")
    return digest.hexdigest()


def _fingerprint_one(part: Any) -> str:
    if isinstance(part, pd.DataFrame):
        row_hashes = pd.util.hash_pandas_object(part, index=False).to_numpy()
        header = json.dumps([str(c) for c in part.columns]).encode()
        return hashlib.sha256(header + row_hashes.tobytes()).hexdigest()
    if isinstance(part, pd.Series):
        return _fingerprint_one(part.to_frame())
    if isinstance(part, np.ndarray):
        arr = np.ascontiguousarray(part)
        return hashlib.sha256(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes()).hexdigest()
    if isinstance(part, Path):
        return file_sha256(part)
    if isinstance(part, bytes):
        return hashlib.sha256(part).hexdigest()
    if isinstance(part, str):
        return hashlib.sha256(part.encode("utf-8")).hexdigest()
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What an embedding set depends on: the model (name, version) and the input data.

    ``extra`` holds anything else that changes the vectors (e.g. the pooling
    mode or the image size); it is part of the digest.
    """

    model_name: str
    model_version: str
    data_fingerprint: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        payload = {
            "model_name": str(self.model_name),
            "model_version": str(self.model_version),
            "data_fingerprint": str(self.data_fingerprint),
            "extra": dict(self.extra),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "model_name": str(self.model_name),
            "model_version": str(self.model_version),
            "data_fingerprint": str(self.data_fingerprint),
            "extra": dict(self.extra),
        }


def _digest_of(key: CacheKey | str) -> str:
    return key.digest if isinstance(key, CacheKey) else str(key)


# --------------------------------------------------------------------------- store


@dataclass
class StoredEmbeddings:
    """Vectors (``(n, dim)`` float32), their id columns (row i <-> vector i) and the stored metadata."""

    vectors: np.ndarray
    ids: pd.DataFrame
    metadata: dict[str, Any]

    @property
    def cache_key(self) -> str:
        return str(self.metadata.get("cache_key", {}).get("digest", ""))


def save_embeddings(
    path: str | Path,
    vectors: np.ndarray,
    ids: pd.DataFrame,
    key: CacheKey | str,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write vectors + id columns + cache key to one Parquet file, atomically.

    Fails (before writing) when the row counts differ, the vectors are not a
    finite 2-D array, or ``ids`` already has a column named ``vector``.
    """
    path = Path(path)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise DataValidationError(f"{path.name}: vectors must be 2-D (n, dim), got shape {vectors.shape}")
    if len(ids) != vectors.shape[0]:
        raise DataValidationError(f"{path.name}: {vectors.shape[0]} vectors but {len(ids)} id rows")
    if VECTOR_COLUMN in ids.columns:
        raise DataValidationError(f"{path.name}: id columns may not include the reserved name '{VECTOR_COLUMN}'")
    if not np.isfinite(vectors).all():
        raise DataValidationError(f"{path.name}: vectors contain NaN/inf")

    n, dim = vectors.shape
    table = pa.Table.from_pandas(ids.reset_index(drop=True), preserve_index=False)
    vector_array = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)
    table = table.append_column(pa.field(VECTOR_COLUMN, pa.list_(pa.float32(), dim)), vector_array)
    key_meta = key.to_dict() if isinstance(key, CacheKey) else {"digest": str(key)}
    store_meta = {
        "format_version": FORMAT_VERSION,
        "cache_key": key_meta,
        "dim": int(dim),
        "count": int(n),
        "id_columns": [str(c) for c in ids.columns],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **dict(extra_metadata or {}),
    }
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[METADATA_KEY] = json.dumps(store_meta, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(schema_meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    logger.info("saved %d embeddings (dim %d) to %s", n, dim, path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read only the stored metadata (cheap: the Parquet footer, no vectors)."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DataValidationError(f"{path}: not an embedding store (no '{METADATA_KEY.decode()}' metadata)")
    return json.loads(raw)


def load_embeddings(path: str | Path) -> StoredEmbeddings:
    """Read an embedding store back: ``(n, dim)`` float32 vectors, id columns, metadata."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"embedding store not found: {path}")
    metadata = read_metadata(path)
    table = pq.read_table(path)
    column = table.column(VECTOR_COLUMN).combine_chunks()
    dim = int(metadata["dim"])
    if len(column) == 0:
        vectors = np.zeros((0, dim), dtype=np.float32)
    else:
        vectors = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    ids = table.drop_columns([VECTOR_COLUMN]).to_pandas()
    if len(ids) != int(metadata["count"]) or vectors.shape[0] != len(ids):
        raise DataValidationError(f"{path}: stored count {metadata['count']} != {len(ids)} rows read")
    return StoredEmbeddings(vectors=vectors, ids=ids, metadata=metadata)


def load_if_fresh(path: str | Path, key: CacheKey | str) -> StoredEmbeddings | None:
    """Return the stored embeddings when they were computed with ``key``; otherwise ``None``.

    ``None`` (with a log line saying why) when the file is missing, unreadable
    or was written for another model version / other data — the caller then
    recomputes and overwrites it. Never raises for a stale cache: a stale cache
    is a reason to recompute, not an error.
    """
    path = Path(path)
    wanted = _digest_of(key)
    if not path.is_file():
        logger.info("no cached embeddings at %s: computing", path)
        return None
    try:
        stored_key = str(read_metadata(path).get("cache_key", {}).get("digest", ""))
    except Exception as exc:  # corrupt or foreign file: recompute rather than crash
        logger.warning("cannot read cached embeddings at %s (%s): recomputing", path, exc)
        return None
    if stored_key != wanted:
        logger.info("cached embeddings at %s are stale (key %s, wanted %s): recomputing", path, stored_key[:12], wanted[:12])
        return None
    try:
        stored = load_embeddings(path)
    except Exception as exc:
        logger.warning("cannot read cached embeddings at %s (%s): recomputing", path, exc)
        return None
    logger.info("reusing %d cached embeddings from %s", len(stored.ids), path)
    return stored


class EmbeddingStore:
    """One embedding set on disk (a Parquet file), reused while its cache key matches.

    >>> store = EmbeddingStore("artifacts/embeddings/text.parquet")
    >>> emb, reused = store.get_or_compute(key, lambda: (embed_in_batches(...), ids))
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def save(
        self,
        vectors: np.ndarray,
        ids: pd.DataFrame,
        key: CacheKey | str,
        extra_metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        return save_embeddings(self.path, vectors, ids, key, extra_metadata)

    def load(self) -> StoredEmbeddings:
        return load_embeddings(self.path)

    def load_if_fresh(self, key: CacheKey | str) -> StoredEmbeddings | None:
        return load_if_fresh(self.path, key)

    def get_or_compute(
        self,
        key: CacheKey | str,
        compute: Callable[[], tuple[np.ndarray, pd.DataFrame]],
        extra_metadata: Mapping[str, Any] | None = None,
    ) -> tuple[StoredEmbeddings, bool]:
        """Return ``(embeddings, reused)``: the cached set when fresh, else ``compute()`` saved under ``key``."""
        cached = self.load_if_fresh(key)
        if cached is not None:
            return cached, True
        vectors, ids = compute()
        self.save(vectors, ids, key, extra_metadata)
        return load_embeddings(self.path), False
