"""Baselines train on a tiny hand-made clean layer, reload from their directory and predict.

The tiny layer follows the "Clean" contract of docs/ARCHITECTURE.md: 13 classes, a few
products each, class-specific words and photo colours so the models have something to learn.
One realdata test trains the text baseline on the real export and checks it reaches the
calibration bar.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline_steps.baselines import (
    SklearnPixelClassifier,
    SklearnPriceEstimator,
    SklearnTextClassifier,
    baseline_params,
    evaluate_baseline,
    image_to_pixels,
    load_sklearn_model,
    train_pixel_baseline,
    train_price_estimator,
    train_text_baseline,
)
from pipeline_steps.config import PROJECT_ROOT, load_params
from pipeline_steps.errors import ConfigError, DataValidationError

CLASSES = sorted([
    "Appliances", "Baby & Kids Stuff", "Clothes, Footwear & Accessories", "Computers & Software",
    "DIY Tools & Materials", "Health & Beauty", "Home & Garden", "Music, Films, Books & Games",
    "Office Furniture & Equipment", "Other Goods", "Phones, Mobile Phones & Telecoms",
    "Sports, Leisure & Travel", "Video Games & Consoles",
])
SPLITS = ["train", "train", "train", "train", "val", "test"]  # per class: 4 train, 1 val, 1 test
TOWNS = [("Leeds", "West Yorkshire"), ("Bath", "Somerset"), ("Hove", "East Sussex")]

# The project's train.baselines with smaller, faster settings (every key is required).
FAST = {**load_params()["train"]["baselines"], "tfidf_max_features": 2000, "logreg_c": 10.0, "pixel_size": 4,
        "price_alpha": 1.0, "max_iter": 300, "seed": 0}

REAL_DATA = (PROJECT_ROOT / ".." / "shared" / "data" / "marketplace").resolve()


def _colour(label: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(label)
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def make_clean_dir(root: Path, drop_train_class: int | None = None) -> Path:
    """Write products.parquet, images.parquet, images/*.jpg and labels.json under `root`."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    products: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for label, category in enumerate(CLASSES):
        word = re.sub(r"[^a-z]", "", category.lower())[:8]
        for j, split in enumerate(SPLITS):
            if split == "train" and label == drop_train_class:
                continue
            pid = f"p{label:02d}{j}"
            name = f"{word} item {j}"
            text = f"{name}. Lovely {word} {word}stuff in good condition, {word} fans welcome."
            town, county = TOWNS[(label + j) % len(TOWNS)]
            price = float(5 * (label + 1) + j)
            products.append({
                "product_id": pid, "product_name": name, "product_description": text,
                "text": text, "category_path": f"{category} / Sub", "category": category, "label": label,
                "price": price, "price_is_outlier": False, "location": f"{town}, {county}",
                "town": town, "county": county, "n_images": 2, "split": split,
            })
            for k in range(2):
                image_id = f"{pid}i{k}"
                pixels = np.clip(np.array(_colour(label)) + rng.integers(-20, 21, size=(16, 16, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8), "RGB").save(root / "images" / f"{image_id}.jpg")
                images.append({"image_id": image_id, "product_id": pid, "path": f"images/{image_id}.jpg",
                               "split": split, "label": label})
    # One flagged outlier in train: the price estimator must leave it out of the fit.
    products.append({**products[0], "product_id": "outlier", "price": 10_000_000.0, "price_is_outlier": True})
    pd.DataFrame(products).to_parquet(root / "products.parquet", index=False)
    pd.DataFrame(images).to_parquet(root / "images.parquet", index=False)
    (root / "labels.json").write_text(json.dumps(
        {"classes": CLASSES, "label_to_index": {c: i for i, c in enumerate(CLASSES)}}), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clean_dir(tmp_path_factory.mktemp("clean"))


def _files(model_dir: Path) -> set[str]:
    return {p.name for p in model_dir.iterdir()}


# --------------------------------------------------------------------------- params


def test_baseline_params_reads_project_params_and_sections() -> None:
    full = baseline_params(load_params())
    assert full["tfidf_max_features"] > 0 and full["pixel_size"] > 0
    assert full["seed"] == load_params()["train"]["seed"]
    assert baseline_params(FAST)["max_iter"] == 300


def test_baseline_params_names_missing_key() -> None:
    with pytest.raises(ConfigError, match="logreg_c"):
        baseline_params({"tfidf_max_features": 10, "pixel_size": 4, "price_alpha": 1.0})


# --------------------------------------------------------------------------- text


def test_text_baseline_trains_saves_and_reloads(clean_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "baselines" / "text"
    result = train_text_baseline(clean_dir, FAST, out)
    assert result.model_dir == out and result.n_train == 13 * 4 + 1  # the price outlier is a fine text example
    assert {"config.json", "model.joblib", "history.json"} <= _files(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "text_baseline" and config["classes"] == CLASSES
    assert config["params"]["tfidf_max_features"] == 2000
    history = json.loads((out / "history.json").read_text())
    assert set(history[0]) >= {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"}

    model = load_sklearn_model(out)
    assert isinstance(model, SklearnTextClassifier) and model.classes == CLASSES
    texts = ["Lovely applianc applianc stuff", None, "videogam item for sale"]
    proba = model.predict_proba(texts)
    assert proba.shape == (3, 13)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert model.predict(["applianc item. Lovely applianc appliancstuff"]) == ["Appliances"]
    # keyword form shared with the neural classifiers
    assert model.predict_proba(images=[None], texts=["x"]).shape == (1, 13)

    scored = evaluate_baseline(out, clean_dir, "test")
    assert scored["metrics"]["n"] == 13 and scored["metrics"]["accuracy"] >= 0.8


def test_text_baseline_overwrites_atomically_and_keeps_missing_class_column(clean_dir: Path,
                                                                            tmp_path: Path) -> None:
    """A class with no train rows still gets its (zero) column, so codes stay aligned."""
    sparse = make_clean_dir(tmp_path / "sparse", drop_train_class=5)
    out = tmp_path / "text"
    train_text_baseline(clean_dir, FAST, out)
    train_text_baseline(sparse, FAST, out)
    proba = load_sklearn_model(out).predict_proba(["applianc item", "videogam item"])
    assert proba.shape == (2, 13)
    assert np.all(proba[:, 5] == 0.0)
    assert proba[0].argmax() == CLASSES.index("Appliances")


def test_missing_clean_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="labels.json"):
        train_text_baseline(tmp_path, FAST, tmp_path / "out")
    with pytest.raises(DataValidationError, match="config.json"):
        load_sklearn_model(tmp_path)


# --------------------------------------------------------------------------- price


def test_price_estimator_trains_saves_and_reloads(clean_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "price"
    result = train_price_estimator(clean_dir, FAST, out)
    assert result.n_train == 13 * 4  # the flagged £10M outlier is left out
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "price" and config["median_price"] < 100
    assert set(result.metrics["val"]) >= {"r2_log", "mae", "median_abs_error", "baseline_median_abs_error", "n"}

    model = load_sklearn_model(out)
    assert isinstance(model, SklearnPriceEstimator)
    frame = pd.DataFrame({
        "text": ["applianc item. Lovely applianc", "videogam item", None],
        "category": ["Appliances", "Video Games & Consoles", "Other Goods"],
        "town": ["Leeds", "Nowhere-on-Sea", None],  # an unseen town and a missing one still work
        "county": ["West Yorkshire", "Atlantis", ""],
        "extra": [1, 2, 3],
    })
    prices = model.predict_price(frame)
    assert prices.shape == (3,) and np.all(np.isfinite(prices)) and np.all(prices >= 0)
    assert prices[1] > prices[0]  # video games (label 12) are priced above appliances (label 0)
    with pytest.raises(ValueError, match="county"):
        model.predict_price(frame.drop(columns=["county"]))

    scored = evaluate_baseline(out, clean_dir, "test")["metrics"]
    assert scored["n"] == 13 and scored["median_abs_error"] < scored["baseline_median_abs_error"]


# --------------------------------------------------------------------------- pixels


def test_pixel_baseline_trains_saves_and_reloads(clean_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pixel"
    result = train_pixel_baseline(clean_dir, {**FAST, "pixel_logreg_c": 1.0}, out)
    assert result.n_train == 13 * 4 * 2
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "pixel_baseline" and config["preprocessing"]["pixel_size"] == 4

    model = load_sklearn_model(out)
    assert isinstance(model, SklearnPixelClassifier)
    photo = Image.new("RGB", (40, 30), _colour(3))
    grey = Image.new("L", (20, 20), 128)  # any mode is converted to RGB
    proba = model.predict_proba([photo, clean_dir / "images" / "p000i0.jpg", None, grey])
    assert proba.shape == (4, 13)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert proba[0].argmax() == 3 and proba[1].argmax() == 0
    np.testing.assert_allclose(proba[2], np.full(13, 1 / 13))  # no photo: the (balanced) prior
    assert image_to_pixels(photo, 4).shape == (4 * 4 * 3,)

    scored = evaluate_baseline(out, clean_dir, "val")["metrics"]
    assert scored["n"] == 26 and scored["accuracy"] > 0.5


# --------------------------------------------------------------------------- real data


def _real_clean_dir(root: Path) -> Path:
    """A clean layer built straight from the real Products.csv: root category, name + description,
    product-level stratified random split (70/15/15)."""
    from sklearn.model_selection import train_test_split

    frame = pd.read_csv(REAL_DATA / "Products.csv", lineterminator="\n", dtype=str, keep_default_na=False)
    frame["category"] = frame["category"].str.split(" / ").str[0].str.strip()
    name = frame["product_name"].str.replace(r"\s*\|\s*in .*\|\s*Gumtree\s*$", "", regex=True).str.strip()
    frame["text"] = name + ". " + frame["product_description"].str.replace("\r", " ")
    classes = sorted(frame["category"].unique())
    frame["label"] = frame["category"].map({c: i for i, c in enumerate(classes)})
    price = pd.to_numeric(frame["price"].str.replace("[£,]", "", regex=True), errors="coerce")
    frame["price"] = price
    frame["price_is_outlier"] = price.isna() | (price <= 0) | (price > 100_000)
    place = frame["location"].str.split(",", n=1)
    frame["town"], frame["county"] = place.str[0].str.strip(), place.str[1].fillna("").str.strip()
    frame = frame.rename(columns={"id": "product_id"})
    train, rest = train_test_split(frame.index, test_size=0.3, stratify=frame["label"], random_state=13)
    val, test = train_test_split(rest, test_size=0.5, stratify=frame.loc[rest, "label"], random_state=13)
    frame["split"] = "train"
    frame.loc[val, "split"] = "val"
    frame.loc[test, "split"] = "test"
    root.mkdir(parents=True, exist_ok=True)
    columns = ["product_id", "text", "category", "label", "price", "price_is_outlier", "town", "county", "split"]
    frame[columns].to_parquet(root / "products.parquet", index=False)
    (root / "labels.json").write_text(json.dumps({"classes": classes}), encoding="utf-8")
    return root


@pytest.mark.realdata
def test_text_baseline_on_real_data(tmp_path: Path) -> None:
    if not (REAL_DATA / "Products.csv").is_file():
        pytest.skip(f"real data not found at {REAL_DATA}")
    clean = _real_clean_dir(tmp_path / "clean")
    train_text_baseline(clean, load_params(), tmp_path / "text")
    metrics = evaluate_baseline(tmp_path / "text", clean, "test")["metrics"]
    assert len(metrics["per_class"]) == 13
    assert metrics["accuracy"] > 0.75, metrics


def test_title_vectoriser_sees_only_the_first_sentence() -> None:
    """A word in the title gets a title feature; the same word later in the description does not."""
    from pipeline_steps.baselines import _text_features

    features = _text_features({**baseline_params(FAST), "title_ngrams": True})
    assert [name for name, _ in features.transformer_list] == ["word", "char", "title"]
    features.fit(["Oak table. Seats six", "Pine chair. Sturdy", "Lamp. Oak base"])
    title = features.transformer_list[2][1]
    vocabulary = title.named_steps["tfidf"].vocabulary_
    assert "oak" in vocabulary and "base" not in vocabulary  # "base" only ever appears after the title
    as_title, in_description = title.transform(["Oak shelf. Nice", "Shelf. Oak finish"]).toarray()
    assert as_title[vocabulary["oak"]] > 0 and in_description[vocabulary["oak"]] == 0
    assert title.transform([None]).nnz == 0  # a missing text is an empty title, not an error

    without = _text_features({**baseline_params(FAST), "title_ngrams": False})
    assert [name for name, _ in without.transformer_list] == ["word", "char"]
