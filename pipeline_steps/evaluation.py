"""Model quality, reported the same way for every model.

Every classifier (TF-IDF baseline, pixel baseline, image/text/multimodal networks)
is scored by `classification_metrics` and the price estimator by
`regression_metrics`, so the metric names are identical across MLflow runs and
`dvc metrics diff` lines them up without any per-model glue. `score_model` scores one
trained model directory on a split of the clean layer: the evaluate stage calls it, and
the register stage calls it again to re-score a champion on new rows.

The price estimator is scored the way it is served (`score_price`): the service asks it
for a price with the category its text classifier predicts (service/engine.py:
`predict_batch`), so the headline `median_abs_error` uses that predicted category and the
listing's own town/county; the number with the true category stays as
`median_abs_error_true_category`, and `median_abs_error_no_location` is what a request
without a location gets.

The PNG figures (confusion matrix, per-class bars, training curves) are drawn by
`pipeline_steps/visualise.py`; this module writes the numbers and the plot data
(`dvc plots` CSVs). Every file is written to a temporary sibling first and moved into
place, so DVC never tracks half a file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_fscore_support, r2_score

from pipeline_steps.clean_schema import load_classes
from pipeline_steps.errors import PipelineError
from pipeline_steps.io_utils import read_json, write_csv, write_json
from pipeline_steps.model_kinds import CLASSIFIER_KINDS, PRICE_CATEGORY_KIND, SKLEARN_KINDS  # noqa: F401  (re-exported)
from pipeline_steps.promotion import CATEGORY_MODEL_KEY, MODEL_RUN_KEY, SPLIT_HASH_KEY, split_hash  # noqa: F401  (what evaluate writes)

HISTORY_COLUMNS: tuple[str, ...] = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
"""Per-epoch columns every model's history uses (`reports/plots/<model>_history.csv`)."""

_PROBA_EPS = 1e-15



# --------------------------------------------------------------------------- metrics


def label_codes(y: Sequence[Any] | np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Accept labels as int codes or class names; return int codes.

    Callers hold either the `label` column (ints) or `category` (names); accepting both
    avoids a silent mismatch where names are compared with integer predictions.
    """
    values = np.asarray(list(y) if not isinstance(y, np.ndarray) else y)
    n_classes = len(classes)
    if values.size == 0:
        return values.astype(int)
    if values.dtype.kind in "iu":
        codes = values.astype(int)
    elif values.dtype.kind == "f" and np.all(np.mod(values, 1) == 0):
        codes = values.astype(int)
    else:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({str(v) for v in values if v not in index})
        if unknown:
            raise ValueError(f"labels not among the model's classes: {unknown[:5]}")
        codes = np.array([index[v] for v in values], dtype=int)
    if codes.min() < 0 or codes.max() >= n_classes:
        raise ValueError(f"label codes must lie in [0, {n_classes}); got {codes.min()}..{codes.max()}")
    return codes


def _normalise_proba(proba: np.ndarray | Sequence[Sequence[float]], n_classes: int) -> np.ndarray:
    array = np.asarray(proba, dtype=float)
    if array.ndim != 2 or array.shape[1] != n_classes:
        raise ValueError(f"proba must have shape (n, {n_classes}); got {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError("proba must hold finite, non-negative probabilities")
    sums = array.sum(axis=1, keepdims=True)
    sums[sums == 0] = 1.0
    return array / sums


def classification_metrics(
    y_true: Sequence[Any] | np.ndarray,
    proba: np.ndarray | Sequence[Sequence[float]],
    classes: Sequence[str],
) -> dict[str, Any]:
    """Score class probabilities against true labels.

    Returns `accuracy`, `macro_f1`, `weighted_f1`, `top3_accuracy`, `log_loss`, `n`
    and `per_class` ({class: {precision, recall, f1, support}} for every class, support 0
    included, so every run carries the same keys). Macro/weighted F1 follow scikit-learn's
    defaults (averaged over the classes that occur in y_true or the predictions; zero where
    a class is never predicted). Probabilities are renormalised per row and clipped at
    1e-15 for the log-loss, so a confident wrong answer costs a large but finite amount.
    `y_true` may hold int codes (index into `classes`) or class names.
    """
    classes = list(classes)
    n_classes = len(classes)
    y = label_codes(y_true, classes)
    p = _normalise_proba(proba, n_classes)
    if len(y) != p.shape[0]:
        raise ValueError(f"y_true has {len(y)} rows but proba has {p.shape[0]}")
    if len(y) == 0:
        raise ValueError("cannot score an empty set (n = 0)")

    y_pred = p.argmax(axis=1)
    k = min(3, n_classes)
    top_k = np.argsort(-p, axis=1, kind="stable")[:, :k]
    top3 = float(np.mean(np.any(top_k == y[:, None], axis=1)))
    log_loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], _PROBA_EPS, 1.0))))

    precision, recall, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=list(range(n_classes)), zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "n": int(len(y)),
        "accuracy": float(np.mean(y_pred == y)),
        "macro_f1": float(f1_score(y, y_pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y, y_pred, average="weighted", zero_division=0)),
        "top3_accuracy": top3,
        "log_loss": log_loss,
        "per_class": per_class,
    }


def regression_metrics(
    y_true_price: Sequence[float] | np.ndarray,
    y_pred_price: Sequence[float] | np.ndarray,
    baseline_price: float | Sequence[float] | np.ndarray,
) -> dict[str, Any]:
    """Score price predictions (in £) against a constant baseline (the training median).

    `r2_log` is R² on log1p(price), the scale the estimator is fitted on and where a £5 miss
    on a £10 item counts as much as a £500 miss on a £1,000 one. `mae` and
    `median_abs_error` are in £; `baseline_median_abs_error` (and `baseline_mae`) are what
    always answering `baseline_price` would score, the bar a useful estimator must clear.
    Negative predictions are clipped to 0 before taking logs.
    """
    true = np.asarray(y_true_price, dtype=float).ravel()
    pred = np.asarray(y_pred_price, dtype=float).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"y_true_price has {true.size} rows but y_pred_price has {pred.size}")
    if true.size == 0:
        raise ValueError("cannot score an empty set (n = 0)")
    baseline = np.broadcast_to(np.asarray(baseline_price, dtype=float), true.shape)
    if not (np.all(np.isfinite(true)) and np.all(np.isfinite(pred)) and np.all(np.isfinite(baseline))):
        raise ValueError("prices must be finite")
    log_true = np.log1p(np.clip(true, 0.0, None))
    log_pred = np.log1p(np.clip(pred, 0.0, None))
    r2 = float(r2_score(log_true, log_pred)) if true.size >= 2 else float("nan")
    return {
        "n": int(true.size),
        "r2_log": r2,
        "mae": float(np.mean(np.abs(true - pred))),
        "median_abs_error": float(np.median(np.abs(true - pred))),
        "baseline_mae": float(np.mean(np.abs(true - baseline))),
        "baseline_median_abs_error": float(np.median(np.abs(true - baseline))),
    }


def _metric_key(name: Any) -> str:
    """MLflow accepts only [A-Za-z0-9_-. /] in metric names; class names hold '&' and ','."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", str(name)).strip("_").lower()


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics into `<prefix>_<key>_<subkey>` floats for MLflow and DVC.

    `flatten_metrics({"accuracy": .8, "per_class": {"Home & Garden": {"f1": .7}}}, "test")`
    gives `{"test_accuracy": .8, "test_per_class_home_garden_f1": .7}`. Non-numeric values
    and None/NaN are dropped (MLflow rejects them and they carry no comparison).
    """
    flat: dict[str, float] = {}

    def walk(node: Mapping[str, Any], stem: str) -> None:
        for key, value in node.items():
            name = f"{stem}_{_metric_key(key)}" if stem else _metric_key(key)
            if isinstance(value, Mapping):
                walk(value, name)
            elif isinstance(value, (bool, np.bool_)):
                flat[name] = float(value)
            elif isinstance(value, (int, float, np.integer, np.floating)):
                number = float(value)
                if math.isfinite(number):
                    flat[name] = number

    walk(metrics, _metric_key(prefix) if prefix else "")
    return flat


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; DVC and browsers choke on them, so they become null."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write metrics atomically as key-sorted JSON (`dvc metrics show/diff` read it nested)."""
    return write_json(path, _json_safe(metrics))


# --------------------------------------------------------------------------- plot data (dvc plots)


def write_plot_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write a list of records as CSV for `dvc plots` (one row per x value, e.g. per epoch).

    `columns` fixes the column order (missing ones become empty cells); extra keys follow.
    """
    frame = pd.DataFrame(list(rows))
    if columns is not None:
        ordered = list(columns) + [c for c in frame.columns if c not in columns]
        frame = frame.reindex(columns=ordered)
    return write_csv(frame, path)


def write_history_csv(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Per-epoch curves with the standard columns first (`reports/plots/<model>_history.csv`)."""
    rows = [{"epoch": row.get("epoch", i + 1), **row} for i, row in enumerate(history)]
    return write_plot_csv(path, rows, HISTORY_COLUMNS)


def write_predictions_csv(
    path: str | Path,
    y_true: Sequence[Any] | np.ndarray,
    y_pred: Sequence[Any] | np.ndarray,
    classes: Sequence[str],
) -> Path:
    """`actual,predicted` class names per row: the input of DVC's `confusion` plot template."""
    classes = list(classes)
    names = np.asarray(classes, dtype=object)
    frame = pd.DataFrame(
        {"actual": names[label_codes(y_true, classes)], "predicted": names[label_codes(y_pred, classes)]}
    )
    return write_csv(frame, path)


# --------------------------------------------------------------------------- scoring a trained model directory


class Scored(NamedTuple):
    """What scoring one model on a split gives: its metrics and what the figures and the registry need."""

    metrics: dict[str, Any]
    y_true: np.ndarray
    y_pred: np.ndarray
    classes: list[str]
    ids: list[str]  # product_id of each scored row (one per photo for the image models)


def per_product_scores(proba: np.ndarray, product_ids: Sequence[str], labels: Sequence[Any], classes: Sequence[str], pooling: str | None) -> dict[str, Any]:
    """An image model's accuracy, macro-F1 and top-3 per product: its photos' predictions pooled by
    `image_features.pool_by_product` (mean of log-probabilities unless `pooling` says `mean`)."""
    from pipeline_steps.image_features import check_pooling, pool_by_product  # torch: only for the networks

    pooling = check_pooling(pooling)
    _, product_labels, pooled = pool_by_product(proba, product_ids, labels, pooling)
    scored = classification_metrics(product_labels, pooled, classes)
    return {k: scored[k] for k in ("accuracy", "macro_f1", "top3_accuracy", "n")} | {"pooling": pooling}


def score_model(
    kind: str,
    model_dir: str | Path,
    clean_dir: str | Path,
    category_model_dir: str | Path | None = None,
    split: str = "test",
    feature_cache_dir: str | Path | None = None,
    text_cache_dir: str | Path | None = None,
) -> Scored:
    """Score one trained model directory on a split of the clean layer, the same way for every kind.

    Args:
        kind: image | text | multimodal (networks), text-baseline | pixel-baseline (scikit-learn)
            or price.
        model_dir: the model directory (train.models_dir/<kind>, or a champion downloaded from the
            registry for a re-score).
        clean_dir: the clean layer whose `split` rows are scored.
        category_model_dir: for `price` only: the classifier served beside the price estimator
            (PRICE_CATEGORY_KIND); the price is scored with the category it predicts, as served.
        split: the split to score (the test split for every number that is registered).
        feature_cache_dir: for the image and multimodal models: the image model's feature cache
            (`train.image.features_dir`, read only). The train_image stage stores every split's photos
            there; an entry is used only when its backbone identity matches the model's (else the
            photos run through the network), and the cached path computes what the network computes
            on the photo (tests/test_pretrained_image.py). None: every photo runs through the network.
        text_cache_dir: for the text and multimodal models: the training's text-vector cache
            (`text_embedding_cache.embedding_cache_dir`, read only), used when it holds every text's
            vector for the model's exact encoder weights (else the texts run through the encoder).

    Returns:
        Scored: metrics (classification_metrics / score_price, plus `unit` for classifiers),
        y_true and y_pred for the confusion matrix (label codes; prices for the estimator), the
        class names and the product_id of each scored row (the registry hashes them).
    """
    model_dir, clean_dir = Path(model_dir), Path(clean_dir)
    if kind in CLASSIFIER_KINDS:
        from pipeline_steps import inference  # torch: only for the networks

        classifier = inference.load_classifier(model_dir)
        prediction = inference.predict_split(classifier, clean_dir, split, feature_cache_dir=feature_cache_dir, text_cache_dir=text_cache_dir)
        metrics = classification_metrics(prediction.labels, prediction.proba, classifier.classes)
        metrics["unit"] = "image" if kind == "image" else "product"
        ids = prediction.ids["product_id"].astype(str).tolist()
        if kind == "image":  # issue 9: a listing's photos pooled into one prediction (train.image.product_pooling)
            metrics["per_product"] = per_product_scores(prediction.proba, ids, prediction.labels, classifier.classes,
                                                        classifier.config.get("params", {}).get("product_pooling"))
        return Scored(metrics, prediction.labels, prediction.proba.argmax(axis=1), list(classifier.classes), ids)
    if kind not in SKLEARN_KINDS:
        raise PipelineError(f"unknown model kind {kind!r}; accepted: {', '.join(CLASSIFIER_KINDS + SKLEARN_KINDS)}")
    classes = load_classes(clean_dir)
    if kind == "price":
        if category_model_dir is None:
            raise PipelineError(
                "the price model is scored with the category its served classifier predicts: "
                f"pass category_model_dir (the {PRICE_CATEGORY_KIND} classifier's model directory)"
            )
        return score_price(model_dir, clean_dir, category_model_dir, split)._replace(classes=classes)
    from pipeline_steps.baselines import evaluate_baseline  # it imports this module

    result = evaluate_baseline(model_dir, clean_dir, split)
    metrics = result["metrics"]
    metrics["unit"] = "image" if kind == "pixel-baseline" else "product"
    return Scored(metrics, np.asarray(result["y_true"]), np.asarray(result["y_pred"]), classes, result["ids"])


def predict_categories(category_model_dir: str | Path, texts: Sequence[str]) -> list[str]:
    """The category a classifier predicts for each listing text, as the service asks it (text only, no photo).

    Args:
        category_model_dir: a text (or multimodal) network's model directory, or a scikit-learn
            text baseline's (config.json `kind: text_baseline`).
        texts: the listing texts (name + ". " + description, the clean layer's `text`).

    Returns:
        One class name per text (the argmax of the classifier's probabilities).
    """
    category_model_dir = Path(category_model_dir)
    if not texts:
        return []
    kind = read_json(category_model_dir / "config.json").get("kind")
    if kind == "text_baseline":
        from pipeline_steps.baselines import load_sklearn_model

        model = load_sklearn_model(category_model_dir)
        proba = model.predict_proba(list(texts))
    else:
        from pipeline_steps import inference

        model = inference.load_classifier(category_model_dir)
        proba = model.predict_proba([None] * len(texts), list(texts))
    classes = [str(c) for c in model.classes]
    return [classes[int(i)] for i in np.asarray(proba).argmax(axis=1)]


def score_price(model_dir: str | Path, clean_dir: str | Path, category_model_dir: str | Path, split: str = "test") -> Scored:
    """Score the price estimator as it is served: category predicted by its served classifier, location as given.

    The service's `/predict` asks the price model with the category the classifier predicted
    for the request (service/engine.py: `predict_batch`), not the seller's own category, so a
    miss-classified listing gets the price of another category. Scoring with the true category
    would promote a median error users never see.

    Args:
        model_dir: the price estimator's model directory.
        clean_dir: the clean layer (rows with a usable, non-outlier price are scored).
        category_model_dir: the classifier served beside it (see PRICE_CATEGORY_KIND).
        split: the split to score.

    Returns:
        Scored with regression_metrics of the served prediction (`median_abs_error`, `r2_log`, ...)
        plus `median_abs_error_true_category`, `r2_log_true_category`, `mae_true_category` (the
        seller's category: the number before this change), `median_abs_error_no_location` (served
        category, no town/county: a request without a location) and `category_accuracy` (how
        often the served category is the true one on these rows).
    """
    from pipeline_steps.baselines import evaluate_baseline, load_clean_products, load_sklearn_model

    true_category = evaluate_baseline(model_dir, clean_dir, split)  # the rows scored + the seller's category
    ids = [str(i) for i in true_category["ids"]]
    truth = np.asarray(true_category["y_true"], dtype=float)
    products = load_clean_products(clean_dir, split)
    rows = products.assign(product_id=products["product_id"].astype(str)).drop_duplicates("product_id")
    rows = rows.set_index("product_id").loc[ids].reset_index()
    served_category = predict_categories(category_model_dir, rows["text"].tolist())
    estimator = load_sklearn_model(model_dir)
    served = rows[["text", "town", "county"]].assign(category=served_category)
    predicted = np.asarray(estimator.predict_price(served), dtype=float)
    no_location = np.asarray(estimator.predict_price(served.assign(town="", county="")), dtype=float)

    metrics = regression_metrics(truth, predicted, estimator.median_price)
    old = true_category["metrics"]
    metrics.update(
        {
            "median_abs_error_true_category": float(old["median_abs_error"]),
            "mae_true_category": float(old["mae"]),
            "r2_log_true_category": float(old["r2_log"]),
            "median_abs_error_no_location": float(np.median(np.abs(truth - no_location))),
            "category_accuracy": float(np.mean(np.asarray(served_category) == rows["category"].to_numpy())),
            "category_model": str(read_json(Path(category_model_dir) / "config.json").get("kind")),
        }
    )
    return Scored(metrics, truth, predicted, [], ids)
