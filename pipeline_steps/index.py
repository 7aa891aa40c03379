"""FAISS similarity indexes over listing/photo embeddings: build, save, load, search.

Contract (docs/ARCHITECTURE.md, "Index"): one directory per embedding kind with

* ``index.faiss`` — a CPU copy of the index, written with ``faiss.write_index``;
* ``ids.parquet`` — row i of the index -> ``product_id``, ``image_id`` (+ any
  extra columns the caller kept, e.g. ``category`` for filtering);
* ``index.json`` — ``kind``, ``factory``, ``dim``, ``size``, ``model_name``,
  ``model_version``, ``built_at`` (+ ``metric``, ``requested_factory``,
  ``nprobe``, ``ef_search``, ``faiss_version``).

Similarity is cosine: vectors are L2-normalised (copies — the caller's arrays are
never modified) and searched by inner product, so a score is a cosine in [-1, 1].

An index is only valid for the model version whose embeddings it holds, so
``SimilarityIndex.load(..., expected_model=(name, version))`` refuses a
mismatch instead of serving neighbours from another embedding space.

IVF with too few vectors (a decision, logged as a warning)
----------------------------------------------------------
k-means wants about 39 training points per centroid (FAISS itself warns
below that). When ``n < 39 * nlist`` the ``IVF{nlist}`` part of the factory
string is rewritten to ``IVF{n // 39}``; when ``n < 39`` (not even one proper
list) the index falls back to ``Flat`` (exact — and for so few vectors also the
fastest). The factory actually built is recorded as ``factory`` in
``index.json``, the configured one as ``requested_factory``. Lowering nlist
rather than always falling back to Flat keeps the configured index *type*
(and its memory/speed profile) on the small demo dataset.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
import pandas as pd

from pipeline_steps.config import get, require_choice
from pipeline_steps.errors import ConfigError, DataValidationError, PipelineError
from pipeline_steps.io_utils import atomic_dir, read_json, write_json
from pipeline_steps.index_meta import META_FILE, model_mismatch
from pipeline_steps.model_kinds import INDEX_KINDS

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"

METRICS: dict[str, int] = {
    "cosine": faiss.METRIC_INNER_PRODUCT,
    "inner_product": faiss.METRIC_INNER_PRODUCT,
    "l2": faiss.METRIC_L2,
}
MIN_POINTS_PER_CENTROID = 39  # below this FAISS k-means warns; see module docstring
GPU_MAX_K = 2048  # FAISS GPU indexes refuse larger k
_IVF_RE = re.compile(r"IVF(\d+)")


class IndexMismatchError(PipelineError):
    """An index was built from another model (name/version) than the one it would be served with."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class IndexSettings:
    """The ``index:`` section of params.yaml, checked once up front."""

    dir: str
    kinds: tuple[str, ...]
    factory: str
    nprobe: int
    ef_search: int
    ef_construction: int
    batch_size: int
    use_gpu: str | bool
    eval_k: tuple[int, ...]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> IndexSettings:
        """Accepts the whole params.yaml mapping or just its ``index:`` section."""
        if not isinstance(params.get("index"), Mapping):
            params = {"index": params}
        kinds = tuple(get(params, "index.kinds"))
        for kind in kinds:
            require_choice(kind, "index.kinds", list(INDEX_KINDS))
        factory = get(params, "index.factory")
        if not isinstance(factory, str) or not factory.strip():
            raise ConfigError(f"params.yaml key 'index.factory' must be a faiss index_factory string, got {factory!r}")
        return cls(
            dir=str(get(params, "index.dir")),
            kinds=kinds,
            factory=factory.strip(),
            nprobe=_positive_int(get(params, "index.nprobe"), "index.nprobe"),
            ef_search=_positive_int(get(params, "index.ef_search"), "index.ef_search"),
            ef_construction=_positive_int(get(params, "index.ef_construction"), "index.ef_construction"),
            batch_size=_positive_int(get(params, "index.batch_size"), "index.batch_size"),
            use_gpu=normalise_use_gpu(get(params, "index.use_gpu")),
            eval_k=tuple(_positive_int(k, "index.eval_k") for k in get(params, "index.eval_k")),
        )


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"params.yaml key '{key}' must be a positive integer, got {value!r}")
    return value


def normalise_use_gpu(value: Any) -> str | bool:
    """``auto`` | ``True`` | ``False`` (YAML booleans and the strings "true"/"false" accepted)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        value = {"true": True, "false": False, "yes": True, "no": False}.get(lowered, lowered)
    return require_choice(value, "index.use_gpu", ["auto", True, False])


# --------------------------------------------------------------------------- building


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Return an L2-normalised float32 *copy* (zero rows stay zero) — cosine = inner product after this."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        logger.warning("%d zero vector(s): they stay zero (cosine 0 with everything)", int(zero.sum()))
        norms[zero] = 1.0
    x /= norms
    return x


def _prepare(vectors: np.ndarray, metric: str, what: str) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise DataValidationError(f"{what} must be a 2-D array (n, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataValidationError(f"{what} contain NaN/inf values")
    if metric == "cosine":
        return normalise_rows(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def effective_factory(factory: str, n_vectors: int) -> str:
    """The factory string actually built for ``n_vectors`` (see "IVF with too few vectors")."""
    match = _IVF_RE.search(factory)
    if not match:
        return factory
    nlist = int(match.group(1))
    if n_vectors >= nlist * MIN_POINTS_PER_CENTROID:
        return factory
    new_nlist = n_vectors // MIN_POINTS_PER_CENTROID
    if new_nlist < 1:
        logger.warning(
            "index.factory %r: only %d vectors, fewer than %d needed for one IVF list; using an exact Flat index",
            factory, n_vectors, MIN_POINTS_PER_CENTROID,
        )
        return "Flat"
    lowered = factory[: match.start(1)] + str(new_nlist) + factory[match.end(1) :]
    logger.warning(
        "index.factory %r: %d vectors are fewer than %d x nlist=%d; lowering nlist to %d (%r)",
        factory, n_vectors, MIN_POINTS_PER_CENTROID, nlist, new_nlist, lowered,
    )
    return lowered


def _make_index(dim: int, factory: str, metric: str) -> faiss.Index:
    try:
        return faiss.index_factory(int(dim), factory, METRICS[metric])
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise ConfigError(
            f"params.yaml key 'index.factory' is {factory!r}, which faiss cannot build for dim={dim} "
            f"({reason}). Examples: 'Flat', 'IVF1024,Flat', 'HNSW32', 'IVF256,PQ32'"
        ) from exc


def hnsw_graphs(index: faiss.Index) -> list[Any]:
    """Every HNSW graph inside an index (the index itself, behind a PCA/refine wrapper, or an IVF quantizer)."""
    found, stack, seen = [], [index], set()
    while stack:
        current = faiss.downcast_index(stack.pop())
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if hasattr(current, "hnsw"):
            found.append(current.hnsw)
        for attr in ("index", "base_index", "quantizer"):
            inner = getattr(current, attr, None)
            if isinstance(inner, faiss.Index):
                stack.append(inner)
    return found


def set_build_params(index: faiss.Index, ef_construction: int | None) -> int:
    """Set HNSW's ``efConstruction`` (the candidate list while the graph is built: a better graph, and
    higher recall at the same efSearch, for a slower build) on every HNSW graph of an empty index;
    ``None`` keeps FAISS's default (40). Returns how many graphs were set."""
    if ef_construction is None:
        return 0
    graphs = hnsw_graphs(index)
    for graph in graphs:
        graph.efConstruction = int(ef_construction)
    return len(graphs)


def set_search_params(
    index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None, on_gpu: bool | None = None
) -> dict[str, int]:
    """Set ``nprobe`` (IVF) and ``efSearch`` (HNSW) where the index has them; return what was set.

    Uses ``faiss.ParameterSpace``, which reaches through wrappers such as
    ``IndexPreTransform`` (OPQ, PCA) and IVF-with-HNSW quantizers; a knob the
    index does not have is skipped silently (``nprobe`` means nothing to Flat).
    ``on_gpu`` (default: guessed from the type) selects ``GpuParameterSpace``.
    """
    applied: dict[str, int] = {}
    gpu = _is_gpu_index(index) if on_gpu is None else on_gpu
    space = faiss.GpuParameterSpace() if gpu and hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    ivf = None if gpu else faiss.try_extract_index_ivf(index)
    wanted: list[tuple[str, int | None]] = [("nprobe", nprobe), ("efSearch", ef_search), ("quantizer_efSearch", ef_search)]
    for name, value in wanted:
        if value is None:
            continue
        value = int(value)
        if name == "nprobe" and ivf is not None:
            value = min(value, int(ivf.nlist))  # more probes than lists is just all lists
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            continue  # the index has no such knob
        applied[name] = value
    return applied


def _is_gpu_index(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__


def _to_gpu(index: faiss.Index, use_gpu: str | bool, factory: str) -> tuple[faiss.Index, bool]:
    """Move ``index`` to the GPU(s) when asked and possible; return (index, on_gpu)."""
    use_gpu = normalise_use_gpu(use_gpu)
    if use_gpu is False:
        return index, False
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus < 1:
        if use_gpu is True:
            raise ConfigError(
                "params.yaml key 'index.use_gpu' is true but faiss sees no GPU "
                "(faiss-cpu is installed, or no CUDA device is visible); set it to auto or false"
            )
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except (RuntimeError, AttributeError) as exc:
        if use_gpu is True:
            raise ConfigError(
                f"params.yaml key 'index.use_gpu' is true but index.factory {factory!r} cannot run on the GPU: {exc}"
            ) from exc
        logger.warning("index %r stays on the CPU (no GPU version: %s)", factory, str(exc).strip().splitlines()[-1])
        return index, False


def build_index(
    vectors: np.ndarray,
    factory: str = "Flat",
    metric: str = "cosine",
    nprobe: int | None = 8,
    ef_search: int | None = 64,
    use_gpu: str | bool = "auto",
    max_train_points: int | None = None,
    seed: int = 0,
    ef_construction: int | None = None,
) -> faiss.Index:
    """Build (train when needed) and fill a FAISS index over ``vectors``.

    ``metric="cosine"`` L2-normalises a copy of the vectors and builds an
    inner-product index (``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)``);
    ``"inner_product"`` and ``"l2"`` use the vectors as given. IVF lists are
    shrunk for small ``n`` (module docstring). ``nprobe``/``ef_search`` are set
    where the index has them. ``use_gpu``: ``"auto"`` moves the index to the
    GPU when faiss sees one (and keeps it on the CPU for types without a GPU
    version, e.g. HNSW); ``True`` without a GPU is a ConfigError.

    ``max_train_points``: train (IVF k-means, PQ) on a random sample of at
    most this many vectors (``seed``); k-means cost grows with the sample, and
    a few dozen points per centroid are enough. ``None``: FAISS's own default
    (it subsamples to 256 points per centroid).

    Raises ConfigError for an unknown factory string (naming ``index.factory``)
    or metric, DataValidationError for empty/non-finite input.
    """
    return _build(vectors, factory, metric, nprobe, ef_search, use_gpu, max_train_points, seed, ef_construction)[0]


def _build(
    vectors: np.ndarray,
    factory: str,
    metric: str,
    nprobe: int | None,
    ef_search: int | None,
    use_gpu: str | bool,
    max_train_points: int | None = None,
    seed: int = 0,
    ef_construction: int | None = None,
) -> tuple[faiss.Index, str, bool]:
    require_choice(metric, "index.metric", list(METRICS))
    x = _prepare(vectors, metric, "index vectors")
    n, dim = x.shape
    if n == 0:
        raise DataValidationError("cannot build an index from 0 vectors")
    _make_index(dim, factory, metric)  # fail on a bad string before any size-based rewrite hides it
    built_factory = effective_factory(factory, n)
    index = _make_index(dim, built_factory, metric)
    set_build_params(index, ef_construction)
    if not index.is_trained:
        train = x
        if max_train_points is not None and n > max_train_points:
            sample = np.random.default_rng(seed).choice(n, size=int(max_train_points), replace=False)
            train = x[np.sort(sample)]
        try:
            index.train(train)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1]
            raise ConfigError(
                f"params.yaml key 'index.factory' is {factory!r}, which cannot be trained on {n} vectors ({reason}); "
                "use 'Flat' or 'HNSW32' for small datasets"
            ) from exc
    index.add(x)
    index, on_gpu = _ready_for_search(index, nprobe, ef_search, use_gpu, built_factory)
    return index, built_factory, on_gpu


def _ready_for_search(index: faiss.Index, nprobe: int | None, ef_search: int | None, use_gpu: str | bool,
                      built_factory: str) -> tuple[faiss.Index, bool]:
    """A filled index with its search knobs set, moved to the GPU when asked and possible."""
    set_search_params(index, nprobe, ef_search)
    index, on_gpu = _to_gpu(index, use_gpu, built_factory)
    if on_gpu:
        set_search_params(index, nprobe, ef_search, on_gpu=True)
    return index, on_gpu


# --------------------------------------------------------------------------- the index object


def _metadata(index: faiss.Index, kind: str, built_factory: str, factory: str, metric: str, nprobe: int | None,
              ef_search: int | None, model_name: Any, model_version: Any) -> IndexMetadata:
    return IndexMetadata(
        kind=kind,
        factory=built_factory,
        dim=int(index.d),
        size=int(index.ntotal),
        model_name=None if model_name is None else str(model_name),
        model_version=None if model_version is None else str(model_version),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        metric=metric,
        requested_factory=factory,
        nprobe=nprobe,
        ef_search=ef_search,
    )


class Hit(NamedTuple):
    """One search result: the index row, its score (cosine for cosine indexes) and its ids."""

    row: int
    score: float
    product_id: Any
    image_id: Any


@dataclass
class IndexMetadata:
    """What ``index.json`` holds (extra keys found on load are kept in ``extra``)."""

    kind: str
    factory: str
    dim: int
    size: int
    model_name: str | None
    model_version: str | None
    built_at: str
    metric: str = "cosine"
    requested_factory: str | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    faiss_version: str = field(default_factory=lambda: faiss.__version__)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        return {**extra, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexMetadata:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = {"kind", "factory", "dim", "size", "model_name", "model_version", "built_at"} - set(data)
        if missing:
            raise DataValidationError(f"{META_FILE} lacks keys: {sorted(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        for key in ("model_name", "model_version"):  # "3" and 3 are the same registry version
            values[key] = None if values[key] is None else str(values[key])
        values["dim"], values["size"] = int(values["dim"]), int(values["size"])
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})


PerQueryExclusions = Sequence[Hashable | Collection[Hashable] | None]


class SimilarityIndex:
    """A FAISS index plus its row -> ids map and metadata; the unit that is saved, loaded and served.

    ``ids`` must have a ``product_id`` column (``image_id`` is optional: text and
    multimodal indexes hold one vector per product). Extra columns, e.g.
    ``category``, can be used by ``search(category=..., filter_fn=...)``.
    """

    def __init__(self, index: faiss.Index, ids: pd.DataFrame, metadata: IndexMetadata, on_gpu: bool = False) -> None:
        if "product_id" not in ids.columns:
            raise DataValidationError("index ids need a 'product_id' column")
        if len(ids) != index.ntotal:
            raise DataValidationError(f"index holds {index.ntotal} vectors but ids has {len(ids)} rows")
        if index.d != metadata.dim:
            raise DataValidationError(f"index dim {index.d} != metadata dim {metadata.dim}")
        self.index = index
        self.ids = ids.reset_index(drop=True)
        self.metadata = metadata
        self.on_gpu = on_gpu
        self._product_ids = self.ids["product_id"].to_numpy(dtype=object)
        self._image_ids = (
            self.ids["image_id"].astype(object).where(self.ids["image_id"].notna(), None).to_numpy()
            if "image_id" in self.ids.columns
            else np.full(len(self.ids), None, dtype=object)
        )

    # ----------------------------------------------------------------- construction

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: pd.DataFrame,
        *,
        kind: str,
        factory: str = "Flat",
        metric: str = "cosine",
        nprobe: int | None = 8,
        ef_search: int | None = 64,
        use_gpu: str | bool = "auto",
        model_name: str | None = None,
        model_version: str | int | None = None,
        ef_construction: int | None = None,
    ) -> SimilarityIndex:
        """Build an index over ``vectors`` (row i <-> ``ids`` row i) and record where it came from."""
        if len(ids) != len(vectors):
            raise DataValidationError(f"{len(vectors)} vectors but {len(ids)} id rows")
        index, built_factory, on_gpu = _build(vectors, factory, metric, nprobe, ef_search, use_gpu,
                                              ef_construction=ef_construction)
        return cls(index, ids, _metadata(index, kind, built_factory, factory, metric, nprobe, ef_search,
                                         model_name, model_version), on_gpu=on_gpu)

    @classmethod
    def from_filled(
        cls,
        index: faiss.Index,
        ids: pd.DataFrame,
        settings: IndexSettings,
        *,
        kind: str,
        model_name: str | None,
        model_version: str | int | None,
    ) -> SimilarityIndex:
        """An index filled elsewhere (e.g. shard by shard on Dask, pipeline_steps/sharding.py) from the
        cosine-normalised rows of ``ids``: the search knobs and the GPU move of ``from_settings`` applied,
        the same metadata recorded."""
        if len(ids) != index.ntotal:
            raise DataValidationError(f"index holds {index.ntotal} vectors but ids has {len(ids)} rows")
        built_factory = effective_factory(settings.factory, int(index.ntotal))
        index, on_gpu = _ready_for_search(index, settings.nprobe, settings.ef_search, settings.use_gpu, built_factory)
        return cls(index, ids, _metadata(index, kind, built_factory, settings.factory, "cosine", settings.nprobe,
                                         settings.ef_search, model_name, model_version), on_gpu=on_gpu)

    @classmethod
    def from_settings(
        cls,
        vectors: np.ndarray,
        ids: pd.DataFrame,
        settings: IndexSettings,
        *,
        kind: str,
        model_name: str | None,
        model_version: str | int | None,
    ) -> SimilarityIndex:
        """``build`` with the knobs of params.yaml's ``index:`` section."""
        return cls.build(
            vectors, ids, kind=kind, factory=settings.factory, nprobe=settings.nprobe,
            ef_search=settings.ef_search, use_gpu=settings.use_gpu, ef_construction=settings.ef_construction,
            model_name=model_name, model_version=model_version,
        )

    # ----------------------------------------------------------------- persistence

    def cpu_index(self) -> faiss.Index:
        """A CPU copy when the index lives on the GPU (``faiss.write_index`` needs one)."""
        return faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index

    def save(self, directory: str | Path) -> Path:
        """Write index.faiss, ids.parquet and index.json; the directory is swapped in atomically."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            faiss.write_index(self.cpu_index(), str(tmp / INDEX_FILE))
            self.ids.to_parquet(tmp / IDS_FILE, index=False)
            write_json(tmp / META_FILE, self.metadata.to_dict())
        logger.info("saved %s index (%s, %d vectors) to %s", self.metadata.kind, self.metadata.factory, self.size, directory)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expected_model: tuple[str, str | int] | None = None,
        use_gpu: str | bool = "auto",
    ) -> SimilarityIndex:
        """Load a saved index; refuse it when it was built from another model than ``expected_model``.

        ``expected_model=(name, version)``: the model the caller will embed
        queries with. Vectors from another model version live in another
        embedding space, so their neighbours would be meaningless — hence an
        IndexMismatchError rather than a warning. ``None`` skips the check.
        """
        directory = Path(directory)
        for name in (INDEX_FILE, IDS_FILE, META_FILE):
            if not (directory / name).is_file():
                raise DataValidationError(f"index directory {directory} lacks {name}")
        metadata = IndexMetadata.from_dict(read_json(directory / META_FILE))
        if expected_model is not None:
            got = model_mismatch((metadata.model_name, metadata.model_version), expected_model)
            if got is not None:
                raise IndexMismatchError(
                    f"index at {directory} was built from model {got[0]!r} version {got[1]!r}, "
                    f"but is to be used with {str(expected_model[0])!r} version {str(expected_model[1])!r}: "
                    "rebuild the index (flows/index.py) for this model version"
                )
        index = faiss.read_index(str(directory / INDEX_FILE))
        ids = pd.read_parquet(directory / IDS_FILE)
        if index.ntotal != metadata.size or index.d != metadata.dim:
            raise DataValidationError(
                f"{directory}: {INDEX_FILE} has {index.ntotal} vectors of dim {index.d}, "
                f"{META_FILE} says {metadata.size} of dim {metadata.dim}"
            )
        set_search_params(index, metadata.nprobe, metadata.ef_search)
        index, on_gpu = _to_gpu(index, use_gpu, metadata.factory)
        if on_gpu:
            set_search_params(index, metadata.nprobe, metadata.ef_search, on_gpu=True)
        return cls(index, ids, metadata, on_gpu=on_gpu)

    # ----------------------------------------------------------------- searching

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def prepare_queries(self, query_vectors: np.ndarray) -> np.ndarray:
        """Queries as the index expects them: 2-D float32, L2-normalised for cosine."""
        x = _prepare(query_vectors, self.metadata.metric, "query vectors")
        if x.shape[1] != self.dim:
            raise DataValidationError(f"query vectors have dim {x.shape[1]}, the index has dim {self.dim}")
        return x

    def search_raw(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's own ``(scores, rows)``, rows -1 where fewer than ``k`` results exist."""
        q = self.prepare_queries(query_vectors)
        return self.index.search(q, int(k))

    def search(
        self,
        query_vectors: np.ndarray,
        k: int,
        exclude_product_ids: PerQueryExclusions | set[Hashable] | frozenset[Hashable] | None = None,
        filter_fn: Callable[[pd.DataFrame], Any] | None = None,
        category: str | Collection[str] | None = None,
        unique_products: bool = False,
        category_column: str = "category",
        fetch_factor: int = 4,
    ) -> list[list[Hit]]:
        """The ``k`` best hits per query (a list per query, best first).

        * ``exclude_product_ids``: a sequence with one entry per query — a
          product id, a collection of ids or None (e.g. each query's own
          product); or a ``set``/``frozenset`` applied to every query.
        * ``filter_fn(ids) -> boolean mask`` over the ids table and/or
          ``category`` (one value or several, matched against ``ids[category_column]``):
          only rows passing both can be returned.
        * ``unique_products``: keep only the best hit per product (the image
          index holds one vector per photo).

        With any of these, FAISS is asked for more than ``k`` neighbours
        (``fetch_factor`` x, scaled by the filter's selectivity) and the list
        trimmed; queries still short of ``k`` are re-asked with 4x more until
        the whole index has been seen. So fewer than ``k`` hits come back only
        when fewer exist (or, for IVF, when the probed lists hold no more).
        """
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self.prepare_queries(query_vectors)
        nq = len(q)
        excludes = self._per_query_excludes(exclude_product_ids, nq)
        allowed = self._allowed_mask(filter_fn, category, category_column)
        max_fetch = min(self.size, GPU_MAX_K) if self.on_gpu else self.size
        if max_fetch == 0 or nq == 0:
            return [[] for _ in range(nq)]
        if allowed is None and not unique_products and not any(excludes):
            scores, rows = self.index.search(q, min(k, max_fetch))
            return [self._hits(scores[i], rows[i], k, None, None, False) for i in range(nq)]

        selectivity = 1.0 if allowed is None else max(float(allowed.mean()), 1.0 / self.size)
        most_excluded = max((len(e) for e in excludes), default=0)
        fetch = min(max_fetch, math.ceil((k * max(1, fetch_factor) + most_excluded) / selectivity))
        results: list[list[Hit]] = [[] for _ in range(nq)]
        pending = np.arange(nq)
        while pending.size:
            scores, rows = self.index.search(q[pending], fetch)
            still: list[int] = []
            for j, qi in enumerate(pending):
                hits = self._hits(scores[j], rows[j], k, excludes[qi], allowed, unique_products)
                exhausted = fetch >= max_fetch or bool((rows[j] < 0).any())
                if len(hits) >= k or exhausted:
                    results[qi] = hits
                else:
                    still.append(int(qi))
            pending = np.asarray(still, dtype=np.int64)
            fetch = min(max_fetch, fetch * 4)
        return results

    def _hits(
        self,
        scores: np.ndarray,
        rows: np.ndarray,
        k: int,
        exclude: frozenset[Hashable] | None,
        allowed: np.ndarray | None,
        unique_products: bool,
    ) -> list[Hit]:
        valid = rows >= 0
        rows, scores = rows[valid], scores[valid]
        keep = np.ones(len(rows), dtype=bool)
        if allowed is not None:
            keep &= allowed[rows]
        pids = self._product_ids[rows]
        if exclude:
            keep &= np.fromiter((p not in exclude for p in pids), dtype=bool, count=len(pids))
        rows, scores, pids = rows[keep], scores[keep], pids[keep]
        if unique_products and len(rows):
            first = ~pd.Series(pids).duplicated().to_numpy()
            rows, scores, pids = rows[first], scores[first], pids[first]
        return [
            Hit(int(r), float(s), p, self._image_ids[r])
            for r, s, p in zip(rows[:k], scores[:k], pids[:k], strict=True)
        ]

    @staticmethod
    def _per_query_excludes(
        exclude: PerQueryExclusions | set[Hashable] | frozenset[Hashable] | None, nq: int
    ) -> list[frozenset[Hashable]]:
        if exclude is None:
            return [frozenset()] * nq
        if isinstance(exclude, (set, frozenset)):
            return [frozenset(exclude)] * nq
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Sequence | np.ndarray | pd.Series):
            raise TypeError(
                "exclude_product_ids must be a sequence with one entry per query, or a set applied to all queries"
            )
        entries = list(exclude)
        if len(entries) != nq:
            raise ValueError(f"exclude_product_ids has {len(entries)} entries for {nq} queries (one per query expected)")
        out: list[frozenset[Hashable]] = []
        for entry in entries:
            if entry is None:
                out.append(frozenset())
            elif isinstance(entry, (str, bytes)) or not isinstance(entry, Collection):
                out.append(frozenset([entry]))
            else:
                out.append(frozenset(entry))
        return out

    def _allowed_mask(
        self,
        filter_fn: Callable[[pd.DataFrame], Any] | None,
        category: str | Collection[str] | None,
        category_column: str,
    ) -> np.ndarray | None:
        mask: np.ndarray | None = None
        if category is not None:
            if category_column not in self.ids.columns:
                raise DataValidationError(
                    f"category filter needs a '{category_column}' column in the index ids "
                    f"(has: {list(self.ids.columns)})"
                )
            wanted = [category] if isinstance(category, str) else list(category)
            mask = self.ids[category_column].isin(wanted).to_numpy(dtype=bool)
        if filter_fn is not None:
            custom = np.asarray(filter_fn(self.ids), dtype=bool)
            if custom.shape != (self.size,):
                raise ValueError(f"filter_fn must return one boolean per index row ({self.size}), got shape {custom.shape}")
            mask = custom if mask is None else (mask & custom)
        return mask

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"SimilarityIndex(kind={m.kind!r}, factory={m.factory!r}, size={self.size}, dim={self.dim}, "
            f"model={m.model_name!r}@{m.model_version!r}, gpu={self.on_gpu})"
        )
