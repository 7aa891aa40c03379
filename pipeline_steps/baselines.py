"""Scikit-learn baselines (seed milestone 3): the bars the neural models must beat,
and the project's price estimator.

Three models, each trained on the clean layer's train split and saved as a
self-contained model directory (`config.json` + `model.joblib` + `history.json`):

- text baseline: TF-IDF (word 1–2 grams + char_wb n-grams, sublinear tf) → logistic
  regression over the 13 root categories. Cheap, strong on listing text (~81–85% on
  the real export), so a neural text model that does not beat it is not worth serving.
- price estimator (`marketplace-price-estimator`): TF-IDF on text + one-hot category,
  town and county → ridge regression on log1p(price). Log scale because prices span
  £1 to £10,000 and errors are relative; outlier-flagged prices are left out of the fit.
- pixel baseline: photos shrunk to `pixel_size`² RGB → standardise → logistic regression,
  the seeds' "pixels straight into a linear model" (~15%): a floor showing that image
  models learn more than colour.

`model.joblib` holds only scikit-learn objects (no functions from this package), so the
directory loads wherever scikit-learn of the same version is installed; the pixel
preprocessing (resize to `pixel_size`², scale to [0, 1]) is recorded in `config.json`
and applied by `load_sklearn_model(...)`'s wrappers.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
from PIL import Image
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from pipeline_steps.clean_schema import (  # noqa: F401  (re-exported: baselines.<name>)
    IMAGE_COLUMNS,
    IMAGES_FILE,
    PRODUCTS_FILE,
    load_classes,
    read_table,
)
from pipeline_steps.config import get
from pipeline_steps.errors import ConfigError, DataValidationError
from pipeline_steps.evaluation import classification_metrics, regression_metrics
from pipeline_steps.io_utils import atomic_dir, read_json, write_json
from pipeline_steps.text_features import text_titles

MODEL_FILE = "model.joblib"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"

KIND_TEXT = "text_baseline"
KIND_PIXEL = "pixel_baseline"
KIND_PRICE = "price"

PRICE_FEATURE_COLUMNS: tuple[str, ...] = ("text", "category", "town", "county")
"""Columns `predict_price` needs (extra columns are ignored)."""

PRODUCT_COLUMNS: tuple[str, ...] = ("product_id", "text", "category", "label", "price",
                                    "price_is_outlier", "town", "county", "split")
"""The products.parquet columns the scikit-learn models read (the whole contract: clean_schema.PRODUCT_COLUMNS)."""

# --------------------------------------------------------------------------- params and data


def baseline_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`train.baselines` plus `train.seed` as `seed`, checked against params.yaml's schema.

    Args:
        params: the whole params.yaml dict (what flows pass), or the `train.baselines`
            mapping with a `seed` key (handy in tests).

    Returns:
        The section as a plain dict with `seed`; every key is required (no defaults here).

    Raises:
        ConfigError: naming each missing, unknown or out-of-range key.
    """
    from pipeline_steps import settings

    if "train" in params:
        section, seed = dict(get(params, "train.baselines")), get(params, "train.seed")
    else:
        section = dict(params)
        seed = section.pop("seed", None)
    checked = settings.section(settings.BaselineSettings, section, "train.baselines")
    if seed is None:
        raise ConfigError("params.yaml key 'train.seed' is missing (pass 'seed' with a bare train.baselines section)")
    return {**checked.model_dump(), "seed": int(seed)}


def load_clean_products(clean_dir: str | Path, split: str | None = None) -> pd.DataFrame:
    """Products of the clean layer (optionally one split), with text/location NaNs as ''."""
    frame = read_table(clean_dir, PRODUCTS_FILE, PRODUCT_COLUMNS, split)
    for column in ("text", "category", "town", "county"):
        frame[column] = frame[column].fillna("").astype(str)
    return frame


def load_clean_images(clean_dir: str | Path, split: str | None = None) -> pd.DataFrame:
    """Image rows of the clean layer (optionally one split)."""
    return read_table(clean_dir, IMAGES_FILE, IMAGE_COLUMNS, split)


def _check_labels(labels: np.ndarray, classes: Sequence[str], source: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataValidationError(f"{source}: label codes outside [0, {len(classes)}) of labels.json")


# --------------------------------------------------------------------------- model builders


def _text_features(p: Mapping[str, Any]) -> FeatureUnion | TfidfVectorizer:
    """Word 1–2 grams catch product words and phrases; char_wb n-grams catch misspellings,
    plurals and brand fragments ("iphone11", "ps4") that word tokens split badly; word n-grams of
    the title alone make a title word count more than the same word deep in a description
    (`title_ngrams`: +1.6 val / +0.5 test points of accuracy on the real listings)."""
    max_features = int(p["tfidf_max_features"])

    def words() -> TfidfVectorizer:
        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=bool(p["sublinear_tf"]), strip_accents="unicode",
                               min_df=1, max_features=max_features, dtype=np.float32)

    parts: list[tuple[str, Any]] = [("word", words())]
    if p["char_ngrams"]:
        low, high = (int(v) for v in p["char_ngram_range"])
        parts.append(("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(low, high), sublinear_tf=bool(p["sublinear_tf"]),
                                              strip_accents="unicode", min_df=2, max_features=max_features, dtype=np.float32)))
    if p["title_ngrams"]:
        parts.append(("title", Pipeline([("first_sentence", FunctionTransformer(text_titles)), ("tfidf", words())])))
    return parts[0][1] if len(parts) == 1 else FeatureUnion(parts)


def build_text_pipeline(params: Mapping[str, Any]) -> Pipeline:
    """TF-IDF features → multinomial logistic regression (C = `logreg_c`)."""
    p = baseline_params(params)
    return Pipeline([
        ("tfidf", _text_features(p)),
        ("clf", LogisticRegression(C=float(p["logreg_c"]), max_iter=int(p["max_iter"]), random_state=p["seed"])),
    ])


def build_price_pipeline(params: Mapping[str, Any]) -> Pipeline:
    """Text TF-IDF + one-hot category/town/county → ridge (alpha = `price_alpha`) on log1p(price).

    Unknown towns at prediction time encode as all-zero (handle_unknown="ignore"), so a
    listing from a new place still gets a price from its text and category.
    """
    p = baseline_params(params)
    features = ColumnTransformer([
        ("text", _text_features(p), "text"),
        ("place", OneHotEncoder(handle_unknown="ignore", dtype=np.float32), ["category", "town", "county"]),
    ])
    return Pipeline([("features", features), ("ridge", Ridge(alpha=float(p["price_alpha"])))])


def build_pixel_pipeline(params: Mapping[str, Any]) -> Pipeline:
    """Standardise each pixel channel, then logistic regression (C = `pixel_logreg_c`).

    Strong regularisation: 768 raw pixels on a few thousand photos overfit otherwise.
    """
    p = baseline_params(params)
    return Pipeline([
        ("scale", StandardScaler()),
        ("clf", LogisticRegression(C=float(p["pixel_logreg_c"]), max_iter=int(p["max_iter"]),
                                   random_state=p["seed"])),
    ])


# --------------------------------------------------------------------------- pixel preprocessing


def image_to_pixels(image: Image.Image | str | Path, pixel_size: int) -> np.ndarray:
    """One photo → flat float32 vector of `pixel_size`² RGB values in [0, 1].

    Box resampling averages every source pixel (an anti-aliased thumbnail, not a sample of
    a few pixels); JPEG draft mode decodes files at a reduced scale first, for speed.
    """
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            opened.draft("RGB", (pixel_size * 2, pixel_size * 2))
            return image_to_pixels(opened.convert("RGB"), pixel_size)
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    small = rgb.resize((pixel_size, pixel_size), Image.Resampling.BOX)
    return (np.asarray(small, dtype=np.float32) / 255.0).reshape(-1)


def images_to_matrix(images: Sequence[Image.Image | str | Path], pixel_size: int) -> np.ndarray:
    """Stack `image_to_pixels` rows into an (n, pixel_size² · 3) matrix."""
    width = pixel_size * pixel_size * 3
    if not images:
        return np.zeros((0, width), dtype=np.float32)
    return np.stack([image_to_pixels(image, pixel_size) for image in images])


# --------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class TrainedBaseline:
    """What a train_* call produced: where the model is and how it scored on train/val."""

    model_dir: Path
    kind: str
    n_train: int
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


def _save_model(out_dir: str | Path, estimator: Pipeline, config: dict[str, Any],
                history: list[dict[str, Any]]) -> Path:
    """Write config.json, model.joblib and history.json into a fresh dir, swapped in atomically."""
    config = {**config, "framework": "scikit-learn", "sklearn_version": sklearn.__version__,
              "python_version": platform.python_version(), "model_file": MODEL_FILE}
    with atomic_dir(out_dir) as tmp:
        joblib.dump(estimator, tmp / MODEL_FILE, compress=3)
        write_json(tmp / CONFIG_FILE, config)
        write_json(tmp / HISTORY_FILE, history)
    return Path(out_dir)


def _classifier_history(train: dict[str, Any], val: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A one-'epoch' history in the neural models' format, so the same plots/CSVs work."""
    row: dict[str, Any] = {"epoch": 1, "train_loss": train["log_loss"], "train_accuracy": train["accuracy"]}
    if val is not None:
        row.update(val_loss=val["log_loss"], val_accuracy=val["accuracy"])
    return [row]


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "per_class"}


# --------------------------------------------------------------------------- training


def train_text_baseline(clean_dir: str | Path, params: Mapping[str, Any], out_dir: str | Path) -> TrainedBaseline:
    """Fit TF-IDF + logistic regression on train-split `text` → 13-way `label`; save to `out_dir`.

    Returns train and val metrics (val omitted when the clean layer has no val rows).
    """
    p = baseline_params(params)
    classes = load_classes(clean_dir)
    products = load_clean_products(clean_dir)
    train = products[products["split"] == "train"]
    if train.empty:
        raise DataValidationError(f"{Path(clean_dir) / 'products.parquet'} has no train-split products")
    y = train["label"].to_numpy(dtype=int)
    _check_labels(y, classes, "products.parquet")

    model = build_text_pipeline(p)
    model.fit(train["text"].tolist(), y)
    wrapper = SklearnTextClassifier(model, classes, {})
    metrics = {"train": classification_metrics(y, wrapper.predict_proba(train["text"].tolist()), classes)}
    val = products[products["split"] == "val"]
    if not val.empty:
        metrics["val"] = classification_metrics(val["label"].to_numpy(dtype=int),
                                                wrapper.predict_proba(val["text"].tolist()), classes)

    config = {
        "kind": KIND_TEXT,
        "task": "classification",
        "architecture": "tfidf(word 1-2" + (f" + char_wb {p['char_ngram_range']}" if p["char_ngrams"] else "")
                        + ") -> LogisticRegression",
        "classes": classes,
        "input": "text (product_name + '. ' + product_description)",
        "preprocessing": {"sublinear_tf": p["sublinear_tf"], "char_ngrams": p["char_ngrams"],
                          "char_ngram_range": p["char_ngram_range"], "max_features": p["tfidf_max_features"]},
        "params": p,
        "n_train": int(len(train)),
        "metrics": {split: _summary(m) for split, m in metrics.items()},
    }
    path = _save_model(out_dir, model, config, _classifier_history(metrics["train"], metrics.get("val")))
    return TrainedBaseline(path, KIND_TEXT, int(len(train)), metrics)


def _price_rows(products: pd.DataFrame) -> pd.DataFrame:
    """Rows usable for price: a finite, non-negative price that cleaning did not flag as an outlier."""
    price = pd.to_numeric(products["price"], errors="coerce")
    outlier = products["price_is_outlier"].fillna(True).astype(bool)
    keep = price.notna() & np.isfinite(price) & (price >= 0) & ~outlier
    return products[keep].reset_index(drop=True)


def train_price_estimator(clean_dir: str | Path, params: Mapping[str, Any], out_dir: str | Path) -> TrainedBaseline:
    """Fit the price estimator (ridge on log1p(price)) on non-outlier train rows; save to `out_dir`.

    The constant baseline (training median price) is stored in config.json, so evaluation
    can report `baseline_median_abs_error` for any split without re-reading the train data.
    """
    p = baseline_params(params)
    products = load_clean_products(clean_dir)
    train = _price_rows(products[products["split"] == "train"])
    if len(train) < 2:
        raise DataValidationError(f"{Path(clean_dir) / 'products.parquet'} has fewer than 2 train-split "
                                  "products with a usable (non-outlier) price")
    price = train["price"].astype(float).to_numpy()
    model = build_price_pipeline(p)
    model.fit(train[list(PRICE_FEATURE_COLUMNS)], np.log1p(price))
    median_price = float(np.median(price))

    wrapper = SklearnPriceEstimator(model, {"median_price": median_price})
    metrics = {"train": regression_metrics(price, wrapper.predict_price(train), median_price)}
    val = _price_rows(products[products["split"] == "val"])
    if not val.empty:
        metrics["val"] = regression_metrics(val["price"].astype(float), wrapper.predict_price(val), median_price)

    config = {
        "kind": KIND_PRICE,
        "task": "regression",
        "architecture": "[tfidf(text), onehot(category, town, county)] -> Ridge on log1p(price)",
        "target": "log1p(price_gbp)",
        "input_columns": list(PRICE_FEATURE_COLUMNS),
        "median_price": median_price,
        "params": p,
        "n_train": int(len(train)),
        "metrics": metrics,
    }
    history = [{"epoch": 1, **{f"{split}_{k}": v for split, m in metrics.items() for k, v in m.items() if k != "n"}}]
    path = _save_model(out_dir, model, config, history)
    return TrainedBaseline(path, KIND_PRICE, int(len(train)), metrics)


def train_pixel_baseline(clean_dir: str | Path, params: Mapping[str, Any], out_dir: str | Path) -> TrainedBaseline:
    """Fit standardised-pixels logistic regression on train-split photos (one row per photo)."""
    p = baseline_params(params)
    size = int(p["pixel_size"])
    clean_dir = Path(clean_dir)
    classes = load_classes(clean_dir)
    images = load_clean_images(clean_dir)
    train = images[images["split"] == "train"]
    if train.empty:
        raise DataValidationError(f"{clean_dir / 'images.parquet'} has no train-split images")
    y = train["label"].to_numpy(dtype=int)
    _check_labels(y, classes, "images.parquet")
    x = images_to_matrix([clean_dir / rel for rel in train["path"]], size)

    model = build_pixel_pipeline(p)
    model.fit(x, y)
    wrapper = SklearnPixelClassifier(model, classes, {"pixel_size": size})
    metrics = {"train": classification_metrics(y, wrapper.predict_proba_matrix(x), classes)}
    val = images[images["split"] == "val"]
    if not val.empty:
        x_val = images_to_matrix([clean_dir / rel for rel in val["path"]], size)
        metrics["val"] = classification_metrics(val["label"].to_numpy(dtype=int),
                                                wrapper.predict_proba_matrix(x_val), classes)

    config = {
        "kind": KIND_PIXEL,
        "task": "classification",
        "architecture": "pixels -> StandardScaler -> LogisticRegression",
        "classes": classes,
        "input": "image (one row per photo)",
        "preprocessing": {"pixel_size": size, "mode": "RGB", "resample": "box", "scale": "1/255"},
        "pixel_size": size,
        "class_counts": np.bincount(y, minlength=len(classes)).tolist(),
        "params": p,
        "n_train": int(len(train)),
        "metrics": {split: _summary(m) for split, m in metrics.items()},
    }
    path = _save_model(out_dir, model, config, _classifier_history(metrics["train"], metrics.get("val")))
    return TrainedBaseline(path, KIND_PIXEL, int(len(train)), metrics)


# --------------------------------------------------------------------------- loading and predicting


def _align_proba(estimator: Any, raw: np.ndarray, n_classes: int) -> np.ndarray:
    """Place the estimator's columns at their label codes: a class absent from the training
    split gets probability 0 instead of shifting every later column by one."""
    out = np.zeros((raw.shape[0], n_classes), dtype=np.float64)
    out[:, np.asarray(estimator.classes_, dtype=int)] = raw
    return out


class SklearnTextClassifier:
    """Loaded text baseline. `predict_proba(texts)` → (n, n_classes); None texts count as ''.

    `images` is accepted and ignored, so callers can use the neural classifiers' keyword
    form `predict_proba(images=..., texts=...)` for every model (the positional order of the
    neural models, images first, does not apply here: pass keywords when mixing kinds).
    """

    kind = KIND_TEXT

    def __init__(self, model: Pipeline, classes: Sequence[str], config: Mapping[str, Any]) -> None:
        self.model = model
        self.classes = list(classes)
        self.config = dict(config)

    def predict_proba(self, texts: Sequence[str | None] | None = None, *, images: Any = None) -> np.ndarray:
        if texts is None:
            raise ValueError("the text baseline needs texts")
        cleaned = ["" if t is None else str(t) for t in texts]
        if not cleaned:
            return np.zeros((0, len(self.classes)))
        return _align_proba(self.model, self.model.predict_proba(cleaned), len(self.classes))

    def predict(self, texts: Sequence[str | None]) -> list[str]:
        """Most probable class name per text."""
        return [self.classes[i] for i in self.predict_proba(texts).argmax(axis=1)]


class SklearnPixelClassifier:
    """Loaded pixel baseline. `predict_proba(images)` → (n, n_classes).

    Images are PIL images or file paths; a None image (listing with no photo) gets the
    training class prior, the honest answer of a model that sees nothing.
    """

    kind = KIND_PIXEL

    def __init__(self, model: Pipeline, classes: Sequence[str], config: Mapping[str, Any]) -> None:
        self.model = model
        self.classes = list(classes)
        self.config = dict(config)
        self.pixel_size = int(self.config.get("pixel_size", 16))

    def _prior(self) -> np.ndarray:
        """Training class frequencies (config `class_counts`); uniform over known classes if absent."""
        counts = np.zeros(len(self.classes))
        saved = self.config.get("class_counts")
        if saved and sum(saved) > 0:
            counts[:] = np.asarray(saved, dtype=float)
        else:
            counts[np.asarray(self.model.named_steps["clf"].classes_, dtype=int)] = 1.0
        return counts / counts.sum()

    def predict_proba_matrix(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for already-preprocessed pixel rows (see `images_to_matrix`)."""
        if x.shape[0] == 0:
            return np.zeros((0, len(self.classes)))
        return _align_proba(self.model, self.model.predict_proba(x), len(self.classes))

    def predict_proba(self, images: Sequence[Image.Image | str | Path | None] | None = None, *,
                      texts: Any = None) -> np.ndarray:
        if images is None:
            raise ValueError("the pixel baseline needs images")
        out = np.tile(self._prior(), (len(images), 1))
        present = [i for i, image in enumerate(images) if image is not None]
        if present:
            x = images_to_matrix([images[i] for i in present], self.pixel_size)
            out[present] = self.predict_proba_matrix(x)
        return out

    def predict(self, images: Sequence[Image.Image | str | Path | None]) -> list[str]:
        """Most probable class name per image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(axis=1)]


class SklearnPriceEstimator:
    """Loaded price estimator. `predict_price(frame)` → prices in £ (>= 0).

    `frame` needs columns text, category, town, county; missing values count as ''.
    """

    kind = KIND_PRICE

    def __init__(self, model: Pipeline, config: Mapping[str, Any]) -> None:
        self.model = model
        self.classes: list[str] = []  # a regressor: no classes (kept so callers can test `.classes`)
        self.config = dict(config)
        self.median_price = float(self.config.get("median_price", float("nan")))

    def predict_price(self, frame: pd.DataFrame | Mapping[str, Sequence[Any]]) -> np.ndarray:
        frame = pd.DataFrame(frame)
        missing = [c for c in PRICE_FEATURE_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"price prediction input lacks column(s) {', '.join(missing)}")
        if frame.empty:
            return np.zeros(0)
        features = frame[list(PRICE_FEATURE_COLUMNS)].fillna("").astype(str).reset_index(drop=True)
        log_price = self.model.predict(features)
        return np.clip(np.expm1(log_price), 0.0, None)


SklearnModel = SklearnTextClassifier | SklearnPixelClassifier | SklearnPriceEstimator


def load_sklearn_model(model_dir: str | Path) -> SklearnModel:
    """Load a baseline/price model directory written by a train_* function above."""
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    model_path = model_dir / MODEL_FILE
    if not config_path.is_file() or not model_path.is_file():
        raise DataValidationError(f"{model_dir} is not a scikit-learn model directory "
                                  f"(needs {CONFIG_FILE} and {MODEL_FILE})")
    config = read_json(config_path)
    model = joblib.load(model_path)
    kind = config.get("kind")
    if kind == KIND_TEXT:
        return SklearnTextClassifier(model, config["classes"], config)
    if kind == KIND_PIXEL:
        return SklearnPixelClassifier(model, config["classes"], config)
    if kind == KIND_PRICE:
        return SklearnPriceEstimator(model, config)
    raise DataValidationError(f"{config_path}: unknown kind {kind!r} (expected {KIND_TEXT}, {KIND_PIXEL}, {KIND_PRICE})")


# --------------------------------------------------------------------------- evaluation on a split


def evaluate_baseline(model_dir: str | Path, clean_dir: str | Path, split: str = "test") -> dict[str, Any]:
    """Score a saved baseline on one split of the clean layer, as the evaluate stage does.

    Returns {"metrics": ..., "y_true": ..., "y_pred": ..., "ids": ...} (label codes for
    classifiers, prices for the estimator; `ids` = the product_id of each scored row, which
    the registry hashes so two versions are only compared on the same rows).
    """
    model = load_sklearn_model(model_dir)
    clean_dir = Path(clean_dir)
    if isinstance(model, SklearnPriceEstimator):
        rows = _price_rows(load_clean_products(clean_dir, split))
        if rows.empty:
            raise DataValidationError(f"no '{split}' products with a usable price in {clean_dir}")
        truth = rows["price"].astype(float).to_numpy()
        predicted = model.predict_price(rows)
        return {"metrics": regression_metrics(truth, predicted, model.median_price),
                "y_true": truth, "y_pred": predicted, "ids": rows["product_id"].astype(str).tolist()}
    if isinstance(model, SklearnTextClassifier):
        rows = load_clean_products(clean_dir, split)
        proba = model.predict_proba(rows["text"].tolist()) if not rows.empty else None
    else:
        rows = load_clean_images(clean_dir, split)
        proba = model.predict_proba([clean_dir / rel for rel in rows["path"]]) if not rows.empty else None
    if proba is None:
        raise DataValidationError(f"no '{split}' rows in {clean_dir}")
    truth = rows["label"].to_numpy(dtype=int)
    return {"metrics": classification_metrics(truth, proba, model.classes),
            "y_true": truth, "y_pred": proba.argmax(axis=1), "ids": rows["product_id"].astype(str).tolist()}
