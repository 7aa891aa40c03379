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

Plots are drawn on a bare `matplotlib.figure.Figure` (the Agg renderer, no pyplot):
no global backend is switched, nothing needs a display, and concurrent flows in
one process do not share pyplot's current-figure state. Every file is written to a
temporary sibling first and moved into place, so DVC never tracks half a PNG.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, r2_score

from pipeline_steps.errors import PipelineError
from pipeline_steps.io_utils import atomic_path, read_json, write_csv, write_json
from pipeline_steps.promotion import CATEGORY_MODEL_KEY, MODEL_RUN_KEY, SPLIT_HASH_KEY, split_hash  # noqa: F401  (what evaluate writes)

HISTORY_COLUMNS: tuple[str, ...] = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
"""Per-epoch columns every model's history uses (`reports/plots/<model>_history.csv`)."""

_PROBA_EPS = 1e-15

CLASSIFIER_KINDS: tuple[str, ...] = ("image", "text", "multimodal")
SKLEARN_KINDS: tuple[str, ...] = ("text-baseline", "pixel-baseline", "price")
PRICE_CATEGORY_KIND = "text"
"""The classifier served beside the price estimator: a `/predict` with text gets its price from the
category the text classifier predicts (service/engine.py), so the price model is scored with it."""


# --------------------------------------------------------------------------- metrics


def _as_indices(y: Sequence[Any] | np.ndarray, classes: Sequence[str]) -> np.ndarray:
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
    y = _as_indices(y_true, classes)
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
        {"actual": names[_as_indices(y_true, classes)], "predicted": names[_as_indices(y_pred, classes)]}
    )
    return write_csv(frame, path)


# --------------------------------------------------------------------------- PNG plots


def _save_figure(figure: Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def _wrap(label: str, width: int = 18) -> str:
    return textwrap.fill(str(label), width=width, break_long_words=False) or str(label)


def save_confusion_matrix(
    y_true: Sequence[Any] | np.ndarray,
    y_pred: Sequence[Any] | np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Draw the confusion matrix as a PNG (rows: true class, columns: predicted class).

    `normalize=True` divides each row by its support, so the diagonal reads as per-class
    recall and small classes are as visible as large ones; rows with no samples stay 0.
    Long class names ("Phones, Mobile Phones & Telecoms") are wrapped and the figure grows
    with the number of classes so 13 labels stay readable.
    """
    classes = list(classes)
    n = len(classes)
    y = _as_indices(y_true, classes)
    yp = _as_indices(y_pred, classes)
    counts = confusion_matrix(y, yp, labels=list(range(n)))
    if normalize:
        totals = counts.sum(axis=1, keepdims=True).astype(float)
        values = np.divide(counts, totals, out=np.zeros_like(counts, dtype=float), where=totals > 0)
    else:
        values = counts.astype(float)

    side = max(5.0, 0.8 * n + 3.0)
    figure = Figure(figsize=(side + 1.5, side))
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(values.max(), 1.0))
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    labels = [_wrap(c) for c in classes]
    ax.set_xticks(range(n), labels=labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(n), labels=labels, fontsize=8)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    accuracy = float(np.trace(counts) / counts.sum()) if counts.sum() else float("nan")
    ax.set_title(title or f"Confusion matrix ({'row-normalised' if normalize else 'counts'}), "
                          f"n={int(counts.sum())}, accuracy={accuracy:.3f}")
    threshold = values.max() / 2.0 if values.size else 0.0
    fontsize = 7 if n > 8 else 9
    for i in range(n):
        for j in range(n):
            value = values[i, j]
            if value == 0:
                continue
            text = f"{value:.2f}" if normalize else f"{int(value)}"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if value > threshold else "black")
    return _save_figure(figure, path)


def save_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Plot loss and accuracy per epoch for train and val as a two-panel PNG.

    Reads the standard history keys (`train_loss`, `val_loss`, `train_accuracy`,
    `val_accuracy`; `epoch` defaults to 1, 2, ...); keys a model does not log are skipped,
    so a one-entry history from a scikit-learn baseline still gives a (dotted) plot.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        drawn = False
        for split, style in (("train", "-o"), ("val", "--s")):
            key = f"{split}_{metric}"
            points = [(e, row.get(key)) for e, row in zip(epochs, history, strict=True)]
            points = [(e, float(v)) for e, v in points if v is not None and math.isfinite(float(v))]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, markersize=3, label=split)
                drawn = True
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {metric} logged", ha="center", va="center", transform=ax.transAxes)
    if title:
        figure.suptitle(title)
    return _save_figure(figure, path)


def save_per_class_bar(metrics: Mapping[str, Any], path: str | Path, metric: str = "f1",
                       title: str | None = None) -> Path:
    """Horizontal bars of one per-class metric (from `classification_metrics`), worst at the top.

    Shows at a glance which categories a model confuses, which the averages hide.
    """
    per_class = metrics.get("per_class")
    if not per_class:
        raise ValueError("metrics has no 'per_class' entry (use classification_metrics output)")
    items = sorted(per_class.items(), key=lambda kv: kv[1].get(metric, 0.0), reverse=True)
    names = [_wrap(name, 30) for name, _ in items]
    values = [float(v.get(metric, 0.0)) for _, v in items]
    supports = [int(v.get("support", 0)) for _, v in items]
    figure = Figure(figsize=(8, max(3.0, 0.45 * len(items) + 1.2)))
    ax = figure.add_subplot()
    bars = ax.barh(range(len(items)), values, color="tab:blue")
    ax.set_yticks(range(len(items)), labels=names, fontsize=8)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(metric)
    for bar, value, support in zip(bars, values, supports, strict=True):
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.2f} (n={support})",
                va="center", fontsize=7)
    ax.set_title(title or f"Per-class {metric}")
    ax.grid(axis="x", alpha=0.3)
    return _save_figure(figure, path)


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
    kind: str, model_dir: str | Path, clean_dir: str | Path, category_model_dir: str | Path | None = None, split: str = "test"
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

    Returns:
        Scored: metrics (classification_metrics / score_price, plus `unit` for classifiers),
        y_true and y_pred for the confusion matrix (label codes; prices for the estimator), the
        class names and the product_id of each scored row (the registry hashes them).
    """
    model_dir, clean_dir = Path(model_dir), Path(clean_dir)
    if kind in CLASSIFIER_KINDS:
        from pipeline_steps import inference  # torch: only for the networks

        classifier = inference.load_classifier(model_dir)
        prediction = inference.predict_split(classifier, clean_dir, split)
        metrics = classification_metrics(prediction.labels, prediction.proba, classifier.classes)
        metrics["unit"] = "image" if kind == "image" else "product"
        ids = prediction.ids["product_id"].astype(str).tolist()
        if kind == "image":  # issue 9: a listing's photos pooled into one prediction (train.image.product_pooling)
            metrics["per_product"] = per_product_scores(prediction.proba, ids, prediction.labels, classifier.classes,
                                                        classifier.config.get("params", {}).get("product_pooling"))
        return Scored(metrics, prediction.labels, prediction.proba.argmax(axis=1), list(classifier.classes), ids)
    if kind not in SKLEARN_KINDS:
        raise PipelineError(f"unknown model kind {kind!r}; accepted: {', '.join(CLASSIFIER_KINDS + SKLEARN_KINDS)}")
    classes = list(read_json(clean_dir / "labels.json")["classes"])
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
