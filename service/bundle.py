"""Loading a serving bundle: what `pipeline_steps.packaging.assemble_bundle` wrote, checked and in memory.

`preflight_bundle(dir)` is the cheap start-up check (JSON only); `load_bundle(dir)` loads the
classifiers, the price estimator, the indexes (each only with the model version it was built
from), their ranking files and the listings (docs/ARCHITECTURE.md, "Bundle"). Nothing is trained
or built here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_steps.errors import PipelineError
from pipeline_steps.index_meta import META_FILE, model_mismatch
from pipeline_steps.io_utils import read_json
from pipeline_steps.model_kinds import CLASSIFIER_KINDS, PRICE_KIND
from service.responses import json_scalar

logger = logging.getLogger(__name__)



class BundleLoadError(PipelineError):
    """The bundle cannot be served (missing files, or an index built from another model version)."""


@dataclass(frozen=True)
class ModelRef:
    kind: str
    name: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "version": self.version}


def _index_dir(bundle_dir: Path, kind: str, meta: Mapping[str, Any]) -> Path:
    return bundle_dir / str(meta.get("dir") or f"index/{kind}")


def _checked_index_dir(bundle_dir: Path, kind: str, meta: Mapping[str, Any], model: tuple[Any, Any] | None) -> Path:
    """The bundle's `kind` index folder, refused unless it was built from the bundle's `kind` model.

    Args:
        model: (name, version) of the bundle's `kind` model; None when the bundle has none.
    """
    if model is None:
        raise BundleLoadError(
            f"the bundle has a {kind!r} index but no {kind!r} model to embed queries with; "
            "an index is only served with the model version it was built from"
        )
    directory = _index_dir(bundle_dir, kind, meta)
    index_json = directory / META_FILE
    if not index_json.is_file():
        raise BundleLoadError(f"bundle index {kind!r} has no {META_FILE}: {index_json}")
    built = model_mismatch(read_json(index_json), model)
    if built is not None:
        raise BundleLoadError(
            f"refusing to serve the {kind!r} index: it was built from model {built[0]} version "
            f"{built[1]}, but the bundle's {kind} model is {model[0]} version {model[1]}. "
            "Rebuild the index for this model version (flows/index.py) and re-package the bundle."
        )
    return directory


def preflight_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Cheap start-up check (JSON only, no model loaded): is this a bundle whose indexes match its models?

    Returns bundle.json. Raises BundleLoadError with what to fix. `load_bundle` runs the same
    checks (and more) while loading.
    """
    bundle_dir = Path(bundle_dir)
    info_path = bundle_dir / "bundle.json"
    if not bundle_dir.is_dir():
        raise BundleLoadError(f"bundle directory {bundle_dir} does not exist")
    if not info_path.is_file():
        raise BundleLoadError(
            f"{bundle_dir} is not a serving bundle (no bundle.json): point MARKETPLACE_BUNDLE_DIR at a "
            "directory written by pipeline_steps.packaging.assemble_bundle, or save one as the BentoML model"
        )
    info = read_json(info_path)
    models_meta = info.get("models") or {}
    for kind, meta in (info.get("indexes") or {}).items():
        model = models_meta.get(kind)
        _checked_index_dir(bundle_dir, kind, meta, None if model is None else (model.get("name"), model.get("version")))
    return info


@dataclass
class Bundle:
    """Everything one service replica holds in memory."""

    directory: Path
    info: dict[str, Any]
    models: dict[str, ModelRef] = field(default_factory=dict)
    classifiers: dict[str, Any] = field(default_factory=dict)
    price_model: Any = None
    classes: list[str] = field(default_factory=list)
    indexes: dict[str, Any] = field(default_factory=dict)
    rankings: dict[str, Any] = field(default_factory=dict)
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    thumbnails_dir: Path | None = None
    thumbnails: set[str] = field(default_factory=set)


def load_bundle(bundle_dir: str | Path, use_gpu_index: bool | str = False) -> Bundle:
    """Load and check a bundle directory; BundleLoadError says what to fix."""
    bundle_dir = Path(bundle_dir)
    bundle = Bundle(bundle_dir, preflight_bundle(bundle_dir))
    models_meta: Mapping[str, Mapping[str, Any]] = bundle.info.get("models") or {}
    for kind in CLASSIFIER_KINDS:
        if kind in models_meta:
            bundle.classifiers[kind] = _load_classifier(bundle, kind, models_meta[kind])
    if PRICE_KIND in models_meta:
        bundle.price_model = _load_price(bundle, models_meta[PRICE_KIND])
    if not bundle.classifiers:
        raise BundleLoadError(f"{bundle_dir / 'bundle.json'} lists no classifier (image, text or multimodal)")
    bundle.classes = _common_classes(bundle.classifiers)
    index_meta = bundle.info.get("indexes") or {}
    for kind, meta in index_meta.items():
        bundle.indexes[kind] = _load_index(bundle, kind, meta, use_gpu_index)
    _load_listings(bundle)
    from service import ranking as service_ranking

    bundle.rankings = service_ranking.load_rankings(
        bundle.indexes, lambda kind: _index_dir(bundle_dir, kind, index_meta.get(kind, {})),
        bundle.products, bundle.classes,
    )
    logger.info(
        "bundle %s loaded: classifiers %s, price %s, indexes %s, %d products",
        bundle_dir,
        {k: f"{m.name}@{m.version}" for k, m in bundle.models.items()},
        bundle.price_model is not None,
        {k: idx.size for k, idx in bundle.indexes.items()},
        len(bundle.products),
    )
    return bundle


def _ref(kind: str, meta: Mapping[str, Any]) -> ModelRef:
    name, version = meta.get("name"), meta.get("version")
    if name is None or version is None:
        raise BundleLoadError(f"bundle.json: models.{kind} needs 'name' and 'version'")
    return ModelRef(kind, str(name), str(version))


def _model_dir(bundle: Bundle, kind: str, meta: Mapping[str, Any]) -> Path:
    path = bundle.directory / str(meta.get("dir") or f"models/{kind}")
    if not path.is_dir():
        raise BundleLoadError(f"bundle model directory for {kind!r} is missing: {path}")
    return path


def _load_classifier(bundle: Bundle, kind: str, meta: Mapping[str, Any]) -> Any:
    from pipeline_steps.inference import load_classifier

    ref = _ref(kind, meta)
    classifier = load_classifier(_model_dir(bundle, kind, meta))
    loaded_kind = getattr(classifier, "kind", kind)
    if loaded_kind != kind:
        raise BundleLoadError(f"bundle models/{kind} holds a {loaded_kind!r} classifier, expected {kind!r}")
    bundle.models[kind] = ref
    return classifier


def _load_price(bundle: Bundle, meta: Mapping[str, Any]) -> Any:
    from pipeline_steps.baselines import load_sklearn_model

    ref = _ref(PRICE_KIND, meta)
    model = load_sklearn_model(_model_dir(bundle, PRICE_KIND, meta))
    if not hasattr(model, "predict_price"):
        raise BundleLoadError(f"bundle models/price is not a price estimator ({type(model).__name__})")
    bundle.models[PRICE_KIND] = ref
    return model


def _common_classes(classifiers: Mapping[str, Any]) -> list[str]:
    classes: list[str] | None = None
    for kind, classifier in classifiers.items():
        these = [str(c) for c in classifier.classes]
        if classes is None:
            classes = these
        elif these != classes:
            raise BundleLoadError(
                f"the {kind} classifier predicts classes {these}, the others {classes}: "
                "package champions trained on the same labels.json"
            )
    return classes or []


def _load_index(bundle: Bundle, kind: str, meta: Mapping[str, Any], use_gpu: bool | str) -> Any:
    from pipeline_steps.index import SimilarityIndex

    model = bundle.models.get(kind)
    directory = _checked_index_dir(bundle.directory, kind, meta, None if model is None else (model.name, model.version))
    index = SimilarityIndex.load(directory, expected_model=(model.name, model.version), use_gpu=use_gpu)
    dim = getattr(bundle.classifiers[kind], "embedding_dim", None)
    if dim is not None and int(dim) != int(index.dim):
        raise BundleLoadError(
            f"the {kind!r} index holds {index.dim}-d vectors but the {kind} model embeds {dim}-d: "
            "rebuild the index for this model"
        )
    return index


def _load_listings(bundle: Bundle) -> None:
    path = bundle.directory / "listings.parquet"
    if not path.is_file():
        raise BundleLoadError(f"bundle has no listings.parquet: {path}")
    listings = pd.read_parquet(path)
    listings["product_id"] = listings["product_id"].astype(str)
    listings["image_id"] = listings["image_id"].astype("string")
    for row in listings.itertuples(index=False):
        pid = row.product_id
        image_id = None if pd.isna(row.image_id) else str(row.image_id)
        entry = bundle.products.get(pid)
        if entry is None:
            bundle.products[pid] = {
                "product_id": pid,
                "image_id": image_id,
                "product_name": json_scalar(row.product_name),
                "price": None if json_scalar(row.price) is None else float(row.price),
                "location": json_scalar(row.location),
                "category": json_scalar(row.category),
            }
        elif entry["image_id"] is None and image_id is not None:
            entry["image_id"] = image_id
    bundle.thumbnails_dir = bundle.directory / "thumbnails"
    bundle.thumbnails = (
        {p.stem for p in bundle.thumbnails_dir.glob("*.jpg")} if bundle.thumbnails_dir.is_dir() else set()
    )
    categories = bundle.classes or list(bundle.info.get("categories") or [])
    if not categories:
        categories = sorted({p["category"] for p in bundle.products.values() if p["category"]})
    bundle.categories = list(categories)
