"""Metrics on small hand-computed examples, and plots/metric files written atomically (the PNGs by pipeline_steps/visualise.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, log_loss

from pipeline_steps.evaluation import (
    HISTORY_COLUMNS,
    classification_metrics,
    flatten_metrics,
    regression_metrics,
    write_history_csv,
    write_metrics_json,
    write_plot_csv,
    write_predictions_csv,
)
from pipeline_steps.visualise import save_confusion_matrix, save_per_class_bar, save_training_curves

CLASSES4 = ["Appliances", "Home & Garden", "Phones, Mobile Phones & Telecoms", "Other Goods"]
Y_TRUE = np.array([0, 1, 2, 2, 3])
PROBA = np.array([
    [0.70, 0.10, 0.10, 0.10],  # 0 -> 0 correct
    [0.50, 0.30, 0.15, 0.05],  # 1 -> 0 wrong, true class ranked 2nd
    [0.10, 0.20, 0.60, 0.10],  # 2 -> 2 correct
    [0.40, 0.30, 0.20, 0.10],  # 2 -> 0 wrong, true class ranked 3rd
    [0.30, 0.30, 0.30, 0.10],  # 3 -> 0 wrong, true class ranked 4th (outside top 3)
])

LONG_CLASSES = [
    "Appliances", "Baby & Kids Stuff", "Clothes, Footwear & Accessories", "Computers & Software",
    "DIY Tools & Materials", "Health & Beauty", "Home & Garden", "Music, Films, Books & Games",
    "Office Furniture & Equipment", "Other Goods", "Phones, Mobile Phones & Telecoms",
    "Sports, Leisure & Travel", "Video Games & Consoles",
]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- classification


def test_classification_metrics_hand_computed() -> None:
    metrics = classification_metrics(Y_TRUE, PROBA, CLASSES4)
    assert metrics["n"] == 5
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    assert metrics["top3_accuracy"] == pytest.approx(4 / 5)
    y_pred = PROBA.argmax(axis=1)  # [0, 0, 2, 0, 0]
    assert metrics["macro_f1"] == pytest.approx(f1_score(Y_TRUE, y_pred, average="macro", zero_division=0))
    assert metrics["weighted_f1"] == pytest.approx(f1_score(Y_TRUE, y_pred, average="weighted", zero_division=0))
    # by hand: class 0 P=1/4 R=1 F1=0.4; class 2 P=1 R=1/2 F1=2/3; classes 1 and 3 F1=0
    assert metrics["macro_f1"] == pytest.approx((0.4 + 2 / 3) / 4)
    expected_loss = -np.mean(np.log([0.70, 0.30, 0.60, 0.20, 0.10]))
    assert metrics["log_loss"] == pytest.approx(expected_loss)
    assert metrics["log_loss"] == pytest.approx(log_loss(Y_TRUE, PROBA, labels=[0, 1, 2, 3]))

    per_class = metrics["per_class"]
    assert list(per_class) == CLASSES4
    assert per_class["Appliances"] == pytest.approx({"precision": 0.25, "recall": 1.0, "f1": 0.4, "support": 1})
    assert per_class["Phones, Mobile Phones & Telecoms"]["recall"] == pytest.approx(0.5)
    assert per_class["Other Goods"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_classification_metrics_accepts_names_and_unnormalised_rows() -> None:
    names = [CLASSES4[i] for i in Y_TRUE]
    by_name = classification_metrics(names, PROBA * 7.0, CLASSES4)
    by_code = classification_metrics(Y_TRUE, PROBA, CLASSES4)
    assert flatten_metrics(by_name) == pytest.approx(flatten_metrics(by_code))


def test_top3_is_everything_with_three_or_fewer_classes() -> None:
    metrics = classification_metrics([0, 1], [[0.1, 0.9], [0.8, 0.2]], ["a", "b"])
    assert metrics["accuracy"] == 0.0 and metrics["top3_accuracy"] == 1.0


def test_classification_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0], [[0.5, 0.5]], CLASSES4)
    with pytest.raises(ValueError, match="rows"):
        classification_metrics([0, 1], PROBA[:1], CLASSES4)
    with pytest.raises(ValueError, match="not among"):
        classification_metrics(["Cars"], PROBA[:1], CLASSES4)
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], np.zeros((0, 4)), CLASSES4)


def test_confident_wrong_answer_has_finite_log_loss() -> None:
    metrics = classification_metrics([1], [[1.0, 0.0]], ["a", "b"])
    assert math.isfinite(metrics["log_loss"]) and metrics["log_loss"] > 30


# --------------------------------------------------------------------------- regression


def test_regression_metrics_hand_computed() -> None:
    true = [10.0, 20.0, 40.0, 100.0]
    pred = [12.0, 20.0, 30.0, 130.0]  # errors 2, 0, 10, 30
    metrics = regression_metrics(true, pred, 25.0)  # baseline errors 15, 5, 15, 75
    assert metrics["n"] == 4
    assert metrics["mae"] == pytest.approx(10.5)
    assert metrics["median_abs_error"] == pytest.approx(6.0)
    assert metrics["baseline_median_abs_error"] == pytest.approx(15.0)
    assert metrics["baseline_mae"] == pytest.approx(27.5)
    log_true, log_pred = np.log1p(true), np.log1p(pred)
    r2 = 1 - np.sum((log_true - log_pred) ** 2) / np.sum((log_true - log_true.mean()) ** 2)
    assert metrics["r2_log"] == pytest.approx(r2)


def test_regression_metrics_perfect_and_negative_predictions() -> None:
    assert regression_metrics([5.0, 50.0], [5.0, 50.0], 20.0)["r2_log"] == pytest.approx(1.0)
    clipped = regression_metrics([0.0, 10.0], [-3.0, 10.0], 5.0)  # log of a negative price is avoided
    assert math.isfinite(clipped["r2_log"]) and clipped["mae"] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        regression_metrics([1.0, 2.0], [1.0], 1.0)


# --------------------------------------------------------------------------- flat metrics and files


def test_flatten_metrics_gives_mlflow_safe_prefixed_names() -> None:
    metrics = classification_metrics(Y_TRUE, PROBA, CLASSES4)
    flat = flatten_metrics(metrics, "test")
    assert flat["test_accuracy"] == pytest.approx(0.4)
    assert flat["test_top3_accuracy"] == pytest.approx(0.8)
    assert flat["test_n"] == 5.0
    assert flat["test_per_class_phones_mobile_phones_telecoms_recall"] == pytest.approx(0.5)
    assert all(set(key) <= set("abcdefghijklmnopqrstuvwxyz0123456789_") for key in flat)
    assert flatten_metrics({"a": float("nan"), "b": None, "c": "text", "d": 2}) == {"d": 2.0}
    assert flatten_metrics({"accuracy": 0.5}) == {"accuracy": 0.5}


def test_write_metrics_json_is_valid_json_for_dvc(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "text.json"
    metrics = {"test": {"accuracy": np.float64(0.8), "n": np.int64(5), "r2_log": float("nan")}}
    write_metrics_json(path, metrics)
    loaded = json.loads(path.read_text())  # strict JSON: NaN became null
    assert loaded == {"test": {"accuracy": 0.8, "n": 5, "r2_log": None}}
    assert _no_temp_files(path.parent)


def test_history_and_plot_files(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "train_accuracy": 0.3, "val_accuracy": 0.25, "lr": 0.1},
        {"epoch": 2, "train_loss": 1.5, "val_loss": 1.8, "train_accuracy": 0.5, "val_accuracy": 0.4, "lr": 0.05},
    ]
    csv_path = write_history_csv(history, tmp_path / "plots" / "text_history.csv")
    frame = pd.read_csv(csv_path)
    assert list(frame.columns[: len(HISTORY_COLUMNS)]) == list(HISTORY_COLUMNS)
    assert frame["val_loss"].tolist() == [2.1, 1.8] and "lr" in frame.columns

    sparse = write_plot_csv(tmp_path / "sparse.csv", [{"epoch": 1, "train_loss": 1.0}], HISTORY_COLUMNS)
    assert list(pd.read_csv(sparse).columns) == list(HISTORY_COLUMNS)

    preds = write_predictions_csv(tmp_path / "preds.csv", Y_TRUE, PROBA.argmax(axis=1), CLASSES4)
    confusion = pd.read_csv(preds)
    assert list(confusion.columns) == ["actual", "predicted"]
    assert confusion.iloc[3].tolist() == ["Phones, Mobile Phones & Telecoms", "Appliances"]
    assert _no_temp_files(tmp_path / "plots")


# --------------------------------------------------------------------------- PNGs


def test_confusion_matrix_png_with_13_long_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 13, size=200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 13, size=200))
    normalised = save_confusion_matrix(y_true, y_pred, LONG_CLASSES, tmp_path / "plots" / "cm.png")
    counts = save_confusion_matrix([LONG_CLASSES[i] for i in y_true], y_pred, LONG_CLASSES,
                                   tmp_path / "plots" / "cm_counts.png", normalize=False)
    assert _is_png(normalised) and _is_png(counts)
    assert _no_temp_files(tmp_path / "plots")


def test_confusion_matrix_tolerates_a_class_with_no_samples(tmp_path: Path) -> None:
    path = save_confusion_matrix([0, 0, 1], [0, 1, 1], ["a", "b", "never seen"], tmp_path / "cm.png")
    assert _is_png(path)


def test_training_curves_png(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e, "train_accuracy": 0.2 * e,
                "val_accuracy": 0.18 * e} for e in range(1, 5)]
    assert _is_png(save_training_curves(history, tmp_path / "curves.png", title="text"))
    # a model that logs only losses, and a one-epoch scikit-learn history, still plot
    assert _is_png(save_training_curves([{"train_loss": 1.0}], tmp_path / "one.png"))
    with pytest.raises(ValueError, match="empty"):
        save_training_curves([], tmp_path / "none.png")


def test_per_class_bar_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y_true = np.repeat(np.arange(13), 4)
    proba = rng.random((52, 13))
    metrics = classification_metrics(y_true, proba, LONG_CLASSES)
    assert _is_png(save_per_class_bar(metrics, tmp_path / "f1.png"))
    assert _is_png(save_per_class_bar(metrics, tmp_path / "recall.png", metric="recall"))
    with pytest.raises(ValueError, match="per_class"):
        save_per_class_bar({"accuracy": 1.0}, tmp_path / "bad.png")
